"""The admin event stream as server-sent events: the generator against a real Redis, and
the endpoint of a real API process (resume with Last-Event-ID, an end on SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Callable
from typing import Any

import httpx

from emailq.models import Attempt
from emailq.queue import Queue
from emailq.settings import Settings
from server.sse import PAGE, Pacing, event_frames
from tests.helpers.api import ADMIN, API_KEYS, bearer, mail
from tests.helpers.polling import read_log, wait_until
from tests.helpers.processes import Procs
from tests.helpers.queues import add

EVENTS = "/api/v1/admin/events"
FAST = Pacing(poll_seconds=0.01, heartbeat_seconds=0.05)


def parse(frame: str) -> dict[str, Any]:
    """One SSE frame's fields (``data`` decoded from JSON)."""
    fields: dict[str, Any] = {}
    for line in frame.strip("\n").split("\n"):
        name, _, value = line.partition(": ")
        fields[name] = json.loads(value) if name == "data" else value
    return fields


# -- the generator -------------------------------------------------------------------------


async def test_frames_carry_every_event_after_the_id_then_keepalives_then_end(
    queue: Queue,
) -> None:
    await add(queue, "before-", 1)
    start = await queue.last_event_id()
    ids = await add(queue, "t-", PAGE + 5)  # more than one read's page
    stopping = asyncio.Event()
    frames = event_frames(queue, start, stopping, FAST)

    assert await anext(frames) == "retry: 3000\n\n"
    got = [parse(await anext(frames)) for _ in ids]
    assert [f["data"]["task_id"] for f in got] == ids
    assert {f["data"]["type"] for f in got} == {"accepted"}
    assert all(f["id"] == f["data"]["id"] for f in got)
    assert await anext(frames) == ": keepalive\n\n"  # a quiet stream says it is alive
    stopping.set()
    assert [rest async for rest in frames] in ([], [": keepalive\n\n"])


async def test_a_reason_with_line_breaks_cannot_forge_a_frame(queue: Queue) -> None:
    [task_id] = await add(queue, "forge-", 1)
    start = await queue.last_event_id()
    claim = await queue.claim("w", 1, 60_000)
    reply = '550 no\r\n\r\nid: 9999999999999-0\ndata: {"type": "sent"}'
    entry = Attempt(attempt=1, outcome="failed", code=550, reply=reply)
    await queue.finish(claim.jobs[0], "failed", entry, reason=reply)
    stopping = asyncio.Event()
    frames = event_frames(queue, start, stopping, FAST)
    await anext(frames)

    claimed, failed = parse(await anext(frames)), parse(await anext(frames))

    assert (claimed["data"]["type"], failed["data"]["type"]) == ("claimed", "failed")
    assert failed["data"]["reason"] == reply
    assert failed["data"]["task_id"] == task_id
    assert set(failed) == {"id", "data"}
    stopping.set()


async def test_redis_going_away_is_said_once_and_the_stream_carries_on(
    make_settings: Callable[..., Settings], redis_factory: Callable[..., Any]
) -> None:
    server = redis_factory()
    queue = Queue.from_url(server.url, timeout=0.3)
    try:
        await add(queue, "a-", 1)
        stopping = asyncio.Event()
        frames = event_frames(queue, "0", stopping, Pacing(0.01, 3600))
        await anext(frames)
        assert parse(await anext(frames))["data"]["task_id"] == "a-0"
        port, data_dir = server.port, server.data_dir
        server.stop()
        down = await anext(frames)
        assert down.startswith("event: unavailable\n")
        restarted = redis_factory(port, data_dir)
        assert restarted.port == port
        writer = Queue.from_url(restarted.url, timeout=1)
        await add(writer, "b-", 1)
        await writer.close()
        # Only one "unavailable" however long it was down; then the next event.
        assert parse(await anext(frames))["data"]["task_id"] == "b-0"
        stopping.set()
    finally:
        await queue.close()


# -- the endpoint of a real API process ----------------------------------------------------


class Reader:
    """Reads an SSE response on a thread, collecting frames, until the server ends it."""

    def __init__(self, base: str, headers: dict[str, str], query: str = "") -> None:
        self.frames: list[str] = []
        self.ended = threading.Event()
        self.status = 0
        self.thread = threading.Thread(target=self._run, args=(base + EVENTS + query, headers),
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        buffer = ""
        try:
            # No read timeout: the stream is quiet between events; the server ends it.
            timeout = httpx.Timeout(5.0, read=None)
            with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
                self.status = response.status_code
                for chunk in response.iter_text():
                    buffer += chunk
                    while "\n\n" in buffer:
                        frame, buffer = buffer.split("\n\n", 1)
                        self.frames.append(frame + "\n\n")
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def events(self) -> list[dict[str, Any]]:
        return [parse(f) for f in list(self.frames) if f.startswith("id: ")]


def send(base: str, n: int) -> str:
    response = httpx.post(f"{base}/api/v1/email/received", json=mail(subject=f"m{n}"),
                          headers=bearer(ADMIN), timeout=5)  # fmt: skip
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_a_dashboard_resumes_where_it_left_off_and_the_stream_ends_on_sigterm(
    procs: Procs, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(api_keys=API_KEYS)
    base = procs.api(settings)
    [api] = procs.started

    refused = httpx.get(base + EVENTS, timeout=5)
    assert refused.status_code == 401

    first = Reader(base, bearer(ADMIN))
    wait_until(lambda: bool(first.frames), what="the stream to open")
    assert first.status == 200
    early = send(base, 0)
    wait_until(lambda: [e["data"]["task_id"] for e in first.events()] == [early],
               what="the accepted event")  # fmt: skip
    last_id = first.events()[-1]["id"]

    # Disconnected meanwhile: what happened is sent on reconnect, from Last-Event-ID.
    missed = [send(base, n) for n in (1, 2)]
    second = Reader(base, {**bearer(ADMIN), "Last-Event-ID": last_id})
    wait_until(lambda: len(second.events()) == 2, what="the missed events")
    assert [e["data"]["task_id"] for e in second.events()] == missed
    # A page that opens asks for the last events first (the dashboard: its last 50).
    third = Reader(base, bearer(ADMIN), query="?backlog=2")
    wait_until(lambda: len(third.events()) == 2, what="the backlog")
    assert [e["data"]["task_id"] for e in third.events()] == missed

    api.send_signal(signal.SIGTERM)
    # Both streams end, and the API exits, without waiting out its 35 s grace period
    # (the bound of each wait is shorter than that).
    wait_until(first.ended.is_set, what="the first stream to end")
    wait_until(second.ended.is_set, what="the second stream to end")
    wait_until(third.ended.is_set, what="the third stream to end")
    wait_until(lambda: api.poll() is not None, what="the API to exit")
    # uvicorn re-raises the signal once it has shut down: -SIGTERM is its clean exit.
    assert api.returncode == -signal.SIGTERM
    log = read_log(api)
    assert "Application shutdown complete" in log
    assert "timeout graceful shutdown exceeded" not in log
