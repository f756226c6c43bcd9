"""Operator endpoints: queue statistics, dead letters, requeue and cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError

from emailq.labels import MAX_TAGS, LabelFilter, Name
from emailq.models import QueueStats, Status
from emailq.queue import Queue
from server.auth import AdminDep
from server.deps import QueueDep, SettingsDep
from server.errors import Conflict
from server.openapi import errors
from server.readonly import WritableDep
from server.schemas import Cancelled, FailedPage, Requeued, RequeueRequest, TaskResult

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses=errors(why={403: "not an admin key; or API_KEYS is unset and the request is "
                               "not local (a loopback client, a local Host, no other page's "
                               "Origin)"}),
)  # fmt: skip
TASK_ERRORS = errors(why={
    403: "DASHBOARD_READ_ONLY is set, or not an admin key (see the router's 403)",
    404: "no such task (unknown, or expired after RESULT_TTL_SECONDS)",
    409: "the task's state forbids it; `task_status` names that state",
})  # fmt: skip
TaskId = Annotated[uuid.UUID, Path(description="the task's id, as the send returned it",
                                   examples=["3f2b8c1e-6d4a-4e8b-9c7f-1a2b3c4d5e6f"])]  # fmt: skip

REQUEUE_CHUNK = 500  # ids per requeue script call: one call must not hold Redis for long
METADATA_PARAM = "metadata."  # ?metadata.order_id=42
FILTER_SCAN = 5000  # dead letters one filtered call reads at most: a bounded call


def _missing(task_id: uuid.UUID) -> HTTPException:
    return HTTPException(404, f"no task {task_id} (unknown, or expired after its TTL)")


@router.get("/stats")
async def stats(queue: QueueDep, settings: SettingsDep) -> QueueStats:
    """Depth per priority, scheduled, in flight, live workers, recent sent and failed counts."""
    # A worker heartbeats every third of a lease; three leases without one means it is gone.
    return await queue.stats(live_window_ms=settings.live_window_ms)


def label_filter(request: Request, tag: list[str]) -> LabelFilter:
    """The dead-letter filter of a request: ``tag`` (repeatable) and ``metadata.<key>=<value>``
    query parameters; 422 for a name that no task could carry."""
    pairs = [(name.removeprefix(METADATA_PARAM), value)
             for name, value in request.query_params.multi_items()
             if name.startswith(METADATA_PARAM)]  # fmt: skip
    try:
        return LabelFilter.parse(tag, pairs)
    except ValueError as exc:
        raise RequestValidationError([{"loc": ("query", "tag"), "msg": str(exc),
                                       "type": "value_error"}]) from None  # fmt: skip


@router.get("/failed", response_model_exclude_none=True)
async def failed(
    queue: QueueDep,
    request: Request,
    # A billion: more dead letters than a Redis holds (each keeps its record), and far from
    # overflowing Redis's 64-bit range end (offset + limit), which answered 500.
    offset: Annotated[
        int, Query(ge=0, le=1_000_000_000, description="dead letters to skip, newest first")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="dead letters on this page")] = 50,
    tag: Annotated[list[Name], Query(max_length=MAX_TAGS, description=(
        "only tasks with this tag (repeatable: all of them). metadata.<key>=<value> "
        "parameters keep only tasks whose metadata has that key at that value"),
        examples=[["signup"]])] = [],  # noqa: B006  # FastAPI copies defaults
) -> FailedPage:  # fmt: skip
    """Failed tasks (dead letters), newest first, with reason and attempt log; filtered by
    ``tag`` and ``metadata.<key>=<value>`` if given."""
    keep = label_filter(request, tag)
    if keep:
        return await _failed_matching(queue, keep, offset, limit)
    # One more than asked tells whether a next page exists without counting them all.
    records = await queue.failed(offset=offset, limit=limit + 1)
    more = len(records) > limit
    return FailedPage(tasks=[TaskResult.of(r) for r in records[:limit]], offset=offset,
                      limit=limit, next_offset=offset + limit if more else None)  # fmt: skip


async def _failed_matching(queue: Queue, keep: LabelFilter, offset: int, limit: int) -> FailedPage:
    """A filtered page: ``offset`` and ``next_offset`` are positions in the whole list, and
    one call reads at most ``FILTER_SCAN`` dead letters, so a page may hold fewer than
    ``limit`` tasks (even none) and still have a next one."""
    records, next_offset = await queue.failed_matching(
        lambda r: keep.matches(r.tags, r.metadata), offset=offset, limit=limit,
        max_scan=FILTER_SCAN,
    )  # fmt: skip
    return FailedPage(tasks=[TaskResult.of(r) for r in records], offset=offset, limit=limit,
                      next_offset=next_offset)  # fmt: skip


@router.post("/tasks/{task_id}/requeue", responses=TASK_ERRORS, dependencies=[WritableDep])
async def requeue_task(task_id: TaskId, queue: QueueDep) -> Requeued:
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
async def cancel_task(task_id: TaskId, queue: QueueDep) -> Cancelled:
    """Cancel a pending or scheduled task: it ends failed, reason 'cancelled', never sent."""
    outcome = await queue.cancel(str(task_id))
    if outcome == "missing":
        raise _missing(task_id)
    if outcome != "cancelled":
        state = "being sent" if outcome == "sending" else f"already {outcome}"
        raise Conflict(f"task {task_id} is {state}; too late to cancel", task_status=outcome)
    return Cancelled(task_id=str(task_id))
