"""emailq.coalesce.EnqueueCoalescer against a real redis-server: grouped, yet each caller
gets its own answer only once its task is stored."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest

from emailq.coalesce import EnqueueCoalescer
from emailq.devtools.redis_server import RedisServer
from emailq.errors import StoreOutcomeUnknown, StoreUnavailable
from emailq.models import Job
from emailq.queue import EnqueueItem, Idempotency, Queue, Replay
from tests.helpers.ports import refused_redis_url


def item(task_id: str) -> EnqueueItem:
    job = Job(to=f"{task_id}@example.com", subject=f"subject {task_id}", text="안녕하세요")
    return EnqueueItem(task_id, job, request_id=f"req-{task_id}")


async def script_calls(queue: Queue) -> int:
    stats = await queue.redis.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in
               ("cmdstat_evalsha", "cmdstat_eval"))  # fmt: skip


async def stored_ids(queue: Queue) -> list[str]:
    ready = await queue.redis.lrange(queue.keys.lane("default"), 0, -1)
    return [str(task_id) for task_id in ready]


async def test_concurrent_sends_share_one_script_call(queue: Queue) -> None:
    coalescer = EnqueueCoalescer(queue)
    await coalescer.enqueue_once(item("warm"), None)  # loads the script: EVAL, then EVALSHA
    before = await script_calls(queue)
    ids = [f"t{i}" for i in range(50)]
    replies = await asyncio.gather(*(coalescer.enqueue_once(item(t), None) for t in ids))
    assert replies == [None] * 50  # each stored, none a replay
    assert await script_calls(queue) - before == 1
    assert await stored_ids(queue) == ["warm", *ids]  # stored in the order they arrived
    for task_id in ids:
        record = await queue.get(task_id)
        assert record is not None
        assert record.request_id == f"req-{task_id}"


async def test_a_caller_is_answered_only_after_its_task_is_stored(queue: Queue) -> None:
    coalescer = EnqueueCoalescer(queue)
    answered: list[bool] = []

    async def send(task_id: str) -> None:
        await coalescer.enqueue_once(item(task_id), None)
        answered.append(await queue.get(task_id) is not None)

    await asyncio.gather(*(send(f"t{i}") for i in range(20)))
    assert answered == [True] * 20


async def test_groups_are_capped_and_later_arrivals_go_in_the_next_call(queue: Queue) -> None:
    coalescer = EnqueueCoalescer(queue, max_batch=8)
    await coalescer.enqueue_once(item("warm"), None)
    before = await script_calls(queue)
    await asyncio.gather(*(coalescer.enqueue_once(item(f"t{i}"), None) for i in range(20)))
    assert await script_calls(queue) - before == 3  # 8 + 8 + 4
    assert len(await stored_ids(queue)) == 21


async def test_duplicate_keys_within_one_call_create_one_task(queue: Queue) -> None:
    coalescer = EnqueueCoalescer(queue)
    once = Idempotency(scope="k1", key="order-7", fingerprint="f1")
    other_body = Idempotency(scope="k1", key="order-7", fingerprint="f2")
    replies = await asyncio.gather(
        coalescer.enqueue_once(item("a"), once),
        coalescer.enqueue_once(item("b"), once),
        coalescer.enqueue_once(item("c"), other_body),
    )
    assert replies == [None, Replay("a", True), Replay("a", False)]
    assert await stored_ids(queue) == ["a"]


async def test_a_departed_caller_does_not_disturb_the_others(queue: Queue) -> None:
    coalescer = EnqueueCoalescer(queue)
    gone = asyncio.create_task(coalescer.enqueue_once(item("gone"), None))
    stays = asyncio.create_task(coalescer.enqueue_once(item("stays"), None))
    await asyncio.sleep(0)  # both are pending; the store has not answered yet
    gone.cancel()
    assert await stays is None
    with pytest.raises(asyncio.CancelledError):
        await gone
    # Cancelling the wait does not unsend: the task was already handed to Redis.
    assert sorted(await stored_ids(queue)) == ["gone", "stays"]


async def test_redis_down_reaches_every_caller_and_the_next_send_recovers() -> None:
    with refused_redis_url() as url:
        await _down_then_recovers(url)


async def _down_then_recovers(url: str) -> None:
    dead = Queue.from_url(url, timeout=0.5)
    coalescer = EnqueueCoalescer(dead)
    try:
        results = await asyncio.gather(
            *(coalescer.enqueue_once(item(f"t{i}"), None) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        # The flusher is free again: a later send is attempted, not stuck behind it.
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(coalescer.enqueue_once(item("later"), None), 5)
    finally:
        await dead.close()


async def test_a_task_that_cannot_be_encoded_fails_only_its_own_caller(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = queue.encode_task

    def encode(entry: EnqueueItem, once: Idempotency | None) -> str:
        if entry.task_id == "broken":
            raise ValueError("cannot encode")
        return real(entry, once)

    monkeypatch.setattr(queue, "encode_task", encode)
    coalescer = EnqueueCoalescer(queue)
    results = await asyncio.gather(
        *(coalescer.enqueue_once(item(t), None) for t in ("a", "broken", "b")),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert results[2] is None
    assert await stored_ids(queue) == ["a", "b"]


async def test_a_stalled_redis_answers_each_caller_within_its_budget_and_says_what_it_knows(
    redis_factory: Callable[..., RedisServer],
) -> None:
    # The client would wait 30 s for a reply; the budget (0.3 s) decides instead. The first
    # send is in the call Redis holds unanswered: unknown. The one behind it was never sent:
    # not stored. When Redis resumes it runs what it held, and only that.
    server = redis_factory()
    stalled = Queue.from_url(server.url, timeout=30)
    coalescer = EnqueueCoalescer(stalled, budget_seconds=0.3)
    await coalescer.enqueue_once(item("warm"), None)  # a pooled connection, script loaded
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        first = asyncio.create_task(coalescer.enqueue_once(item("sent"), None))
        await asyncio.sleep(0)  # the flusher takes "sent" into its call
        second = asyncio.create_task(coalescer.enqueue_once(item("held"), None))
        # Bounds a failing test only (the client's own timeout is 30 s).
        done, _ = await asyncio.wait({first, second}, timeout=15)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert done == {first, second}
    assert type(first.exception()) is StoreOutcomeUnknown
    assert type(second.exception()) is StoreUnavailable

    check = Queue.from_url(server.url, timeout=5)
    try:
        await wait_until_stored(check, "sent")
        assert await check.get("held") is None
        assert await stored_ids(check) == ["warm", "sent"]
    finally:
        await check.close()
        await stalled.close()


async def wait_until_stored(queue: Queue, task_id: str, within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while await queue.get(task_id) is None:
        assert asyncio.get_running_loop().time() < deadline, f"{task_id} never stored"
        await asyncio.sleep(0.02)
