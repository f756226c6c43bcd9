"""Operator endpoints: queue statistics, dead letters, requeue and cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from emailq.models import QueueStats, Status
from server.auth import AdminDep
from server.deps import QueueDep, SettingsDep
from server.errors import Conflict
from server.readonly import WritableDep
from server.schemas import Cancelled, FailedPage, Requeued, RequeueRequest, TaskResult

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses={401: {"description": "API_KEYS is set and no valid key was given"},
               403: {"description": "not an admin key; or API_KEYS is unset and the request "
                                    "is not local (a loopback client, a local Host, no "
                                    "other page's Origin)"}},
)  # fmt: skip
TASK_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "DASHBOARD_READ_ONLY is set (or not an admin; see above)"},
    404: {"description": "unknown task"},
    409: {"description": "the task's state forbids it; task_status names that state"},
}

REQUEUE_CHUNK = 500  # ids per requeue script call: one call must not hold Redis for long


def _missing(task_id: uuid.UUID) -> HTTPException:
    return HTTPException(404, f"no task {task_id} (unknown, or expired after its TTL)")


@router.get("/stats")
async def stats(queue: QueueDep, settings: SettingsDep) -> QueueStats:
    """Depth per priority, scheduled, in flight, live workers, recent sent and failed counts."""
    # A worker heartbeats every third of a lease; three leases without one means it is gone.
    return await queue.stats(live_window_ms=int(3 * settings.job_lease_seconds * 1000))


@router.get("/failed", response_model_exclude_none=True)
async def failed(
    queue: QueueDep,
    # A billion: more dead letters than a Redis holds (each keeps its record), and far from
    # overflowing Redis's 64-bit range end (offset + limit), which answered 500.
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> FailedPage:
    """Failed tasks (dead letters), newest first, with reason and attempt log."""
    # One more than asked tells whether a next page exists without counting them all.
    records = await queue.failed(offset=offset, limit=limit + 1)
    more = len(records) > limit
    return FailedPage(tasks=[TaskResult.of(r) for r in records[:limit]], offset=offset,
                      limit=limit, next_offset=offset + limit if more else None)  # fmt: skip


@router.post("/tasks/{task_id}/requeue", responses=TASK_ERRORS, dependencies=[WritableDep])
async def requeue_task(task_id: uuid.UUID, queue: QueueDep) -> Requeued:
    """Send one failed task again with fresh attempts, keeping its attempt log."""
    record = await queue.get(str(task_id))
    if record is None:
        raise _missing(task_id)
    if record.status != Status.FAILED:
        raise Conflict(f"task {task_id} is {record.status}, not failed", task_status=record.status)
    done = await queue.requeue([str(task_id)])
    if not done:  # it changed in between, or its content is gone
        raise Conflict(f"task {task_id} could not be requeued", task_status=record.status)
    return Requeued(requeued=len(done), task_ids=done)


@router.post("/failed/requeue", dependencies=[WritableDep])
async def requeue_failed(body: RequeueRequest, queue: QueueDep) -> Requeued:
    """Send failed tasks again: the listed ``task_ids`` (others are skipped), or ``all``."""
    ids = await queue.failed_ids() if body.all_ else [str(t) for t in body.task_ids or []]
    done: list[str] = []
    for start in range(0, len(ids), REQUEUE_CHUNK):
        done += await queue.requeue(ids[start : start + REQUEUE_CHUNK])
    return Requeued(requeued=len(done), task_ids=done)


@router.post("/tasks/{task_id}/cancel", responses=TASK_ERRORS, dependencies=[WritableDep])
async def cancel_task(task_id: uuid.UUID, queue: QueueDep) -> Cancelled:
    """Cancel a pending or scheduled task: it ends failed, reason 'cancelled', never sent."""
    outcome = await queue.cancel(str(task_id))
    if outcome == "missing":
        raise _missing(task_id)
    if outcome != "cancelled":
        state = "being sent" if outcome == "sending" else f"already {outcome}"
        raise Conflict(f"task {task_id} is {state}; too late to cancel", task_status=outcome)
    return Cancelled(task_id=str(task_id))
