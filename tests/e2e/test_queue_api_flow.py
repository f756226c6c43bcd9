"""Queue features across real processes: waiting for results, batches, requeue, cancel."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psutil
import pytest

from emailq.settings import Settings
from tests.helpers import polling
from tests.helpers.polling import wait_until
from tests.helpers.processes import PATIENT_REDIS_SECONDS, Procs
from tests.helpers.smtpd import Received, RecordingHandler, SmtpServer

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
BATCH = "/api/v1/emails/batch"
ADMIN = "/api/v1/admin"


@dataclass
class TimedHandler(RecordingHandler):
    """Also notes when each mail was accepted (``time.monotonic()``, by task id)."""

    accepted_at: dict[str, float] = field(default_factory=dict)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        reply = await super().handle_DATA(server, session, envelope)
        now = time.monotonic()
        if reply.startswith("250"):
            raw = envelope.original_content or envelope.content
            task_id = Received(envelope.mail_from, [], raw, session.peer).task_id
            with self.lock:
                self.accepted_at[task_id] = now
        return reply


def mail(**fields: Any) -> dict[str, Any]:
    return {"to": "user@example.com", "subject": "Hello", "body": "Hi", **fields}


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.fixture
def timed_smtp(smtp_factory: Callable[..., SmtpServer]) -> SmtpServer:
    return smtp_factory(handler=TimedHandler())


@pytest.fixture
def settings(make_settings: Callable[..., Settings], timed_smtp: SmtpServer) -> Settings:
    return make_settings(smtp_port=timed_smtp.port)


def handler_of(smtp: SmtpServer) -> TimedHandler:
    assert isinstance(smtp.handler, TimedHandler)
    return smtp.handler


def wait_result(client: httpx.Client, task_id: str, seconds: float = 10) -> dict[str, Any]:
    response = client.get(RESULT, params={"task_id": task_id, "wait": seconds})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_wait_answers_once_the_mail_is_sent(
    procs: Procs, settings: Settings, timed_smtp: SmtpServer
) -> None:
    handler = handler_of(timed_smtp)
    # Slow acceptance, so every GET below is already waiting when its mail is accepted.
    handler.delay = 0.3
    base = procs.api(settings)
    procs.worker(settings)
    lags = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for n in range(5):
            task_id = client.post(SEND, json=mail(subject=f"code {n}")).json()["task_id"]
            result = wait_result(client, task_id)
            answered = time.monotonic()
            assert result["status"] == "success"
            lags.append(answered - handler.accepted_at[task_id])

    # The lag is a figure for the README (the goal: within 100 ms), not asserted: on
    # a busy machine any bound on it is a coin toss. That each answer is the final status is.
    print(f"\nwait= answered {', '.join(f'{lag * 1000:.1f}' for lag in lags)} ms after acceptance")


@pytest.mark.serial  # 300 mails must flow within the waiters' wait=10
def test_300_concurrent_waiters_are_served_while_mail_flows(
    procs: Procs, make_settings: Callable[..., Settings], timed_smtp: SmtpServer
) -> None:
    handler = handler_of(timed_smtp)
    # Not a test of the 503 bound: on a loaded machine, 300 requests at once can keep one
    # Redis call past the default 0.5 s, and a 503 here would say nothing about waiting.
    settings = make_settings(smtp_port=timed_smtp.port, redis_timeout_seconds=PATIENT_REDIS_SECONDS)
    base = procs.api(settings)
    ids = post_batches(base, 3)

    answered_at: dict[str, float] = {}
    tls = ssl.create_default_context()  # unused over http, but costly to build 300 times

    async def wait_for(task_id: str) -> httpx.Response:
        # A client each, as 300 separate callers would have: one shared client's connection
        # pool is itself slow at 300 concurrent requests (they reached the API seconds late).
        async with httpx.AsyncClient(base_url=base, timeout=60, verify=tls) as client:
            response = await client.get(RESULT, params={"task_id": task_id, "wait": 10})
        answered_at[task_id] = time.monotonic()
        return response

    api_proc = procs.started[-1]
    api_port = int(base.rsplit(":", 1)[1])

    async def run() -> list[httpx.Response | BaseException]:
        waits = [asyncio.create_task(wait_for(t)) for t in ids]
        # Every GET has reached the API (its connection is established there) before any
        # mail is sent.
        await polling.wait_for(lambda: connections_to(api_proc.pid, api_port) >= len(ids),
                               f"{len(ids)} connections to the API")  # fmt: skip
        # The worker starts only now, so every waiter waits for its mail to flow.
        await asyncio.to_thread(procs.worker, settings)
        return await asyncio.gather(*waits, return_exceptions=True)

    responses = asyncio.run(run())

    errors = [r for r in responses if not isinstance(r, httpx.Response)]
    assert errors == []
    answers = [r.json() for r in responses if isinstance(r, httpx.Response)]
    assert [a.get("status", a) for a in answers] == ["success"] * len(ids)
    assert [a["task_id"] for a in answers] == ids
    # Each answer came after its own mail was accepted: it waited, it did not just poll once.
    assert all(answered_at[t] >= handler.accepted_at[t] for t in ids)
    assert sorted(handler.task_ids()) == sorted(ids)
    assert len(handler.received) == len(ids)  # each sent once
    waited = drain_seconds(handler, ids)

    # The same volume with nobody waiting, for the figure in the report (not asserted).
    more = post_batches(base, 3)
    # Counted cheaply: task_ids() parses every message under the lock the server needs.
    wait_until(lambda: len(handler.accepted_at) == 600, what="600 mails")
    alone = drain_seconds(handler, more)
    lags = sorted(answered_at[t] - handler.accepted_at[t] for t in ids)
    print(f"\n300 mails through one worker: {waited:.2f} s with 300 waiters, {alone:.2f} s "
          f"without; answer after acceptance p50 {lags[150] * 1000:.1f} ms, "
          f"max {lags[-1] * 1000:.1f} ms")  # fmt: skip


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections the process ``pid`` accepted on ``port``."""
    accepted = [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr]
    return sum(1 for c in accepted if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def post_batches(base: str, count: int) -> list[str]:
    ids: list[str] = []
    for n in range(count):
        messages = [mail(subject=f"batch {n} mail {i}") for i in range(100)]
        response = httpx.post(f"{base}{BATCH}", json={"messages": messages}, timeout=30)
        assert response.status_code == 202, response.text
        ids += [entry["task_id"] for entry in response.json()["results"]]
    return ids


def drain_seconds(handler: TimedHandler, ids: list[str]) -> float:
    times = [handler.accepted_at[t] for t in ids]
    return max(times) - min(times)


def test_a_batch_with_two_bad_entries_sends_the_rest(
    procs: Procs, settings: Settings, timed_smtp: SmtpServer
) -> None:
    base = procs.api(settings)
    procs.worker(settings)
    messages = [mail(subject="one"), mail(to="broken@"), mail(subject="two", priority="low"),
                mail(subject="bad\nheader"), mail(subject="three", priority="high")]  # fmt: skip

    with httpx.Client(base_url=base, timeout=30) as client:
        response = client.post(BATCH, json={"messages": messages})
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["queued"], body["rejected"]) == (3, 2)
        ids = [r["task_id"] for r in body["results"] if "task_id" in r]
        assert [wait_result(client, t)["status"] for t in ids] == ["success"] * 3

    assert sorted(handler_of(timed_smtp).task_ids()) == sorted(ids)
    subjects = sorted(str(r.message["Subject"]) for r in handler_of(timed_smtp).received)
    assert subjects == ["one", "three", "two"]


