"""Leases and unknown outcomes in the worker, against a real Redis and real SMTP servers:
claim replies that come back after their lease (a second worker takes the jobs over
meanwhile), a send the drain cuts off while the relay holds its message, and a task claimed
again before its previous run's done callback came."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from emailq.models import TERMINAL, Job, Status
from emailq.queue import Claim, Queue
from emailq.settings import Settings
from tests.helpers.smtpd import SlowReplyHandler, SmtpServer
from worker.loop import Worker
from worker.sender import Sender, SmtpPool


class LateClaims(Queue):
    """A queue whose first non-empty claim reply reaches the worker ``late`` seconds after
    Redis answered it: a worker paused, or a network path stalled, between the two."""

    late = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered_late = asyncio.Event()
        self._delayed = False

    async def claim(self, worker_id: str, count: int, lease_ms: int) -> Claim:
        claim = await super().claim(worker_id, count, lease_ms)
        if claim.jobs and not self._delayed:
            self._delayed = True
            await asyncio.sleep(self.late)
            self.delivered_late.set()
        return claim


@asynccontextmanager
async def worker_on(queue: Queue, settings: Settings) -> AsyncIterator[Worker]:
    """A worker as ``python -m worker`` composes it, on ``queue``; drained at the end."""
    worker = Worker(queue, Sender(SmtpPool(settings, size=settings.worker_concurrency)), settings)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await queue.close()


def open_queue(settings: Settings, cls: type[Queue] = Queue) -> Queue:
    return cls.from_url(settings.redis_url, timeout=2, read_timeout=10,
                        max_attempts=settings.max_attempts)  # fmt: skip


async def wait_for(check: Callable[[], Any], what: str, within: float = 20) -> None:
    """Poll ``check`` (sync or async) until true; the timeout only bounds a failing test."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_claim_reply_that_comes_after_its_lease_is_not_sent(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(job_lease_seconds=1, worker_concurrency=4)
    producer = open_queue(settings)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in ids:
        await producer.enqueue(task_id, Job(to="u@example.com", subject="s", text="t"),
                               request_id="r")  # fmt: skip

    async def all_claimed() -> bool:
        records = [await producer.get(t) for t in ids]
        return all(r is not None and r.attempts == 1 for r in records)

    async def all_final() -> bool:
        records = [await producer.get(t) for t in ids]
        return all(r is not None and r.status in TERMINAL for r in records)

    late = open_queue(settings, LateClaims)
    assert isinstance(late, LateClaims)
    late.late = 2.5  # well past the 1 s lease
    async with worker_on(late, settings):
        await wait_for(all_claimed, "the first worker's claim")
        # The leases lapse unrenewed (the first worker has not seen its jobs yet); the
        # second worker puts them back, claims and sends them.
        async with worker_on(open_queue(settings), settings):
            await wait_for(all_final, "the second worker to deliver")
            await wait_for(late.delivered_late.is_set, "the late claim reply")
    # Both drained: whatever the first worker did with its late reply is done.

    try:
        received = Counter(smtp.handler.task_ids())
        assert received == Counter(ids), received  # each exactly once
        for task_id in ids:
            record = await producer.get(task_id)
            assert record is not None
            assert record.status is Status.SUCCESS
    finally:
        await producer.close()


async def test_a_send_cut_off_by_the_drain_after_its_message_is_outcome_unknown(
    make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    handler = SlowReplyHandler(silent=1)  # holds the message and never answers
    server = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=server.port, smtp_data_timeout_seconds=60,
                             worker_shutdown_grace_seconds=0.2,
                             on_unknown_outcome="retry")  # fmt: skip
    producer = open_queue(settings)
    task_id = str(uuid.uuid4())
    await producer.enqueue(task_id, Job(to="u@example.com", subject="s", text="t"),
                           request_id="r")  # fmt: skip
    try:
        async with worker_on(open_queue(settings), settings):
            await wait_for(lambda: handler.data_calls == 1, "the message at the relay")
        # Stopped (the drain's grace is spent at once): recorded, not left to a lease lapse.
        record = await producer.get(task_id)
        assert record is not None
        assert record.status is Status.PENDING
        assert [entry.outcome for entry in record.log] == ["outcome_unknown"]
        assert record.next_attempt_at is not None  # ON_UNKNOWN_OUTCOME=retry
    finally:
        await producer.close()


class HeldDoneCallbacks(Worker):
    """The worker as it is, except that while ``hold`` is set the done callback of each send
    (``_forget``) is kept in ``held`` until the test calls it. The event loop runs that
    callback one turn after the send ends; a claim reply read in that turn starts the task's
    next run first. Holding it makes that order certain instead of one run in three."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = True
        self.held: list[tuple[Any, ...]] = []

    def _forget(self, *args: Any) -> None:  # any signature: the test ran on older ones too
        if self.hold:
            self.held.append(args)
        else:
            super()._forget(*args)


async def test_a_run_ending_after_its_task_was_claimed_again_leaves_the_new_run_its_lease(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    # With a shared send rate a throttled mail goes back at once: claimable again at once.
    settings = make_settings(smtp_max_per_second=1000)
    smtp.handler.replies.append("421 4.7.0 Try again later, closing connection")
    queue = open_queue(settings)
    worker = HeldDoneCallbacks(queue, Sender(SmtpPool(settings, size=2)), settings)
    task_id = str(uuid.uuid4())
    await queue.enqueue(task_id, Job(to="u@example.com", subject="s", text="t"), request_id="r")

    async def claim_and_start() -> asyncio.Task[None]:
        sent = time.monotonic()
        claim = await queue.claim(worker.worker_id, 1, worker.lease_ms)
        assert [c.task_id for c in claim.jobs] == [task_id]
        await worker._take(claim, sent)
        return worker._tasks[task_id]

    try:
        first = await claim_and_start()
        await asyncio.wait({first})  # throttled at the end of DATA: deferred, not counted
        assert smtp.handler.data_calls == 1
        assert smtp.handler.received == []
        second = await claim_and_start()
        claimed_again = worker._inflight[task_id]
        # Only now does the first run's done callback come.
        [callback] = worker.held
        worker.hold = False
        worker._forget(*callback)
        assert task_id in worker._lease_until, "the new run's lease deadline was dropped"
        assert worker._inflight.get(task_id) is claimed_again
        assert worker._tasks.get(task_id) is second
        await asyncio.wait({second})
        assert smtp.handler.task_ids() == [task_id]  # sent by the second run, once
        record = await queue.get(task_id)
        assert record is not None
        assert record.status is Status.SUCCESS
        assert record.attempts == 1  # the throttled run used none
        assert [entry.outcome for entry in record.log] == ["deferred", "success"]
    finally:
        await worker.sender.close()
        await queue.close()
