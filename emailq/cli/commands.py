"""What the CLI's queue commands do, with the same core code the API runs.

Each command takes a ``Context`` (a ready ``Queue`` and an ``Output``), does one job and
returns its exit code; none opens a connection or reads configuration (``emailq.cli`` does
both). Exit codes, for scripts:

    0  done (for ``status``: the task succeeded)
    1  the task failed, input was rejected, or the operation did not apply to some task
    2  ``status``: the task is still pending (after ``--wait``, if given)
    3  no such task: never queued, or removed after RESULT_TTL_SECONDS
    4  Redis could not be reached
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from pydantic import ValidationError

from emailq import submit
from emailq.cli import output
from emailq.cli.output import Output, Progress
from emailq.compose import EmailRequest, TemplateRenderer
from emailq.errors import StoreUnavailable, validation_message
from emailq.labels import LabelFilter
from emailq.models import Status, TaskRecord
from emailq.queue import EnqueueItem, Queue
from emailq.waiting import ResultWaiter

CHUNK = 500  # tasks per Redis round trip in bulk sends and requeues
CHUNK_BYTES = 8 * 1024 * 1024  # and at most this much mail content per round trip


class ExitCode(IntEnum):
    """The process exit codes (see the module docstring)."""

    OK = 0
    FAILED = 1
    PENDING = 2
    UNKNOWN = 3
    UNAVAILABLE = 4


@dataclass(frozen=True)
class Context:
    """What every command gets: the queue, where to write, and the limits that apply."""

    queue: Queue
    out: Output
    limits: submit.Limits  # what bounds the operator's mail (MAX_BODY_BYTES)
    live_window_ms: int  # a worker is live if it sent a heartbeat this recently
    templates: TemplateRenderer | None = None  # TEMPLATES_DIR's, for `send`
    # One per invocation: every task a run queues shares it, so their logs correlate.
    request_id: str = field(default_factory=lambda: "cli-" + uuid.uuid4().hex)


def reason(exc: Exception) -> str:
    """Why a request was rejected, in one line."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'request'}: {validation_message(e)}"
            for e in exc.errors(include_url=False)
        )
    return str(exc)


def prepare(request: EmailRequest, ctx: Context) -> EnqueueItem:
    """``request`` as the operator's task, through the pipeline the API runs; raises one of
    ``submit.REJECTED``."""
    return submit.prepare(request, submit.OPERATOR, datetime.now(UTC), ctx.limits,
                          request_id=ctx.request_id, templates=ctx.templates)  # fmt: skip


# -- send --------------------------------------------------------------------------------


async def send(ctx: Context, fields: dict[str, Any]) -> int:
    """Queue one message given as request fields; print its task id."""
    try:
        item = prepare(EmailRequest.model_validate(fields), ctx)
    except submit.REJECTED as exc:
        ctx.out.error(f"not queued: {reason(exc)}")
        return ExitCode.FAILED
    await ctx.queue.enqueue_many([item])  # the whole item: its labels too
    ctx.out.emit({"task_id": item.task_id, "status": "queued"}, item.task_id)
    return ExitCode.OK


