"""emailq.queue.Queue against a real redis-server: every key, every Lua script."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from emailq.coalesce import FinishCoalescer
from emailq.errors import StoreUnavailable
from emailq.models import Attempt, ClaimedJob, Job, Status
from emailq.queue import EnqueueItem, Finish, Outcome, Queue, Refill
from tests.helpers.ports import refused_redis_url
from tests.helpers.queues import LONG, TTL, job, open_queue, redis_now_ms

SHORT = 50  # a lease the test waits out (ms)


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    q = open_queue(redis_url)
    yield q
    await q.close()


# -- helpers -----------------------------------------------------------------------------


async def enqueue(queue: Queue, count: int = 1, prefix: str = "t") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    for task_id in ids:
        await queue.enqueue(task_id, job(task_id), request_id=f"req-{task_id}")
    return ids


async def claim(
    queue: Queue, worker: str = "w1", count: int = 5, lease_ms: int = LONG
) -> list[ClaimedJob]:
    return (await queue.claim(worker, count, lease_ms)).jobs


async def claim_one(queue: Queue, worker: str = "w1", lease_ms: int = LONG) -> ClaimedJob:
    jobs = await claim(queue, worker, 1, lease_ms)
    assert len(jobs) == 1
    return jobs[0]


async def eventually_claim(queue: Queue, worker: str, lease_ms: int = LONG) -> ClaimedJob:
    """Poll until a claim returns a job (a retry coming due); the deadline only bounds a
    failing test."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = await claim(queue, worker, 1, lease_ms)
        if jobs:
            return jobs[0]
        await asyncio.sleep(0.005)
    raise AssertionError("nothing became claimable")


