"""``Queue.gauges`` (gauges.lua), what /metrics reports of the queue, on a real Redis: the
same depths as the stats, live workers by relay state (whatever a worker published), and
a cost that does not grow with the backlog."""

from __future__ import annotations

import json

import redis

from emailq.models import Priority
from emailq.queue import Queue
from tests.helpers.queues import LONG, add, redis_now_ms

WINDOW = 30_000  # ms: the live-worker window of these tests


async def test_an_empty_queue_is_all_zeros(queue: Queue) -> None:
    gauges = await queue.gauges(live_window_ms=WINDOW)
    assert [(lane.priority, lane.depth, lane.oldest_age_seconds) for lane in gauges.lanes] == [
        (Priority.HIGH, 0, None), (Priority.DEFAULT, 0, None), (Priority.LOW, 0, None),
    ]  # fmt: skip
    assert (gauges.scheduled, gauges.in_flight, gauges.failed, gauges.stored_bytes) == (0, 0, 0, 0)
    assert gauges.relay == {"closed": 0, "open": 0, "half_open": 0, "none": 0}
    assert gauges.live_workers == 0


async def test_depths_counts_and_stored_bytes_agree_with_the_stats(queue: Queue) -> None:
    await add(queue, "h", 2, lane=Priority.HIGH)
    await add(queue, "d", 3)
    await add(queue, "s", 1, send_at_ms=await redis_now_ms(queue) + LONG)
    await queue.claim("w1", 1, LONG)  # one of the high ones, now in flight
    gauges = await queue.gauges(live_window_ms=WINDOW)
    stats = await queue.stats(live_window_ms=WINDOW)
    depths = [lane.depth for lane in gauges.lanes]
    assert depths == [lane.depth for lane in stats.lanes] == [1, 3, 0]
    assert all(lane.oldest_age_seconds is not None for lane in gauges.lanes[:2])
    assert (gauges.scheduled, gauges.in_flight) == (stats.scheduled, stats.in_flight) == (1, 1)
    total = int(await queue.redis.hget(queue.keys.stored, "total") or 0)
    assert gauges.stored_bytes == total > 0


async def test_live_workers_are_counted_by_the_state_they_published(queue: Queue) -> None:
    now = await redis_now_ms(queue)
    published = {
        "w-closed": {"state": "closed"}, "w-open": {"state": "open"},
        "w-probing": {"state": "half_open"}, "w-odd": {"state": "on fire"},
        "w-list": ["not", "a", "state"],
    }  # fmt: skip
    for worker, state in published.items():
        await queue.redis.set(queue.keys.relay_state(worker), json.dumps(state))
    await queue.redis.set(queue.keys.relay_state("w-garbage"), "{not json")
    beats = {w: now for w in [*published, "w-garbage", "w-silent"]} | {"w-gone": now - 2 * WINDOW}
    await queue.redis.zadd(queue.keys.workers, beats)
    await queue.redis.set(queue.keys.relay_state("w-gone"), json.dumps({"state": "open"}))

    gauges = await queue.gauges(live_window_ms=WINDOW)
    # What a worker wrote never becomes a label of its own: anything unknown is "none".
    assert gauges.relay == {"closed": 1, "open": 1, "half_open": 1, "none": 4}
    assert gauges.live_workers == 7  # w-gone's heartbeat is older than the window


async def test_its_cost_in_redis_commands_does_not_grow_with_the_backlog(
    queue: Queue, redis_url: str
) -> None:
    direct = redis.Redis.from_url(redis_url)

    def commands() -> int:
        return sum(int(v["calls"]) for v in direct.info("commandstats").values())

    try:
        await add(queue, "a", 1)
        await queue.gauges(live_window_ms=WINDOW)  # loads the script
        before = commands()
        await queue.gauges(live_window_ms=WINDOW)
        small = commands() - before
        await add(queue, "b", 2000, lane=Priority.LOW)
        before = commands()
        await queue.gauges(live_window_ms=WINDOW)
        large = commands() - before
    finally:
        direct.close()
    # One lane more is non-empty (its head's age: one HGET more); nothing per queued task.
    assert large == small + 1
