"""Issue 4's queue features at the queue level, against a real redis-server, no worker:
priority lanes and their fairness, scheduled and expiring tasks, cancel, dead letters and
requeue, and the statistics script. Times come from Redis (``TIME``), never the test's clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from emailq.models import Attempt, ClaimedJob, Priority, Status, TaskRecord
from emailq.queue import FAIR_EVERY, Outcome, Queue
from tests.helpers.polling import eventually
from tests.helpers.queues import (
    LONG,
    TTL,
    add,
    job,
    open_queue,
    redis_now_ms,
    wait_past,
    within_one_minute_bucket,
)


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    q = open_queue(redis_url)
    yield q
    await q.close()


# -- helpers -----------------------------------------------------------------------------


async def record(queue: Queue, task_id: str) -> TaskRecord:
    found = await queue.get(task_id)
    assert found is not None, task_id
    return found


async def claim(queue: Queue, count: int = 10, worker: str = "w1") -> list[ClaimedJob]:
    return (await queue.claim(worker, count, LONG)).jobs


async def claim_ids(queue: Queue, count: int = 10) -> list[str]:
    return [c.task_id for c in await claim(queue, count)]


async def finish(queue: Queue, claimed: ClaimedJob, outcome: Outcome, reason: str = "") -> None:
    code = 250 if outcome == "success" else 550
    entry = Attempt(attempt=claimed.attempt, outcome=outcome, code=code, reply=f"{code} x")
    assert await queue.finish(claimed, outcome, entry, reason=reason) == outcome


async def dead_letter(queue: Queue, task_id: str, reason: str = "550 no such user") -> None:
    """Enqueue ``task_id``, claim it and record a permanent failure."""
    await queue.enqueue(task_id, job(task_id), request_id=f"req-{task_id}")
    [claimed] = await claim(queue, 1)
    assert claimed.task_id == task_id
    await finish(queue, claimed, "failed", reason)


async def lane_ids(queue: Queue, lane: str = "default") -> list[str]:
    return [str(v) for v in await queue.redis.lrange(queue.keys.lane(lane), 0, -1)]


async def outcomes(queue: Queue, task_id: str) -> list[str]:
    return [entry.outcome for entry in (await record(queue, task_id)).log]


async def scheduled_ids(queue: Queue) -> list[str]:
    return [str(v) for v in await queue.redis.zrange(queue.keys.scheduled, 0, -1)]


# -- priorities --------------------------------------------------------------------------


async def test_claims_take_high_then_default_then_low(queue: Queue) -> None:
    # Queued lowest first, so arrival order alone would give the opposite answer.
    low = await add(queue, "low", 2, lane=Priority.LOW)
    default = await add(queue, "default", 2)
    high = await add(queue, "high", 2, lane=Priority.HIGH)

    assert await claim_ids(queue, 6) == high + default + low
    assert [await claim_ids(queue, 1) for _ in range(3)] == [[], [], []]


async def test_claims_one_at_a_time_follow_the_lanes(queue: Queue) -> None:
    await add(queue, "low", 1, lane=Priority.LOW)
    await add(queue, "default", 1)
    await add(queue, "high", 1, lane=Priority.HIGH)

    assert [await claim_ids(queue, 1) for _ in range(3)] == [["high0"], ["default0"], ["low0"]]


async def lanes_of_claims(queue: Queue, claims: int) -> Counter[str]:
    """Claim ``claims`` times, one task each, and count the lanes they came from."""
    taken: Counter[str] = Counter()
    for _ in range(claims):
        [claimed] = await claim(queue, 1)
        taken[(await record(queue, claimed.task_id)).priority] += 1
    return taken


async def test_low_is_not_starved_by_a_backlog_of_high(queue: Queue) -> None:
    """How starvation is avoided: claims normally read the lanes highest first, but every
    FAIR_EVERY-th pop (a counter in Redis, shared by all workers) is a fair turn that reads
    a lower lane first, default and low in rotation, falling through to the next lane if
    that one is empty. So under any backlog of high mail the lower lanes still get one pop
    in FAIR_EVERY between them, and a high mail waits at most one extra pop for it."""
    await add(queue, "high", 200, lane=Priority.HIGH)
    await add(queue, "low", 50, lane=Priority.LOW)

    taken = await lanes_of_claims(queue, 100)

    assert taken["low"] >= 5
    assert taken["high"] > 50
    assert taken["low"] + taken["high"] == 100


async def test_default_and_low_both_get_a_share_under_a_backlog_of_high(queue: Queue) -> None:
    """The fair turns rotate over the lower lanes: a backlog of low mail must not take the
    turns that keep default from starving behind high, nor the other way round."""
    await add(queue, "high", 300, lane=Priority.HIGH)
    await add(queue, "default", 50)
    await add(queue, "low", 50, lane=Priority.LOW)

    taken = await lanes_of_claims(queue, 200)

    assert taken["default"] >= 200 // FAIR_EVERY // 2
    assert taken["low"] >= 200 // FAIR_EVERY // 2
    assert taken["high"] > 150


# -- scheduled ---------------------------------------------------------------------------


async def test_a_scheduled_task_is_pending_and_not_claimable_before_its_time(
    queue: Queue,
) -> None:
    send_at = await redis_now_ms(queue) + 2000
    [task_id] = await add(queue, "later", send_at_ms=send_at)

    scheduled = await record(queue, task_id)
    assert (scheduled.status, scheduled.scheduled_at, scheduled.attempts) == (
        Status.PENDING, send_at, 0,
    )  # fmt: skip
    assert await lane_ids(queue) == []
    assert await scheduled_ids(queue) == [task_id]
    early = await queue.claim("w1", 5, LONG)
    assert early.jobs == []
    assert early.next_deadline_ms is not None
    assert 0 < early.next_deadline_ms <= 2000  # the worker's next wake-up: the due time

    jobs: list[ClaimedJob] = []

    async def claimable() -> bool:
        jobs.extend(await claim(queue, 1))
        return bool(jobs)

    await eventually(claimable, "the scheduled task to become claimable")
    claimed_at = (await record(queue, task_id)).updated_at  # stamped by claim.lua from TIME
    assert [c.task_id for c in jobs] == [task_id]
    assert claimed_at >= send_at
    assert await scheduled_ids(queue) == []


async def test_a_send_at_in_the_past_is_ready_at_once(queue: Queue) -> None:
    [task_id] = await add(queue, "now", send_at_ms=await redis_now_ms(queue) - 1000)

    assert (await record(queue, task_id)).scheduled_at is None
    assert await claim_ids(queue) == [task_id]


# -- expiry ------------------------------------------------------------------------------


async def test_an_expired_task_is_failed_at_claim_and_the_claim_goes_on(queue: Queue) -> None:
    expires = await redis_now_ms(queue) + 100
    [otp] = await add(queue, "otp", expires_at_ms=expires)
    [fresh] = await add(queue, "fresh", expires_at_ms=expires + 60_000)
    await wait_past(queue, expires)

    assert await claim_ids(queue, 1) == [fresh]  # the expired one is skipped, not returned

    expired = await record(queue, otp)
    assert (expired.status, expired.reason, expired.attempts) == (Status.FAILED, "expired", 0)
    [entry] = expired.log
    assert entry.outcome == "expired"
    assert entry.at >= expires
    assert [r.task_id for r in await queue.failed()] == [otp]


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_of_a_ready_task_removes_its_lane_entry(queue: Queue) -> None:
    [keep, gone] = await add(queue, "t", 2)

    assert await queue.cancel(gone) == "cancelled"

    cancelled = await record(queue, gone)
    assert (cancelled.status, cancelled.reason) == (Status.FAILED, "cancelled")
    assert await outcomes(queue, gone) == ["cancelled"]
    assert await lane_ids(queue) == [keep]
    assert await claim_ids(queue) == [keep]
    assert 0 < await queue.redis.ttl(queue.keys.task(gone)) <= TTL


async def test_cancel_of_a_scheduled_task_removes_its_schedule(queue: Queue) -> None:
    [task_id] = await add(queue, "later", send_at_ms=await redis_now_ms(queue) + 500)

    assert await queue.cancel(task_id) == "cancelled"

    assert await scheduled_ids(queue) == []
    assert (await record(queue, task_id)).reason == "cancelled"
    await wait_past(queue, (await record(queue, task_id)).scheduled_at or 0)
    assert await claim_ids(queue) == []


async def test_cancel_answers_what_it_could_not_cancel(queue: Queue) -> None:
    await add(queue, "t", 3)
    sending, sent, failed = await claim(queue, 3)
    await finish(queue, sent, "success")
    await finish(queue, failed, "failed", "550")
    before = await queue.redis.hgetall(queue.keys.task(sending.task_id))

    assert await queue.cancel(sending.task_id) == "sending"
    assert await queue.cancel(sent.task_id) == "success"
    assert await queue.cancel(failed.task_id) == "failed"
    assert await queue.cancel("no-such-task") == "missing"
    assert await queue.redis.hgetall(queue.keys.task(sending.task_id)) == before
    assert (await record(queue, failed.task_id)).reason == "550"


# -- dead letters and requeue ------------------------------------------------------------


async def test_failed_lists_dead_letters_newest_first_with_reason_and_log(queue: Queue) -> None:
    names = ["d0", "d1", "d2"]
    for name in names:
        await dead_letter(queue, name, reason=f"550 {name}")
        await wait_past(queue, (await record(queue, name)).updated_at)  # distinct times

    listed = await queue.failed()
    assert [r.task_id for r in listed] == names[::-1]
    assert [r.reason for r in listed] == [f"550 {n}" for n in names[::-1]]
    assert [[(e.outcome, e.code) for e in r.log] for r in listed] == [[("failed", 550)]] * 3
    assert [r.task_id for r in await queue.failed(offset=1, limit=1)] == ["d1"]
    assert await queue.failed_ids() == names  # oldest first


async def test_requeue_makes_a_dead_letter_pending_and_keeps_its_log(queue: Queue) -> None:
    await dead_letter(queue, "d0")

    assert await queue.requeue(["d0"]) == ["d0"]

    again = await record(queue, "d0")
    assert (again.status, again.attempts, again.reason) == (Status.PENDING, 0, None)
    assert [(e.outcome, e.code) for e in again.log] == [("failed", 550), ("requeued", None)]
    assert await queue.failed_ids() == []
    assert await queue.redis.ttl(queue.keys.task("d0")) == -1  # pending tasks never expire
    [claimed] = await claim(queue)
    assert (claimed.task_id, claimed.attempt) == ("d0", 1)
    await finish(queue, claimed, "success")
    assert await outcomes(queue, "d0") == ["failed", "requeued", "success"]


async def test_requeue_of_a_task_that_is_not_failed_changes_nothing(queue: Queue) -> None:
    await add(queue, "t", 2)
    sending, sent = await claim(queue, 2)
    await finish(queue, sent, "success")
    [pending] = await add(queue, "pending")
    ids = [pending, sending.task_id, sent.task_id]
    before = [await queue.redis.hgetall(queue.keys.task(t)) for t in ids]

    assert await queue.requeue([*ids, "no-such-task"]) == []

    assert [await queue.redis.hgetall(queue.keys.task(t)) for t in ids] == before
    assert await lane_ids(queue) == [pending]


async def test_bulk_requeue_of_every_dead_letter(queue: Queue) -> None:
    names = [f"d{n}" for n in range(5)]
    for name in names:
        await dead_letter(queue, name)

    assert sorted(await queue.requeue(await queue.failed_ids())) == names

    assert await queue.failed() == []
    assert sorted(await lane_ids(queue)) == names
    assert {(await record(queue, n)).status for n in names} == {Status.PENDING}


# -- statistics --------------------------------------------------------------------------


async def test_stats_count_what_the_queue_holds(queue: Queue) -> None:
    await within_one_minute_bucket(queue)
    await dead_letter(queue, "dead")
    await add(queue, "ok")
    [ok] = await claim(queue)
    await finish(queue, ok, "success")
    await add(queue, "high", 3, lane=Priority.HIGH)
    await add(queue, "default", 2)
    await add(queue, "low", 1, lane=Priority.LOW)
    await add(queue, "later", 2, send_at_ms=await redis_now_ms(queue) + LONG)
    await claim(queue, 1)  # one high mail in flight

    stats = await queue.stats(live_window_ms=LONG)

    depths = {lane.priority: lane.depth for lane in stats.lanes}
    assert depths == {Priority.HIGH: 2, Priority.DEFAULT: 2, Priority.LOW: 1}
    assert all(lane.oldest_age_seconds is not None for lane in stats.lanes)
    assert (stats.scheduled, stats.in_flight, stats.failed) == (2, 1, 1)
    assert (stats.sent_last_minute, stats.failed_last_minute) == (1, 1)
    assert (stats.sent_last_hour, stats.failed_last_hour) == (1, 1)
    assert stats.live_workers == 0


async def test_stats_of_an_empty_queue(queue: Queue) -> None:
    stats = await queue.stats(live_window_ms=LONG)
    assert [(lane.depth, lane.oldest_age_seconds) for lane in stats.lanes] == [(0, None)] * 3
    assert (stats.scheduled, stats.in_flight, stats.failed, stats.live_workers) == (0, 0, 0, 0)


async def test_live_workers_come_from_heartbeats_and_leave_on_release(queue: Queue) -> None:
    await queue.renew([], LONG, worker_id="w1")
    await queue.renew([], LONG, worker_id="w2")
    assert (await queue.stats(live_window_ms=LONG)).live_workers == 2

    await queue.release([], worker_id="w2", retire=False)  # a give-back mid-run: still live
    assert (await queue.stats(live_window_ms=LONG)).live_workers == 2
    await queue.release([], worker_id="w1")
    assert (await queue.stats(live_window_ms=LONG)).live_workers == 1

    beat = await redis_now_ms(queue)
    await wait_past(queue, beat + 20)
    assert (await queue.stats(live_window_ms=10)).live_workers == 0  # a stale heartbeat
