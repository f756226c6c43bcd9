"""Producers: clients of their own that enqueue and read as the API would, never work.

Times come from Redis (``TIME``), never from the test's clock.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import redis

from emailq.models import Job, Priority, Status, TaskRecord
from emailq.queue import EnqueueItem, Queue
from emailq.settings import Settings
from tests.helpers.polling import eventually

TTL = 3600  # result_ttl_seconds of the queue-level tests
LONG = 60_000  # a lease that never lapses during a test (ms)


def open_queue(redis_url: str) -> Queue:
    """The queue the queue-level tests use: short result TTL, three attempts."""
    return Queue.from_url(redis_url, timeout=2, max_attempts=3, result_ttl_seconds=TTL)


def job(task_id: str) -> Job:
    """A valid job whose recipient and subject name ``task_id``."""
    return Job(to=f"{task_id}@example.com", subject=f"subject {task_id}", text="안녕하세요")


async def add(
    queue: Queue,
    prefix: str,
    count: int = 1,
    *,
    lane: Priority = Priority.DEFAULT,
    send_at_ms: int = 0,
    expires_at_ms: int = 0,
) -> list[str]:
    """Enqueue ``count`` tasks named ``<prefix><n>`` in one round trip."""
    ids = [f"{prefix}{n}" for n in range(count)]
    items = [EnqueueItem(task_id, job(task_id), f"req-{task_id}", lane, send_at_ms,
                         expires_at_ms) for task_id in ids]  # fmt: skip
    await queue.enqueue_many(items)
    return ids


async def redis_now_ms(queue: Queue) -> int:
    """Redis's clock, in milliseconds."""
    seconds, micros = await queue.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def wait_past(queue: Queue, moment_ms: int) -> None:
    """Wait until Redis's clock is past ``moment_ms``."""

    async def past() -> bool:
        return await redis_now_ms(queue) > moment_ms

    await eventually(past, "Redis's clock to pass the moment")


async def within_one_minute_bucket(queue: Queue, needed_ms: int = 10_000) -> None:
    """The per-minute counters are buckets of Redis's minute: start a test that reads them
    at least ``needed_ms`` before the bucket turns, so what it counts stays in one bucket."""
    now = await redis_now_ms(queue)
    if now % 60_000 > 60_000 - needed_ms:
        await wait_past(queue, now - now % 60_000 + 60_000)


@asynccontextmanager
async def producer(settings: Settings, *, redis_timeout: float = 2) -> AsyncIterator[Queue]:
    """A client of its own, as the API has: enqueues and reads, never works."""
    queue = Queue.from_url(settings.redis_url, timeout=redis_timeout,
                           prefix=settings.redis_key_prefix, max_attempts=settings.max_attempts,
                           result_ttl_seconds=settings.result_ttl_seconds)  # fmt: skip
    try:
        yield queue
    finally:
        await queue.close()


async def preload(settings: Settings, subjects: Iterable[str]) -> list[str]:
    """Queue one mail per subject before any worker runs; returns their task ids in order."""
    ids: list[str] = []
    async with producer(settings) as queue:
        for subject in subjects:
            ids.append(str(uuid.uuid4()))
            await queue.enqueue(ids[-1], Job(to="user@example.com", subject=subject, text="Hi"),
                                request_id="req")  # fmt: skip
    return ids


async def settle(queue: Queue, ids: list[str]) -> dict[str, TaskRecord]:
    """Final records of ``ids``, polling until each is terminal (bounded)."""
    done: dict[str, TaskRecord] = {}

    async def all_final() -> bool:
        for task_id in [t for t in ids if t not in done]:
            found = await queue.get(task_id)
            if found is None or found.status is Status.PENDING:
                return False
            done[task_id] = found
        return True

    await eventually(all_final, f"{len(ids)} tasks final")
    return done


FILL_ROUND = 100  # filler writes sent at once by fill_until_full


def fill_until_full(url: str) -> int:
    """Write filler keys until Redis refuses one with OOM, then keep it over its limit.

    A refused write frees its own buffer, which leaves Redis just under maxmemory and a
    small script would fit again; lowering maxmemory below what is used (as an operator
    might, or as growing results do) keeps every write that can grow memory refused.
    Returns how many filler keys it wrote.
    """
    client = redis.Redis.from_url(url)
    n = 0
    try:
        # In pipelined rounds: the test servers fsync every write, and one SET a round
        # trip spent seconds on thousands of fsyncs. A round goes on past a refusal (a
        # refused write may leave room for the next); what it wrote still counts.
        while True:
            pipe = client.pipeline(transaction=False)
            for i in range(n, n + FILL_ROUND):
                pipe.set(f"filler:{i}", b"x" * 2_000)
            replies = pipe.execute(raise_on_error=False)
            refused = [r for r in replies if isinstance(r, Exception)]
            n += len(replies) - len(refused)
            for error in refused:
                if not isinstance(error, redis.exceptions.OutOfMemoryError):
                    raise error
            if refused:
                break
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used - 64 * 1024)
        return n
    finally:
        client.close()


def memory(url: str) -> tuple[int, int]:
    """Redis's used_memory and maxmemory, in bytes."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("memory")
        return int(info["used_memory"]), int(info["maxmemory"])
    finally:
        client.close()