async def wait_lapsed(queue: Queue, task_id: str) -> None:
    """Wait until the lease on ``task_id`` is past its deadline by Redis's own clock."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        score = await queue.redis.zscore(queue.keys.leases, task_id)
        if score is None or await redis_now_ms(queue) > score:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"lease on {task_id} never lapsed")


async def finish(
    queue: Queue,
    claimed: ClaimedJob,
    outcome: Outcome,
    reason: str = "",
    retry_in_ms: int = 0,
    duration_ms: float | None = None,
) -> str:
    entry = Attempt(attempt=claimed.attempt, outcome=outcome, code=250, reply="ok",
                    duration_ms=duration_ms)  # fmt: skip
    return await queue.finish(claimed, outcome, entry, reason=reason, retry_in_ms=retry_in_ms)


async def task_hash(queue: Queue, task_id: str) -> dict[str, str]:
    stored = await queue.redis.hgetall(queue.keys.task(task_id))
    return {str(k): str(v) for k, v in stored.items()}


async def lane(queue: Queue) -> list[str]:
    return [str(v) for v in await queue.redis.lrange(queue.keys.lane("default"), 0, -1)]


async def all_keys(queue: Queue) -> list[str]:
    return [str(key) for key in await queue.redis.keys("*")]


async def lease_deadline(queue: Queue, task_id: str) -> float:
    score = await queue.redis.zscore(queue.keys.leases, task_id)
    assert score is not None
    return float(score)


async def ttl(queue: Queue, task_id: str) -> int:
    return int(await queue.redis.ttl(queue.keys.task(task_id)))


async def snapshot(queue: Queue, task_id: str) -> tuple[object, ...]:
    """Everything the queue stores about one task, to compare before and after."""
    r, k = queue.redis, queue.keys
    return (
        await task_hash(queue, task_id),
        await r.zscore(k.leases, task_id),
        await r.zscore(k.scheduled, task_id),
        await lane(queue),
    )


async def outcomes(queue: Queue, task_id: str) -> list[str]:
    record = await queue.get(task_id)
    assert record is not None
    return [entry.outcome for entry in record.log]


# -- enqueue and get ---------------------------------------------------------------------


async def test_enqueue_stores_the_task_and_makes_it_ready(queue: Queue) -> None:
    created = await queue.enqueue("t1", job("t1"), request_id="req-1")
    stored = await task_hash(queue, "t1")
    assert stored["status"] == "pending"
    assert stored["attempts"] == "0"
    assert stored["to"] == "t1@example.com"
    assert stored["created_at"] == str(created)
    assert Job.model_validate_json(stored["job"]) == job("t1")
    assert await lane(queue) == ["t1"]
    assert await ttl(queue, "t1") == -1  # pending tasks never expire
    record = await queue.get("t1")
    assert record is not None
    assert (record.status, record.attempts, record.request_id) == (Status.PENDING, 0, "req-1")
    assert record.log == []


async def test_enqueue_is_atomic_to_an_observer(queue: Queue) -> None:
    """A reader never sees a stored task that is not in its lane, or the other way round."""
    done = asyncio.Event()
    seen = 0

    async def observe() -> None:
        nonlocal seen
        while not done.is_set():
            async with queue.redis.pipeline(transaction=True) as pipe:
                pipe.keys(queue.keys.task_prefix + "*")
                pipe.lrange(queue.keys.lane("default"), 0, -1)
                keys, ready = await pipe.execute()
            assert {key.removeprefix(queue.keys.task_prefix) for key in keys} == set(ready)
            seen += 1
            await asyncio.sleep(0)

    async def produce() -> None:
        await asyncio.gather(*(enqueue(queue, 25, prefix=f"p{n}-") for n in range(4)))
        done.set()

    await asyncio.gather(observe(), produce())
    assert seen > 0
    assert len(await lane(queue)) == 100


async def test_get_of_an_unknown_task_is_none(queue: Queue) -> None:
    assert await queue.get("no-such-task") is None


async def test_unreachable_redis_is_store_unavailable() -> None:
    with refused_redis_url() as url:
        q = Queue.from_url(url, timeout=0.5)
        try:
            with pytest.raises(StoreUnavailable):
                await q.ping()
            with pytest.raises(StoreUnavailable):
                await q.enqueue("t1", job("t1"), request_id="")
        finally:
            await q.close()


# -- claim -------------------------------------------------------------------------------


async def test_claim_leases_the_job(queue: Queue) -> None:
    await enqueue(queue)
    claimed = await queue.claim("w1", 5, 1000)
    [one] = claimed.jobs
    assert (one.task_id, one.attempt, one.request_id) == ("t0", 1, "req-t0")
    assert one.token
    assert one.job == job("t0")
    assert await queue.redis.zscore(queue.keys.leases, "t0") is not None
    assert claimed.next_deadline_ms is not None
    assert 0 <= claimed.next_deadline_ms <= 1000
    stored = await task_hash(queue, "t0")
    assert (stored["status"], stored["attempts"], stored["lease"]) == ("pending", "1", one.token)
    assert await ttl(queue, "t0") == -1
    assert await lane(queue) == []


async def test_claim_of_an_empty_queue_returns_nothing(queue: Queue) -> None:
    claimed = await queue.claim("w1", 5, LONG)
    assert (claimed.jobs, claimed.next_deadline_ms) == ([], None)


async def test_claim_takes_oldest_first_up_to_count(queue: Queue) -> None:
    await enqueue(queue, 3)
    assert [c.task_id for c in await claim(queue, count=2)] == ["t0", "t1"]
    assert await lane(queue) == ["t2"]


async def test_every_task_is_claimed_exactly_once(queue: Queue) -> None:
    ids = await enqueue(queue, 200)

    async def claim_until_empty(worker: str) -> list[ClaimedJob]:
        got: list[ClaimedJob] = []
        while batch := await claim(queue, worker, count=5):
            got += batch
        return got

    results = await asyncio.gather(*(claim_until_empty(f"w{n}") for n in range(8)))
    everything = [c for batch in results for c in batch]
    counts = Counter(c.task_id for c in everything)
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    assert {c.attempt for c in everything} == {1}
    assert all(
        [await queue.redis.hget(queue.keys.task(c.task_id), "lease") == c.token for c in everything]
    )
    assert await queue.redis.zcard(queue.keys.leases) == 200
    assert await queue.redis.llen(queue.keys.wake) == 0  # one wake token per ready task


async def test_wait_for_work_wakes_for_an_enqueued_task(queue: Queue) -> None:
    await enqueue(queue)
    assert await queue.wait_for_work(1.0) is True


# -- finish ------------------------------------------------------------------------------


async def test_finish_success_records_and_expires(queue: Queue) -> None:
    await enqueue(queue)
    claimed = await claim_one(queue)
    assert await finish(queue, claimed, "success") == "success"
    stored = await task_hash(queue, "t0")
    assert stored["status"] == "success"
    assert "sent_at" in stored
    assert "job" not in stored  # delivered content is not kept
    assert "lease" not in stored
    assert 0 < await ttl(queue, "t0") <= TTL
    assert await queue.redis.zscore(queue.keys.leases, "t0") is None
    record = await queue.get("t0")
    assert record is not None
    assert record.sent_at is not None
    assert record.sent_at >= record.created_at
    [entry] = record.log
    assert (entry.attempt, entry.outcome, entry.code) == (1, "success", 250)
    assert entry.at >= record.created_at  # stamped by Redis, not the caller's 0


async def test_finish_failed_records_the_reason_and_expires(queue: Queue) -> None:
    await enqueue(queue)
    claimed = await claim_one(queue)
    assert await finish(queue, claimed, "failed", reason="550 no such user") == "failed"
    record = await queue.get("t0")
    assert record is not None
    assert (record.status, record.reason) == (Status.FAILED, "550 no such user")
    assert 0 < await ttl(queue, "t0") <= TTL
    assert await queue.redis.zscore(queue.keys.leases, "t0") is None


async def test_retry_is_not_claimable_until_due(queue: Queue) -> None:
    await enqueue(queue, 2)
    late, soon = await claim(queue, count=2)
    assert await finish(queue, late, "retry", retry_in_ms=LONG) == "retry"
    assert await finish(queue, soon, "retry", retry_in_ms=20) == "retry"

    record = await queue.get(late.task_id)
    assert record is not None
    assert record.status is Status.PENDING
    assert record.next_attempt_at == await queue.redis.zscore(queue.keys.scheduled, "t0")
    assert await ttl(queue, late.task_id) == -1
    assert await queue.redis.zscore(queue.keys.leases, late.task_id) is None

    again = await eventually_claim(queue, "w2")
    assert (again.task_id, again.attempt) == (soon.task_id, 2)
    assert "next_attempt_at" not in await task_hash(queue, soon.task_id)
    # The late one is still waiting, and claim says how long until it is due.
    claimed = await queue.claim("w2", 5, LONG)
    assert claimed.jobs == []
    assert claimed.next_deadline_ms is not None
    assert 0 < claimed.next_deadline_ms <= LONG
    assert await queue.redis.zscore(queue.keys.scheduled, late.task_id) is not None


async def test_attempt_log_keeps_the_newest_fifty(queue: Queue) -> None:
    await enqueue(queue)
    claimed = await claim_one(queue)
    for _ in range(54):
        assert await finish(queue, claimed, "retry", retry_in_ms=0) == "retry"
        claimed = await eventually_claim(queue, "w1")
    await finish(queue, claimed, "success")
    record = await queue.get("t0")
    assert record is not None
    assert [entry.attempt for entry in record.log] == list(range(6, 56))
    assert record.log[-1].outcome == "success"


# -- leases ------------------------------------------------------------------------------


async def lapse_and_reclaim(queue: Queue, held: ClaimedJob, worker: str) -> ClaimedJob:
    await wait_lapsed(queue, held.task_id)
    return await claim_one(queue, worker, lease_ms=SHORT)


async def test_lapsed_lease_is_recovered_by_another_worker(queue: Queue) -> None:
    await enqueue(queue)
    first = await claim_one(queue, "w1", lease_ms=SHORT)
    second = await lapse_and_reclaim(queue, first, "w2")
    assert (second.task_id, second.attempt) == ("t0", 2)
    assert second.token != first.token
    assert (await task_hash(queue, "t0"))["lease"] == second.token
    record = await queue.get("t0")
    assert record is not None
    [entry] = record.log
    assert (entry.outcome, entry.attempt) == ("lease_expired", 1)
    assert entry.reply == "worker w1 stopped renewing its lease"


async def test_a_claim_names_the_workers_whose_leases_it_found_lapsed(queue: Queue) -> None:
    await enqueue(queue, 3)
    dead = "host:4242:a1b2c3"  # a worker id as new_worker_id makes it: colons inside
    held = await claim(queue, dead, count=2, lease_ms=SHORT)
    survivor = await claim_one(queue, "w2", lease_ms=LONG)
    for job_ in held:
        await wait_lapsed(queue, job_.task_id)
    # The refill of a finish puts them back and names their worker, once.
    entry = Attempt(attempt=survivor.attempt, outcome="success", code=250, reply="ok")
    _, refill = await queue.finish_and_claim(survivor, "success", entry, Refill("w2", 1, LONG))
    assert refill.lapsed_from == [dead, dead]
    assert len(refill.jobs) == 1
    assert (await queue.claim("w2", 5, LONG)).lapsed_from == []  # nothing lapsed since


@pytest.mark.parametrize("beating", [False, True])
async def test_a_worker_whose_lease_lapsed_leaves_the_live_list_unless_it_beats(
    queue: Queue, beating: bool
) -> None:
    await enqueue(queue)
    await queue.renew([], SHORT, worker_id="dead")  # a heartbeat: it is listed
    held = await claim_one(queue, "dead", lease_ms=SHORT)
    await wait_lapsed(queue, held.task_id)
    await asyncio.sleep(SHORT / 1000)  # its heartbeat a lease old too (by Redis's clock)
    if beating:  # alive, one lease lost (it stalled): its heartbeat keeps it listed
        await queue.renew([], SHORT, worker_id="dead")
    assert (await queue.claim("w2", 1, SHORT)).lapsed_from == ["dead"]
    listed = [w.worker_id for w in await queue.workers(live_window_ms=3_600_000)]
    assert ("dead" in listed) is beating


async def test_lapsed_lease_on_the_last_attempt_fails_the_task(queue: Queue) -> None:
    await enqueue(queue)
    held = await claim_one(queue, "w0", lease_ms=SHORT)
    for n in (1, 2):
        held = await lapse_and_reclaim(queue, held, f"w{n}")
    assert held.attempt == 3
    await wait_lapsed(queue, "t0")
    assert await claim(queue, "w3") == []
    record = await queue.get("t0")
    assert record is not None
    assert record.status is Status.FAILED
    assert record.reason is not None
    assert "lease" in record.reason
    assert await outcomes(queue, "t0") == ["lease_expired"] * 3
    assert 0 < await ttl(queue, "t0") <= TTL
    assert await lane(queue) == []


@pytest.mark.parametrize("outcome", ["retry", "failed"])
async def test_stale_finish_changes_nothing(queue: Queue, outcome: Outcome) -> None:
    await enqueue(queue)
    old = await claim_one(queue, "w1", lease_ms=SHORT)
    await lapse_and_reclaim(queue, old, "w2")
    before = await snapshot(queue, "t0")
    assert await finish(queue, old, outcome, reason="late", retry_in_ms=0) == "stale"
    assert await snapshot(queue, "t0") == before


async def test_late_success_from_an_old_lease_wins(queue: Queue) -> None:
    await enqueue(queue)
    old = await claim_one(queue, "w1", lease_ms=SHORT)
    new = await lapse_and_reclaim(queue, old, "w2")
    assert await finish(queue, old, "success") == "success"
    assert await queue.renew([new], LONG, worker_id="w") == ["t0"]
    assert await finish(queue, new, "failed", reason="x") == "ignored"
    record = await queue.get("t0")
    assert record is not None
    assert record.status is Status.SUCCESS


@pytest.mark.parametrize("outcome", ["success", "retry", "failed"])
async def test_a_finish_for_a_task_redis_no_longer_has_is_missing_and_stores_nothing(
    queue: Queue, outcome: Outcome
) -> None:
    # Redis restarted without its data while the mail was out: not another worker's lease
    # ('stale' or 'ignored' made the worker warn of a duplicate), and nothing is recreated.
    await enqueue(queue)
    claimed = await claim_one(queue)
    await queue.redis.delete(queue.keys.task("t0"))
    assert await finish(queue, claimed, outcome, retry_in_ms=60_000) == "missing"
    assert await task_hash(queue, "t0") == {}
    assert await queue.redis.zscore(queue.keys.leases, "t0") is None


@pytest.mark.parametrize("outcome", ["success", "retry", "failed"])
async def test_a_finish_run_again_after_its_reply_was_lost_answers_as_its_first_run(
    queue: Queue, outcome: Outcome
) -> None:
    # A worker whose finish timed out after Redis ran it sends the same call again. It must
    # hear what its first run did, not "ignored" or "stale": those say the lease was lost,
    # and for a success the worker then warns of a duplicate that never went out.
    await enqueue(queue)
    claimed = await claim_one(queue)
    run = functools.partial(finish, queue, claimed, outcome, reason="why", retry_in_ms=60_000,
                            duration_ms=12.34)  # fmt: skip
    assert await run() == outcome
    before = await snapshot(queue, "t0")
    assert await run() == outcome
    assert await snapshot(queue, "t0") == before
    assert await outcomes(queue, "t0") == [outcome]


async def test_a_retry_run_again_after_the_next_claim_leaves_that_claim_alone(
    queue: Queue,
) -> None:
    await enqueue(queue)
    first = await claim_one(queue, "w1")
    assert await finish(queue, first, "retry", duration_ms=3.5) == "retry"
    second = await eventually_claim(queue, "w2")
    before = await snapshot(queue, "t0")
    assert await finish(queue, first, "retry", duration_ms=3.5) == "retry"
    assert await snapshot(queue, "t0") == before
    assert (await task_hash(queue, "t0"))["lease"] == second.token


async def test_a_record_that_is_not_the_calls_own_is_still_refused(queue: Queue) -> None:
    # The same worker and attempt, but not the entry that was recorded (its duration was
    # measured once): not a replay. Nor is a retry of an attempt whose lease lapsed.
    await enqueue(queue)
    claimed = await claim_one(queue, "w1", lease_ms=SHORT)
    await wait_lapsed(queue, "t0")
    assert await claim(queue, "w2", count=0) == []  # logs the lapse as lease_expired
    assert await finish(queue, claimed, "retry", duration_ms=1.0) == "stale"
    assert await finish(queue, claimed, "success", duration_ms=1.0) == "success"
    assert await finish(queue, claimed, "success", duration_ms=1.01) == "ignored"
    assert await outcomes(queue, "t0") == ["lease_expired", "success"]


async def test_late_success_while_requeued_is_never_claimed_again(queue: Queue) -> None:
    await enqueue(queue)
    old = await claim_one(queue, "w1", lease_ms=SHORT)
    await wait_lapsed(queue, "t0")
    assert await claim(queue, "w2", count=0) == []  # recovers the lapsed lease only
    assert await lane(queue) == ["t0"]
    assert await finish(queue, old, "success") == "success"
    assert await claim(queue, "w2") == []
    assert await lane(queue) == []
    record = await queue.get("t0")
    assert record is not None
    assert (record.status, record.attempts) == (Status.SUCCESS, 1)


@pytest.mark.parametrize("outcome", ["success", "failed"])
async def test_done_task_pushed_into_the_lane_again_is_skipped(
    queue: Queue, outcome: Outcome
) -> None:
    await enqueue(queue)
    await finish(queue, await claim_one(queue), outcome)
    before = await task_hash(queue, "t0")
    await queue.redis.rpush(queue.keys.lane("default"), "t0")
    assert await claim(queue) == []
    assert await task_hash(queue, "t0") == before
    assert await lane(queue) == []


async def test_renew_extends_held_leases_and_reports_lost_ones(queue: Queue) -> None:
    await enqueue(queue, 2)
    mine, other = await claim(queue, count=2, lease_ms=1000)
    before = await lease_deadline(queue, "t1")
    forged = other.model_copy(update={"token": "w9:1"})
    assert await queue.renew([mine, forged], LONG, worker_id="w") == ["t1"]
    assert await lease_deadline(queue, "t0") > before + LONG / 2
    assert await lease_deadline(queue, "t1") == before
    assert await queue.renew([], LONG, worker_id="w") == []


async def test_release_returns_unstarted_jobs_uncounted(queue: Queue) -> None:
    await enqueue(queue, 3)
    first, second, third = await claim(queue, count=3)
    forged = third.model_copy(update={"token": "w9:1"})
    assert await queue.release([first, second, forged], worker_id="w") == 2
    assert sorted(await lane(queue)) == ["t0", "t1"]
    stored = await task_hash(queue, "t0")
    assert stored["attempts"] == "0"
    assert "lease" not in stored
    assert await queue.redis.zscore(queue.keys.leases, "t0") is None
    assert await queue.redis.zscore(queue.keys.leases, "t2") is not None
    assert {(c.task_id, c.attempt) for c in await claim(queue)} == {("t0", 1), ("t1", 1)}
    assert await queue.release([], worker_id="w") == 0


# -- keys --------------------------------------------------------------------------------


async def test_every_key_shares_the_hash_tag(queue: Queue) -> None:
    await enqueue(queue, 4)
    ok, retried, failed, lapsed = await claim(queue, count=3) + await claim(queue, lease_ms=SHORT)
    await finish(queue, ok, "success")
    await finish(queue, retried, "retry", retry_in_ms=LONG)
    await finish(queue, failed, "failed", reason="550")
    await wait_lapsed(queue, lapsed.task_id)
    await enqueue(queue, 1, prefix="extra")
    released = await claim(queue, "w2", count=1)
    await queue.release(released, worker_id="w")
    await queue.renew(released, LONG, worker_id="w")
    keys = await all_keys(queue)
    assert len(keys) >= 6  # tasks, lane, scheduled, wake at least
    assert all(key.startswith("{emailq}:") for key in keys), keys


async def test_a_custom_prefix_is_its_own_hash_tag(queue: Queue) -> None:
    other = Queue(queue.redis, prefix="other")
    await enqueue(other)
    await claim(other)
    keys = await all_keys(queue)
    assert keys
    assert all(key.startswith("{other}:") for key in keys), keys


async def test_log_is_json_in_the_task_hash(queue: Queue) -> None:
    await enqueue(queue)
    await finish(queue, await claim_one(queue), "failed", reason="550")
    log = json.loads((await task_hash(queue, "t0"))["log"])
    assert [entry["outcome"] for entry in log] == ["failed"]


async def test_a_batch_is_one_script_call(queue: Queue) -> None:
    await enqueue(queue, 1, prefix="warm")  # loads the script
    before = (await queue.redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    items = [EnqueueItem(f"b{i}", job(f"b{i}"), request_id="req") for i in range(10)]
    assert await queue.enqueue_many(items) == [None] * 10
    after = (await queue.redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert after - before == 1
    assert await lane(queue) == ["warm0", *(f"b{i}" for i in range(10))]


async def test_finish_and_claim_records_then_hands_over_the_next_task(queue: Queue) -> None:
    await enqueue(queue, 2)
    first = await claim_one(queue, "w1")
    await queue.enqueue("urgent", job("urgent"), request_id="r", lane="high")
    entry = Attempt(attempt=first.attempt, outcome="success", code=250, reply="ok")
    refill = Refill(worker_id="w1", count=1, lease_ms=LONG)

    applied, more = await queue.finish_and_claim(first, "success", entry, refill)

    assert applied == "success"
    assert (await task_hash(queue, "t0"))["status"] == "success"
    [taken] = more.jobs  # the claim is a normal one: the high lane comes first
    assert taken.task_id == "urgent"
    assert taken.token.startswith("w1:1:")  # worker, attempt, then the claim's own id
    assert (await task_hash(queue, "urgent"))["lease"] == taken.token
    assert await queue.redis.zscore(queue.keys.leases, "urgent") is not None
    assert await lane(queue) == ["t1"]


async def evalsha_calls(queue: Queue) -> int:
    return int((await queue.redis.info("commandstats"))["cmdstat_evalsha"]["calls"])


def _outcomes(prefix: str) -> list[tuple[str, Outcome, int]]:
    # task id, outcome, retry delay: a success, a retry and a failure
    return [(f"{prefix}0", "success", 0), (f"{prefix}1", "retry", 60_000),
            (f"{prefix}2", "failed", 0)]  # fmt: skip


async def _finishes(queue: Queue, prefix: str, refill: Refill | None) -> list[Finish]:
    await enqueue(queue, 3, prefix)
    held = {c.task_id: c for c in await claim(queue, "w1", 3)}
    return [Finish(held[tid], outcome, Attempt(attempt=1, outcome=outcome, code=250,
                                                  reply="r"), "why", delay, refill)
            for tid, outcome, delay in _outcomes(prefix)]  # fmt: skip


def _per_task(events: list[Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """Each task's events as the stream has them, without the parts that differ between
    two runs (entry id, time, the task id's own prefix)."""
    return [(e.task_id[len(prefix) :], e.model_dump(exclude={"id", "time", "task_id",
                                                             "request_id"}))
            for e in events if e.task_id.startswith(prefix)]  # fmt: skip


async def test_finish_many_records_each_as_a_lone_finish_would_in_one_call(
    queue: Queue,
) -> None:
    # The reference: the same three outcomes, one script call each.
    lone, batch = await _finishes(queue, "a", None), await _finishes(queue, "b", None)
    mark = (await queue.events(count=10_000))[-1].id
    for done in lone:
        await queue.finish(done.held, done.outcome, done.attempt, reason=done.reason,
                           retry_in_ms=done.retry_in_ms)  # fmt: skip
    before = await evalsha_calls(queue)

    shares = await queue.finish_many(batch)

    assert await evalsha_calls(queue) - before == 1
    assert shares == [("success", None), ("retry", None), ("failed", None)]
    events = [e for e in await queue.events(count=10_000) if e.id > mark]
    reference = _per_task(events, "a")
    assert [entry["type"] for _, entry in reference] == ["sent", "retry", "failed"]
    assert _per_task(events, "b") == reference
    for tid, outcome, _ in _outcomes("b"):
        record = await task_hash(queue, tid)
        assert record["status"] == ("pending" if outcome == "retry" else outcome)
        assert "lease" not in record
        assert await queue.redis.zscore(queue.keys.leases, tid) is None


async def test_finish_many_splits_one_claim_between_the_refills_in_order(
    queue: Queue,
) -> None:
    batch = await _finishes(queue, "t", None)
    await enqueue(queue, 2, "n")  # two to claim, for three refills of one each
    refill = Refill("w1", 1, LONG)
    batch = [replace(batch[0], refill=refill), batch[1], replace(batch[2], refill=refill)]
    stale = await claim(queue, "w2", 0)  # nothing: w1 holds t0-t2
    assert stale == []

    shares = await queue.finish_many([*batch, replace(batch[2], refill=refill)])

    # The fourth is the third run again: answered as the third was (own_record), and it
    # still gets its refill's share.
    assert [applied for applied, _ in shares] == ["success", "retry", "failed", "failed"]
    claims = [claim for _, claim in shares]
    assert claims[1] is None  # no refill asked
    assert [[c.task_id for c in cl.jobs] for cl in claims if cl is not None] == [["n0"], ["n1"], []]
    assert (await task_hash(queue, "n1"))["lease"].startswith("w1:")


async def test_finish_many_refuses_refills_for_two_workers(queue: Queue) -> None:
    batch = await _finishes(queue, "t", None)
    mixed = [replace(batch[0], refill=Refill("w1", 1, LONG)),
             replace(batch[1], refill=Refill("w2", 1, LONG))]  # fmt: skip
    with pytest.raises(ValueError, match="one worker"):
        await queue.finish_many(mixed)


async def test_finish_coalescer_sends_the_finishes_that_wait_as_one_call(queue: Queue) -> None:
    # Three sends end while a first finish is in flight: the three go in the next call.
    first, *rest = await _finishes(queue, "t", None)
    others = await _finishes(queue, "u", None)
    coalescer = FinishCoalescer(queue)
    before = await evalsha_calls(queue)

    shares = await asyncio.gather(*(coalescer.finish(d) for d in [first, *rest, *others]))

    assert [applied for applied, _ in shares] == ["success", "retry", "failed"] * 2
    assert await evalsha_calls(queue) - before == 1  # all queued before the flush ran


async def test_finish_coalescer_hands_a_redis_error_to_each_finish() -> None:
    token = "w1:1:1764763200000000"  # noqa: S105 (a lease token, not a secret)
    claimed = ClaimedJob(task_id="t0", token=token, attempt=1, job=job("t0"), request_id=None)
    done = Finish(claimed, "success", Attempt(attempt=1, outcome="success"))
    with refused_redis_url() as url:
        queue = Queue.from_url(url, timeout=0.5)
        try:
            coalescer = FinishCoalescer(queue)
            calls = [coalescer.finish(done) for _ in range(3)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await queue.close()
    assert len(results) == 3
    assert all(isinstance(r, StoreUnavailable) for r in results)


async def test_finish_and_claim_with_a_stale_lease_still_claims(queue: Queue) -> None:
    await enqueue(queue, 2)
    old = await claim_one(queue, "w1", lease_ms=SHORT)
    await wait_lapsed(queue, "t0")
    await claim_one(queue, "w2")  # t0 went back to the front, and w2 took it
    entry = Attempt(attempt=old.attempt, outcome="retry", reply="451")
    applied, more = await queue.finish_and_claim(
        old, "retry", entry, Refill("w1", 1, LONG), retry_in_ms=0
    )
    assert applied == "stale"  # w2's attempt is untouched
    assert (await task_hash(queue, "t0"))["lease"].startswith("w2:")
    assert [c.task_id for c in more.jobs] == ["t1"]


async def test_an_unreadable_job_is_set_aside_and_the_rest_of_the_claim_goes_ahead(
    queue: Queue,
) -> None:
    await enqueue(queue, 3)
    # As if written by an incompatible version: the stored job no longer parses.
    await queue.redis.hset(queue.keys.task("t1"), "job", '{"to": 42}')
    got = await queue.claim("w1", 5, LONG)
    assert [c.task_id for c in got.jobs] == ["t0", "t2"]
    [lost] = got.unreadable
    assert lost.task_id == "t1"
    assert lost.attempt == 1
    assert "unreadable" in lost.error

    assert await queue.fail_unreadable(lost) == "failed"
    record = await queue.get("t1")
    assert record is not None
    assert record.status is Status.FAILED
    assert record.reason is not None
    assert "unreadable" in record.reason
    assert [f.task_id for f in await queue.failed()] == ["t1"]
    assert await queue.redis.zscore(queue.keys.leases, "t1") is None


async def test_an_enqueue_run_twice_stores_and_queues_each_task_once(queue: Queue) -> None:
    # What a client's retry after a lost reply does: the same call reaches Redis again. A
    # second copy in the lane would be claimed, and sent, a second time.
    encoded = [queue.encode_task(EnqueueItem(t, job(t), "req"), None) for t in ("a", "b")]
    first = await queue.store_encoded(encoded)
    again = await queue.store_encoded(encoded)
    assert first == again == [None, None]
    ready = await queue.redis.lrange(queue.keys.lane("default"), 0, -1)
    assert ready == ["a", "b"]
    claim = await queue.claim("w", 10, 10_000)
    assert [c.task_id for c in claim.jobs] == ["a", "b"]
    assert [c.attempt for c in claim.jobs] == [1, 1]


async def test_a_refused_connection_is_not_stored_and_never_unknown() -> None:
    # Nothing was sent, so the answer is StoreUnavailable itself: "not stored, retry".
    with refused_redis_url() as url:
        dead = Queue.from_url(url, timeout=0.5)
        try:
            item = EnqueueItem("x", job("x"), "r")
            with pytest.raises(StoreUnavailable) as caught:
                await dead.store_encoded([dead.encode_task(item, None)])
            assert type(caught.value) is StoreUnavailable
        finally:
            await dead.close()
