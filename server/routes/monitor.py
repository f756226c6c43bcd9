"""What the dashboard reads besides the admin endpoints: per-minute throughput, the live
workers, whether actions are allowed, and the event stream as server-sent events.

Admin scope, as every ``/admin`` endpoint (``server.auth.require_admin``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from emailq.models import Event, EventType, RelayState, WorkerRelay, iso
from emailq.queue import HISTORY_MINUTES
from server.auth import AdminDep
from server.deps import QueueDep, SettingsDep, state_of
from server.schemas import TASK_ID, _example
from server.sse import RETRY_MS, event_frames, frame

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

# A stream entry id, "<ms>-<seq>" (or a bare "<ms>"), as the stream gave it to the client.
_EVENT_ID = r"^\d{1,20}(-\d{1,20})?$"
MAX_BACKLOG = 200  # events a stream may start with (the dashboard shows 50)
_BACKLOG = ("without Last-Event-ID: start with the last this many events (a page that opens "
            "shows what just happened), then go on")  # fmt: skip

_WORKER_ID = "worker-1f3a9c"  # the examples' worker
# One event as the stream would send it, framed by the stream's own code.
_EVENT_EXAMPLE = Event(
    id="1738314001250-0", type=EventType.SENT, task_id=TASK_ID, time=1738314001250,
    lane="default", attempt=1, code=250, request_id="5f0c6a1e9b8d4c2fa7e3d1b0c9a8e7f6",
    worker=_WORKER_ID,
)  # fmt: skip


class Minute(BaseModel):
    """Tasks finished in one clock minute."""

    at: str = Field(description="the minute's start, RFC 3339 UTC")
    sent: int = Field(description="tasks the relay accepted in this minute")
    failed: int = Field(description="tasks that failed for good in this minute")


class Throughput(BaseModel):
    """Sent and failed per minute, oldest first; the last minute is the current one."""

    model_config = _example({"minutes": [
        {"at": "2025-01-31T08:59:00.000+00:00", "sent": 42, "failed": 1},
        {"at": "2025-01-31T09:00:00.000+00:00", "sent": 17, "failed": 0},
    ]})  # fmt: skip

    minutes: list[Minute] = Field(description="one entry per minute, oldest first")


class WorkerOut(BaseModel):
    """One live worker."""

    worker_id: str = Field(description="the worker's id")
    last_heartbeat: str = Field(description="its last heartbeat, RFC 3339 UTC")
    heartbeat_age_seconds: float = Field(description="seconds since that heartbeat")
    heartbeat_late: bool = Field(
        default=False, description="two heartbeats missed (each comes every third of "
        "JOB_LEASE_SECONDS): stalled, cut off from Redis, or dead and not yet taken for it"
    )  # fmt: skip
    relay: WorkerRelay | None = Field(
        description="its circuit breaker over the relay; null until it has published one"
    )


class Workers(BaseModel):
    """Workers with a heartbeat within three lease periods, most recent first."""

    model_config = _example({"workers": [{
        "worker_id": _WORKER_ID, "last_heartbeat": "2025-01-31T09:00:01.250+00:00",
        "heartbeat_age_seconds": 2.4,
        "relay": {"worker_id": _WORKER_ID, "state": RelayState.CLOSED.value,
                  "since": 1738310000000, "error": None, "send_rate": 10.0},
    }]})  # fmt: skip

    workers: list[WorkerOut] = Field(description="the live workers, most recent first")


class Permissions(BaseModel):
    """What this API lets an admin do from the dashboard."""

    model_config = _example({"read_only": False})

    read_only: bool = Field(description="DASHBOARD_READ_ONLY: requeue and cancel answer 403")


@router.get("/throughput")
async def throughput(
    queue: QueueDep,
    minutes: Annotated[
        int,
        Query(
            ge=1,
            le=HISTORY_MINUTES,
            examples=[60],
            description="how many minutes back, the current one included",
        ),
    ] = HISTORY_MINUTES,
) -> Throughput:
    """Tasks sent and failed per clock minute, up to the last two hours."""
    counts = await queue.throughput(minutes)
    return Throughput(minutes=[Minute(at=iso(c.minute) or "", sent=c.sent, failed=c.failed)
                               for c in counts])  # fmt: skip


@router.get("/workers")
async def workers(queue: QueueDep, settings: SettingsDep) -> Workers:
    """Live workers with their heartbeat age and relay circuit breaker."""
    found = await queue.workers(live_window_ms=settings.live_window_ms)
    late_after = settings.heartbeat_late_seconds
    return Workers(workers=[
        WorkerOut(worker_id=w.worker_id, last_heartbeat=iso(w.last_heartbeat) or "",
                  heartbeat_age_seconds=w.heartbeat_age_seconds,
                  heartbeat_late=w.heartbeat_age_seconds > late_after, relay=w.relay)
        for w in found
    ])  # fmt: skip


@router.get("/permissions")
async def permissions(settings: SettingsDep) -> Permissions:
    """Whether requeue and cancel are allowed (DASHBOARD_READ_ONLY)."""
    return Permissions(read_only=settings.dashboard_read_only)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {
        "description": "server-sent events, one per state change of a task (`id:` the "
                       "stream entry id, `data:` the event as one line of JSON); a "
                       "`: keepalive` comment after a quiet while, `event: unavailable` "
                       "while Redis does not answer. The stream does not end by itself.",
        "content": {"text/event-stream": {
            "schema": {"type": "string"},
            "example": f"retry: {RETRY_MS}\n\n" + frame(_EVENT_EXAMPLE),
        }},
    }},
)  # fmt: skip
async def events(
    request: Request,
    queue: QueueDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=_EVENT_ID,
            examples=[_EVENT_EXAMPLE.id],
            description="the last event id the client saw: the stream goes on after it "
            "(browsers send it when they reconnect); absent, from now",
        ),
    ] = None,
    backlog: Annotated[int, Query(ge=0, le=MAX_BACKLOG, description=_BACKLOG)] = 0,
) -> StreamingResponse:
    """The event stream as server-sent events: from ``Last-Event-ID`` on, else from now
    (with the last ``backlog`` events first)."""
    # Read before the response starts, so an unreachable Redis is an ordinary 503.
    after = last_event_id or await queue.last_event_id(backlog=backlog)
    frames = event_frames(queue, after, state_of(request.app).stopping)
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store",
                                      "X-Accel-Buffering": "no"})  # fmt: skip
