"""Stored-bytes budgets and a full Redis, against real redis-servers.

The budgets (``StoreLimits``) are checked in enqueue.lua and refunded by every path that
ends a task; the tests compare ``{prefix}:stored`` with the job sizes of the tasks still
waiting, after each step. The full-Redis tests run their own server with a small
``maxmemory`` and ``noeviction``, as production should.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from emailq.coalesce import EnqueueCoalescer
from emailq.devtools.redis_server import RedisServer
from emailq.errors import QuotaExceeded, StoreFull, StoreUnavailable
from emailq.models import Attempt, ClaimedJob, Job
from emailq.queue import EnqueueItem, Idempotency, Queue, StoreLimits
from tests.helpers.queues import fill_until_full, memory

LONG = 60_000  # a lease that never lapses during a test (ms)
SHORT = 50  # a lease the test waits out (ms)
SUCCESS = Attempt(attempt=1, outcome="success", code=250, reply="ok")
FAILED = Attempt(attempt=1, outcome="failed", code=550, reply="no such user")
RETRY = Attempt(attempt=1, outcome="retry", code=451, reply="later")


def job(task_id: str, size: int = 100) -> Job:
    return Job(to=f"{task_id}@example.com", subject=task_id, text="x" * size)


def item(task_id: str, quota: str = "key:a", size: int = 100, **fields: int) -> EnqueueItem:
    return EnqueueItem(task_id, job(task_id, size), f"req-{task_id}", quota=quota, **fields)


def job_bytes(entry: EnqueueItem) -> int:
    return len(entry.job.model_dump_json().encode())


async def stored(queue: Queue) -> dict[str, int]:
    raw = await queue.redis.hgetall(queue.keys.stored)
    return {str(k): int(v) for k, v in raw.items()}


async def waiting_bytes(queue: Queue) -> dict[str, int]:
    """What ``{prefix}:stored`` must say: the job sizes of the pending tasks, per owner."""
    totals: Counter[str] = Counter()
    async for key in queue.redis.scan_iter(match=queue.keys.task_prefix + "*"):
        status, owner = await queue.redis.hmget(key, ["status", "quota"])
        if status == "pending":
            size = await queue.redis.hstrlen(key, "job")
            totals["total"] += size
            if owner:
                totals[owner] += size
    return dict(totals)


async def assert_accounted(queue: Queue) -> dict[str, int]:
    now = await stored(queue)
    assert now == await waiting_bytes(queue)
    return now


async def redis_now_ms(queue: Queue) -> int:
    seconds, micros = await queue.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def wait_redis_past(queue: Queue, at_ms: int) -> None:
    deadline = time.monotonic() + 10
    while await redis_now_ms(queue) <= at_ms:
        assert time.monotonic() < deadline, "Redis clock did not advance"
        await asyncio.sleep(0.005)


async def claim_ids(queue: Queue, count: int = 10, lease_ms: int = LONG) -> dict[str, ClaimedJob]:
    return {c.task_id: c for c in (await queue.claim("w1", count, lease_ms)).jobs}


@pytest.fixture
async def limited(redis_url: str) -> AsyncIterator[Queue]:
    """A queue with two attempts and byte budgets large enough not to refuse."""
    limits = StoreLimits(max_stored_bytes=1_000_000, max_stored_bytes_per_key=500_000)
    q = Queue.from_url(redis_url, timeout=2, max_attempts=2, result_ttl_seconds=3600,
                       limits=limits)  # fmt: skip
    yield q
    await q.close()


async def test_counters_follow_every_path_and_return_to_zero(limited: Queue) -> None:
    q = limited
    now = await redis_now_ms(q)
    entries = [item("sent", "key:a"), item("failed", "key:b", 300), item("retried", "key:a"),
               item("requeued", "address:203.0.113.7", 200),
               item("cancelled", "key:a", send_at_ms=now + 3_600_000),
               item("expired", "form:contact", expires_at_ms=now + 30),
               item("cli", "")]  # fmt: skip
    assert await q.enqueue_all([(e, None) for e in entries]) == [None] * len(entries)
    after_enqueue = await assert_accounted(q)
    assert after_enqueue["total"] == sum(job_bytes(e) for e in entries)
    assert after_enqueue["key:a"] == sum(job_bytes(e) for e in entries if e.quota == "key:a")

    assert await q.cancel("cancelled") == "cancelled"
    await assert_accounted(q)
    await wait_redis_past(q, now + 30)
    held = await claim_ids(q)  # fails "expired" instead of handing it out
    assert set(held) == {"sent", "failed", "retried", "requeued", "cli"}
    expired = await q.get("expired")
    assert expired is not None
    assert expired.reason == "expired"
    await assert_accounted(q)

    await q.finish(held["sent"], "success", SUCCESS)
    await q.finish(held["cli"], "success", SUCCESS)
    await q.finish(held["failed"], "failed", FAILED, reason="550")
    await q.finish(held["requeued"], "failed", FAILED, reason="550")
    await q.finish(held["retried"], "retry", RETRY, retry_in_ms=0)
    mid = await assert_accounted(q)
    assert set(mid) == {"total", "key:a"}  # only the retry still waits
    # A dead letter keeps its job for requeue, but no longer counts against anyone.
    assert await q.redis.hexists(q.keys.task("failed"), "job")

    assert await q.requeue(["requeued"]) == ["requeued"]
    assert (await assert_accounted(q))["address:203.0.113.7"] == job_bytes(entries[3])
    deadline = time.monotonic() + 10
    again: dict[str, ClaimedJob] = {}
    while set(again) != {"retried", "requeued"}:
        assert time.monotonic() < deadline, again
        again |= await claim_ids(q)
    for claimed in again.values():
        await q.finish(claimed, "success", SUCCESS)

    # A worker that dies twice: the second lapsed lease fails it (MAX_ATTEMPTS=2).
    await q.enqueue_all([(item("lost", "key:c"), None)])
    for _ in range(2):
        assert len((await q.claim("w1", 1, SHORT)).jobs) == 1
        await wait_redis_past(q, await redis_now_ms(q) + SHORT)
    await q.claim("w1", 1, LONG)
    lost = await q.get("lost")
    assert lost is not None
    assert lost.status == "failed"

    assert await stored(q) == {}


async def test_a_batch_that_would_cross_the_budget_stores_nothing(redis_url: str) -> None:
    limits = StoreLimits(max_stored_bytes_per_key=5_000)
    q = Queue.from_url(redis_url, timeout=2, limits=limits)
    try:
        await q.enqueue_all([(item("first", size=3_000), None)])
        before = sorted(await q.redis.keys("*"))
        counters = await stored(q)
        once = Idempotency(scope="batch:a", key="order-1", fingerprint="f")
        batch = [item("b0", size=1_000), item("b1", size=1_000)]
        with pytest.raises(QuotaExceeded) as refused:
            await q.enqueue_many(batch, once)
        assert (refused.value.held, refused.value.limit) == (counters["key:a"], 5_000)
        assert not refused.value.never_fits
        assert "MAX_STORED_BYTES_PER_KEY" in str(refused.value)
        assert sorted(await q.redis.keys("*")) == before  # no task, no lane entry, no key
        assert await stored(q) == counters
        # Another sender's budget is its own.
        assert await q.enqueue_many([item("other", "key:b", 1_000)]) == [None]
    finally:
        await q.close()


async def test_the_total_budget_refuses_with_store_full(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, limits=StoreLimits(max_stored_bytes=2_000))
    try:
        await q.enqueue_all([(item("a", "key:a", 1_000), None)])
        with pytest.raises(StoreFull, match="MAX_STORED_BYTES"):
            await q.enqueue_all([(item("b", "key:b", 1_000), None)])
        assert await q.get("b") is None
    finally:
        await q.close()


async def test_a_request_larger_than_the_whole_quota_never_fits(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, limits=StoreLimits(max_stored_bytes_per_key=500))
    try:
        with pytest.raises(QuotaExceeded) as refused:
            await q.enqueue_all([(item("big", size=1_000), None)])
        assert refused.value.never_fits
    finally:
        await q.close()


async def test_coalesced_requests_are_budgeted_each_on_their_own(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, limits=StoreLimits(max_stored_bytes_per_key=2_000))
    try:
        await q.enqueue_all([(item("held", "key:b", 1_500), None)])
        coalescer = EnqueueCoalescer(q)
        results = await asyncio.gather(
            *(coalescer.enqueue_once(e, None) for e in
              (item("a1", "key:a", 800), item("b1", "key:b", 800), item("a2", "key:a", 800))),
            return_exceptions=True,
        )  # fmt: skip
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], QuotaExceeded)
        assert await q.get("b1") is None
        await assert_accounted(q)
    finally:
        await q.close()


async def test_a_replay_costs_nothing_even_when_the_quota_is_full(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, limits=StoreLimits(max_stored_bytes_per_key=1_500))
    try:
        once = Idempotency(scope="a", key="k", fingerprint="f")
        assert await q.enqueue_once(item("first", size=1_000), once) is None
        replay = await q.enqueue_once(item("again", size=1_000), once)
        assert replay is not None
        assert replay.task_id == "first"
        with pytest.raises(QuotaExceeded):
            await q.enqueue_once(item("new", size=1_000), None)
    finally:
        await q.close()


# -- a full Redis -------------------------------------------------------------------------

MAXMEMORY = 8 * 1024 * 1024


async def test_headroom_refuses_new_mail_before_redis_is_full(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(maxmemory=MAXMEMORY)
    limits = StoreLimits(memory_headroom=0.25)
    q = Queue.from_url(server.url, timeout=2, limits=limits)
    try:
        accepted, refusal = 0, ""
        while not refusal:
            try:
                await q.enqueue_all([(item(f"t{accepted}", size=20_000), None)])
                accepted += 1
            except StoreFull as exc:
                refusal = str(exc)
        assert "REDIS_MEMORY_HEADROOM" in refusal
        used, maxmemory = memory(server.url)
        assert accepted > 0
        assert used < maxmemory  # refused with room to spare, not by Redis itself
        # That room is for the workers: claims and outcomes still go through.
        drained = 0
        while claimed := (await q.claim("w1", 50, LONG)).jobs:
            for c in claimed:
                assert await q.finish(c, "success", SUCCESS) == "success"
            drained += len(claimed)
        assert drained == accepted
        # Delivered mail freed its content: new mail fits again.
        assert await q.enqueue_all([(item("after", size=20_000), None)]) == [None]
    finally:
        await q.close()


async def test_a_full_redis_refuses_mail_but_still_records_outcomes(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(maxmemory=MAXMEMORY)
    q = Queue.from_url(server.url, timeout=2)  # no headroom: let Redis itself fill up
    try:
        await q.enqueue_all([(item("a"), None), (item("b"), None)])
        held = (await q.claim("w1", 2, LONG)).jobs
        assert fill_until_full(server.url) > 0

        with pytest.raises(StoreFull):
            await q.enqueue_all([(item("new"), None)])
        # A claim is refused like any store outage (StoreFull is a StoreUnavailable) ...
        with pytest.raises(StoreUnavailable):
            await q.claim("w1", 2, LONG)
        # ... but renewals and outcomes get through, so a sent mail is never sent again.
        assert await q.renew(held, LONG, worker_id="w1") == []
        assert await q.finish(held[0], "success", SUCCESS) == "success"
        assert await q.finish(held[1], "failed", FAILED, reason="550") == "failed"
        assert await q.get("new") is None
        assert await stored(q) == {}
    finally:
        await q.close()


async def test_successful_results_can_be_kept_for_less_time(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, result_ttl_seconds=3600, success_ttl_seconds=60)
    try:
        await q.enqueue_all([(item("ok"), None), (item("bad"), None)])
        held = await claim_ids(q)
        await q.finish(held["ok"], "success", SUCCESS)
        await q.finish(held["bad"], "failed", FAILED, reason="550")
        assert 0 < await q.redis.ttl(q.keys.task("ok")) <= 60
        assert 60 < await q.redis.ttl(q.keys.task("bad")) <= 3600  # kept for requeue
    finally:
        await q.close()