def test_a_requeued_dead_letter_is_sent_once(
    procs: Procs, settings: Settings, timed_smtp: SmtpServer
) -> None:
    handler = handler_of(timed_smtp)
    handler.replies = ["550 5.1.1 no such user"]
    base = procs.api(settings)  # on 127.0.0.1: a loopback client may use the admin routes
    procs.worker(settings)

    with httpx.Client(base_url=base, timeout=30) as client:
        task_id = client.post(SEND, json=mail()).json()["task_id"]
        failed = wait_result(client, task_id)
        assert failed["status"] == "failed"
        assert "550" in failed["reason"]
        listed = client.get(f"{ADMIN}/failed").json()["tasks"]
        assert [t["task_id"] for t in listed] == [task_id]

        requeued = client.post(f"{ADMIN}/tasks/{task_id}/requeue")
        assert requeued.json() == {"requeued": 1, "task_ids": [task_id]}
        done = wait_result(client, task_id)

        assert done["status"] == "success"
        assert [a["outcome"] for a in done["attempt_log"]] == ["failed", "requeued", "success"]
        assert client.get(f"{ADMIN}/failed").json()["tasks"] == []
        stats = client.get(f"{ADMIN}/stats").json()
    assert handler.task_ids() == [task_id]
    assert handler.data_calls == 2
    assert stats["live_workers"] == 1
    assert (stats["sent_last_minute"], stats["failed_last_minute"]) == (1, 1)


def test_a_cancelled_scheduled_mail_is_never_sent(
    procs: Procs, settings: Settings, timed_smtp: SmtpServer
) -> None:
    base = procs.api(settings)
    procs.worker(settings)

    with httpx.Client(base_url=base, timeout=30) as client:
        cancelled = client.post(SEND, json=mail(send_at=later(1.0))).json()["task_id"]
        # Due after the cancelled one: once it is sent, the cancelled one's time has passed.
        marker = client.post(SEND, json=mail(send_at=later(1.5))).json()["task_id"]
        assert client.post(f"{ADMIN}/tasks/{cancelled}/cancel").status_code == 200

        assert wait_result(client, marker)["status"] == "success"
        shown = wait_result(client, cancelled, 0)

    assert (shown["status"], shown["reason"]) == ("failed", "cancelled")
    assert handler_of(timed_smtp).task_ids() == [marker]