@dataclass
class FileReport:
    """The outcome of ``send --file``: line numbers with task ids, or with reasons."""

    queued: list[tuple[int, str]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


class _FileSender:
    """Validates lines one by one and enqueues the good ones in chunks."""

    def __init__(self, ctx: Context, bar: Progress, chunk_size: int) -> None:
        self.ctx, self.bar, self.chunk_size = ctx, bar, chunk_size
        self.report = FileReport()
        self.batch: list[tuple[int, EnqueueItem]] = []
        self.batch_bytes = 0

    async def line(self, number: int, text: str) -> None:
        if not text.strip():
            self.bar.advance(1)
            return
        try:
            item = prepare(EmailRequest.model_validate_json(text), self.ctx)
        except submit.REJECTED as exc:
            self.report.rejected.append((number, reason(exc)))
            self.bar.advance(1)
            return
        self.batch.append((number, item))
        self.batch_bytes += len(item.job.text) + len(item.job.html or "")
        if len(self.batch) >= self.chunk_size or self.batch_bytes >= CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.batch:
            await self.ctx.queue.enqueue_many([item for _, item in self.batch])
            self.report.queued.extend((number, item.task_id) for number, item in self.batch)
            self.bar.advance(len(self.batch))
        self.batch, self.batch_bytes = [], 0


async def send_file(
    ctx: Context, lines: Iterable[str], total: int | None, *, chunk_size: int = CHUNK
) -> int:
    """Queue one message per JSON line; each is checked on its own, the good ones queued."""
    with ctx.out.progress("sending", total) as bar:
        sender = _FileSender(ctx, bar, chunk_size)
        try:
            for number, text in enumerate(lines, 1):
                await sender.line(number, text)
            await sender.flush()
        except StoreUnavailable as exc:
            _file_report(ctx.out, sender.report)
            ctx.out.error(f"{exc}; stopped after queueing {len(sender.report.queued)} messages")
            return ExitCode.UNAVAILABLE
        except UnicodeDecodeError as exc:
            await sender.flush()
            _file_report(ctx.out, sender.report)
            ctx.out.error(f"the file is not UTF-8 ({exc.reason}); stopped there")
            return ExitCode.FAILED
    _file_report(ctx.out, sender.report)
    return ExitCode.FAILED if sender.report.rejected else ExitCode.OK


def _file_report(out: Output, report: FileReport) -> None:
    queued = [{"line": n, "task_id": t} for n, t in report.queued]
    rejected = [{"line": n, "error": why} for n, why in report.rejected]
    out.emit({"queued": queued, "rejected": rejected},
             output.table(["LINE", "TASK_ID"], report.queued) if report.queued else "")  # fmt: skip
    for number, why in report.rejected:
        out.note(f"line {number}: {why}")
    out.note(f"queued {len(report.queued)}, rejected {len(report.rejected)}")


# -- reading -----------------------------------------------------------------------------


async def _wait(queue: Queue, task_id: str, seconds: float) -> TaskRecord | None:
    waiter = ResultWaiter(queue)
    await waiter.start()
    try:
        return await waiter.wait(task_id, seconds)
    finally:
        await waiter.stop()


async def status(ctx: Context, task_id: str, *, wait: float = 0) -> int:
    """Show one task; with ``wait``, return as soon as it is final or ``wait`` seconds pass."""
    if wait > 0:
        record = await _wait(ctx.queue, task_id, wait)
    else:
        record = await ctx.queue.get(task_id)
    if record is None:
        ctx.out.emit({"task_id": task_id, "status": "unknown"}, "")
        ctx.out.error(f"no task {task_id} (unknown, or expired after its TTL)")
        return ExitCode.UNKNOWN
    ctx.out.emit(output.record_json(record), output.task_text(record))
    codes = {Status.SUCCESS: ExitCode.OK, Status.FAILED: ExitCode.FAILED}
    return codes.get(record.status, ExitCode.PENDING)


async def stats(ctx: Context) -> int:
    """Show depth per priority, scheduled, in flight, live workers and recent throughput."""
    snapshot = await ctx.queue.stats(live_window_ms=ctx.live_window_ms)
    ctx.out.emit(output.stats_json(snapshot), output.stats_text(snapshot))
    return ExitCode.OK


async def failed(
    ctx: Context, *, offset: int = 0, limit: int = 50, keep: LabelFilter | None = None
) -> int:
    """List dead letters, newest first; with ``keep``, only those with its tags and
    metadata (``offset`` then counts every dead letter, matching or not)."""
    data: dict[str, Any] = {"offset": offset, "limit": limit}
    if keep:
        records, data["next_offset"] = await ctx.queue.failed_matching(
            lambda r: keep.matches(r.tags, r.metadata), offset=offset, limit=limit,
            max_scan=1_000_000_000,  # the operator asked for them all, however many it reads
        )  # fmt: skip
    else:
        records = await ctx.queue.failed(offset=offset, limit=limit)
    data["tasks"] = [output.record_json(r) for r in records]
    ctx.out.emit(data, output.failed_text(records))
    return ExitCode.OK


# -- managing ----------------------------------------------------------------------------


async def requeue(
    ctx: Context, task_ids: Sequence[str], *, every_failed: bool = False,
    chunk_size: int = CHUNK,
) -> int:  # fmt: skip
    """Send failed tasks again (these ids, or every dead letter), keeping their history."""
    ids = await ctx.queue.failed_ids() if every_failed else list(dict.fromkeys(task_ids))
    done: list[str] = []
    with ctx.out.progress("requeueing", len(ids)) as bar:
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            done.extend(await ctx.queue.requeue(chunk))
            bar.advance(len(chunk))
    requeued = set(done)
    skipped = [task_id for task_id in ids if task_id not in requeued]
    ctx.out.emit({"requeued": done, "skipped": skipped},
                 f"requeued {len(done)} of {len(ids)}")  # fmt: skip
    for task_id in skipped:
        ctx.out.note(f"not requeued: {task_id} (not failed, unknown, or expired)")
    return ExitCode.FAILED if skipped else ExitCode.OK


_CANCEL_TEXT = {
    "cancelled": "cancelled {id}",
    "sending": "not cancelled: a worker is sending {id} now",
    "missing": "not cancelled: no task {id} (unknown, or expired after its TTL)",
}


async def cancel(ctx: Context, task_id: str) -> int:
    """Cancel a pending or scheduled task; it ends failed with reason 'cancelled'."""
    result = await ctx.queue.cancel(task_id)
    text = _CANCEL_TEXT.get(result, "not cancelled: {id} is already " + result)
    ctx.out.emit({"task_id": task_id, "result": result}, text.format(id=task_id))
    if result == "cancelled":
        return ExitCode.OK
    return ExitCode.UNKNOWN if result == "missing" else ExitCode.FAILED
