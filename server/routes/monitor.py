"""What the dashboard reads besides the admin endpoints: per-minute throughput, the live
workers, whether actions are allowed, and the event stream as server-sent events.

Admin scope, as every ``/admin`` endpoint (``server.auth.require_admin``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from emailq.models import WorkerRelay
from emailq.queue import HISTORY_MINUTES
from server.auth import AdminDep
from server.deps import QueueDep, SettingsDep, state_of
from server.schemas import iso
from server.sse import event_frames

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

# A stream entry id, "<ms>-<seq>" (or a bare "<ms>"), as the stream gave it to the client.
_EVENT_ID = r"^\d{1,20}(-\d{1,20})?$"


class Minute(BaseModel):
    """Tasks finished in one clock minute."""

    at: str  # the minute's start, RFC 3339
    sent: int
    failed: int


class Throughput(BaseModel):
    """Sent and failed per minute, oldest first; the last minute is the current one."""

    minutes: list[Minute]


class WorkerOut(BaseModel):
    """One live worker."""

    worker_id: str
    last_heartbeat: str
    heartbeat_age_seconds: float
    relay: WorkerRelay | None


class Workers(BaseModel):
    """Workers with a heartbeat within three lease periods, most recent first."""

    workers: list[WorkerOut]


class Permissions(BaseModel):
    """What this API lets an admin do from the dashboard."""

    read_only: bool  # DASHBOARD_READ_ONLY: requeue and cancel answer 403


def _live_window_ms(settings: SettingsDep) -> int:
    # As /admin/stats counts them: a heartbeat every third of a lease, three leases of none.
    return int(3 * settings.job_lease_seconds * 1000)


@router.get("/throughput")
async def throughput(
    queue: QueueDep,
    minutes: Annotated[int, Query(ge=1, le=HISTORY_MINUTES)] = HISTORY_MINUTES,
) -> Throughput:
    """Tasks sent and failed per clock minute, up to the last two hours."""
    counts = await queue.throughput(minutes)
    return Throughput(minutes=[Minute(at=iso(c.minute) or "", sent=c.sent, failed=c.failed)
                               for c in counts])  # fmt: skip


@router.get("/workers")
async def workers(queue: QueueDep, settings: SettingsDep) -> Workers:
    """Live workers with their heartbeat age and relay circuit breaker."""
    found = await queue.workers(live_window_ms=_live_window_ms(settings))
    return Workers(workers=[
        WorkerOut(worker_id=w.worker_id, last_heartbeat=iso(w.last_heartbeat) or "",
                  heartbeat_age_seconds=w.heartbeat_age_seconds, relay=w.relay)
        for w in found
    ])  # fmt: skip


@router.get("/permissions")
async def permissions(settings: SettingsDep) -> Permissions:
    """Whether requeue and cancel are allowed (DASHBOARD_READ_ONLY)."""
    return Permissions(read_only=settings.dashboard_read_only)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "server-sent events: one per state change of a task"}},
)  # fmt: skip
async def events(
    request: Request,
    queue: QueueDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", pattern=_EVENT_ID)] = None,
) -> StreamingResponse:
    """The event stream as server-sent events: from ``Last-Event-ID`` on, else from now."""
    # Read before the response starts, so an unreachable Redis is an ordinary 503.
    after = last_event_id or await queue.last_event_id()
    frames = event_frames(queue, after, state_of(request.app).stopping)
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store",
                                      "X-Accel-Buffering": "no"})  # fmt: skip
