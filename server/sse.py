"""The event stream (``{prefix}:events``) as server-sent events, for the dashboard.

Each connection reads the stream from where it left off with short, non-blocking reads
(``Queue.events``) on the API's shared pool, and waits between them on the app's
``stopping`` event: no connection is held in Redis while nothing happens, so open
dashboards cannot use up the pool that sends need, and a stopping server ends every stream
at once instead of waiting out its grace period. A client that reconnects sends the last
id it saw as ``Last-Event-ID`` and misses nothing the stream's cap has not trimmed.

Frames: ``id:`` the stream entry id, ``data:`` the event as one line of JSON (JSON escapes
CR and LF, so no text from an SMTP reply can end a frame or forge a field). A comment line
is sent after ``HEARTBEAT_SECONDS`` of quiet, so proxies and the browser see the connection
alive; ``event: unavailable`` says that Redis did not answer (the stream carries on once
it does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from emailq.errors import StoreUnavailable
from emailq.models import Event
from emailq.queue import Queue

PAGE = 200  # events per read; a reconnect after a busy minute catches up in pages
RETRY_MS = 3000  # how soon the client should reconnect after a cut


@dataclass(frozen=True)
class Pacing:
    """How often a connection reads the stream, and how long it stays silent at most."""

    poll_seconds: float = 0.5
    heartbeat_seconds: float = 15.0


def frame(event: Event) -> str:
    """One event as an SSE frame."""
    return f"id: {event.id}\ndata: {event.model_dump_json()}\n\n"


async def _read(queue: Queue, after_id: str) -> list[Event] | None:
    """The next page of events, or None if Redis did not answer."""
    try:
        return await queue.events(after_id, count=PAGE)
    except StoreUnavailable:
        return None


async def event_frames(
    queue: Queue, after_id: str, stopping: asyncio.Event, pacing: Pacing = Pacing()
) -> AsyncIterator[str]:
    """SSE frames of every event after ``after_id``, until ``stopping`` is set (or the
    client goes away, which cancels this generator)."""
    yield f"retry: {RETRY_MS}\n\n"  # sent at once: the client knows it is connected
    last, quiet_since, down = after_id, time.monotonic(), False
    while not stopping.is_set():
        events = await _read(queue, last)
        if events is None and not down:
            detail = json.dumps({"detail": "Redis is unavailable; retrying"})
            yield f"event: unavailable\ndata: {detail}\n\n"
        down = events is None
        for event in events or []:
            yield frame(event)
            last = event.id
        if events:
            quiet_since = time.monotonic()
            if len(events) == PAGE:  # more waiting: read on without a pause
                continue
        elif time.monotonic() - quiet_since >= pacing.heartbeat_seconds:
            yield ": keepalive\n\n"
            quiet_since = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), pacing.poll_seconds)
