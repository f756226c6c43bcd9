"""The event stream, per script, against a real redis-server: each state change appends one
entry with its named fields, and the stream stays near its cap."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from emailq.models import Attempt, Event, EventType
from emailq.queue import Queue
from emailq.relay import Deferral, RelayStore
from tests.helpers.queues import LONG, add, redis_now_ms, wait_past

SHORT = 50  # a lease the test waits out (ms)


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    q = Queue.from_url(redis_url, timeout=2, max_attempts=1, result_ttl_seconds=3600,
                       prefix=f"events-{uuid.uuid4().hex[:8]}")  # fmt: skip
    yield q
    await q.close()


async def kinds(queue: Queue, after: str = "0") -> list[tuple[EventType, str]]:
    return [(e.type, e.task_id) for e in await queue.events(after, count=1000)]


async def test_accepted_claimed_failed_with_reason_and_code(queue: Queue) -> None:
    (task_id,) = await add(queue, "f")
    claim = await queue.claim("host:1:abc", 1, LONG)
    entry = Attempt(attempt=1, outcome="failed", code=550, reply="550 5.1.1 no such user")
    await queue.finish(claim.jobs[0], "failed", entry, reason="permanent error: 550 no user")
    accepted, claimed, failed = await queue.events()
    assert (accepted.type, accepted.lane, accepted.request_id) == (
        EventType.ACCEPTED, "default", f"req-{task_id}")  # fmt: skip
    assert (claimed.type, claimed.attempt, claimed.worker) == (EventType.CLAIMED, 1, "host:1:abc")
    assert failed == Event(id=failed.id, type=EventType.FAILED, task_id=task_id,
                           time=failed.time, lane="default", attempt=1, code=550,
                           reason="permanent error: 550 no user", request_id=f"req-{task_id}",
                           worker="host:1:abc")  # fmt: skip
    assert accepted.time <= claimed.time <= failed.time
    # A blocking read (XREAD) sees the same entries, and waits out an empty stream.
    assert await queue.events(block_ms=50) == [accepted, claimed, failed]
    assert await queue.events(failed.id, block_ms=50) == []


async def test_cancel_requeue_and_release(queue: Queue) -> None:
    cancelled, released = await add(queue, "c", 2)
    assert await queue.cancel(cancelled) == "cancelled"
    assert await queue.requeue([cancelled]) == [cancelled]
    claim = await queue.claim("w", 2, LONG)
    await queue.release(claim.jobs, worker_id="w")
    everything = await kinds(queue)
    assert everything[:4] == [
        (EventType.ACCEPTED, cancelled), (EventType.ACCEPTED, released),
        (EventType.CANCELLED, cancelled), (EventType.REQUEUED, cancelled),
    ]  # fmt: skip
    # The requeued task went to the back of the lane: claimed second, released second.
    assert everything[4:] == [
        (EventType.CLAIMED, released), (EventType.CLAIMED, cancelled),
        (EventType.RELEASED, released), (EventType.RELEASED, cancelled),
    ]  # fmt: skip
    assert (await queue.events())[2].reason == "cancelled"


async def test_expiry_and_a_lapsed_lease_out_of_attempts(queue: Queue) -> None:
    now = await redis_now_ms(queue)
    (stale,) = await add(queue, "x", expires_at_ms=now + 1)
    (lost,) = await add(queue, "l")
    await wait_past(queue, now + 1)
    claim = await queue.claim("w", 5, SHORT)
    assert [j.task_id for j in claim.jobs] == [lost]
    await wait_past(queue, await redis_now_ms(queue) + SHORT)
    await queue.claim("w", 5, LONG)
    events = await queue.events()
    assert [(e.type, e.task_id) for e in events[2:]] == [
        (EventType.EXPIRED, stale), (EventType.CLAIMED, lost),
        (EventType.LEASE_EXPIRED, lost), (EventType.FAILED, lost),
    ]  # fmt: skip
    assert events[2].reason == "expired"
    assert events[-1].reason.startswith("lease expired on attempt 1 of 1")


async def test_a_deferral_keeps_the_attempt_it_was_about(queue: Queue) -> None:
    (_task_id,) = await add(queue, "d")
    claim = await queue.claim("w", 1, LONG)
    entry = Attempt(attempt=1, outcome="deferred", code=421, reply="421 too busy")
    how = Deferral(reason_if_expired="relay down", ceiling_ms=3_600_000)
    assert await RelayStore(queue).defer(claim.jobs[0], entry, how) == "deferred"
    deferred = (await queue.events())[-1]
    assert (deferred.type, deferred.attempt, deferred.code, deferred.reason) == (
        EventType.DEFERRED, 1, 421, "421 too busy")  # fmt: skip


async def test_the_stream_is_capped_near_its_maxlen(redis_url: str) -> None:
    q = Queue.from_url(redis_url, timeout=2, prefix=f"cap-{uuid.uuid4().hex[:8]}",
                       events_maxlen=50)  # fmt: skip
    try:
        await add(q, "m", 600)
        length = await q.redis.xlen(q.keys.events)
        # '~' trims whole stream nodes (100 entries by default), so it stays near the cap.
        assert 50 <= length <= 250
        newest = (await q.events(count=10_000))[-1]
        assert newest.task_id == "m599"
    finally:
        await q.close()


async def test_a_long_reason_is_clipped_at_a_character_boundary(queue: Queue) -> None:
    await add(queue, "u")
    claim = await queue.claim("w", 1, LONG)
    reason = "x" * 199 + "é" * 50  # byte 200 is the first half of an é
    entry = Attempt(attempt=1, outcome="failed", reply=reason)
    await queue.finish(claim.jobs[0], "failed", entry, reason=reason)
    failed = (await queue.events())[-1]  # decodes: no half character in the entry
    assert failed.reason == "x" * 199
    assert (await queue.get(failed.task_id)).reason == reason  # type: ignore[union-attr]
