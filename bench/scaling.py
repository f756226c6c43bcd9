"""Costs that grow with the work: a backlog of 10k, 100k and 1M queued mails.

For each size, on an emptied Redis and the fast sink:

- Redis memory per queued mail (INFO used_memory), and the store rate of the preload
  (``Queue.enqueue_all``, 500 tasks a call, as a batch request stores them);
- the drain rate of one worker over the first ``sample`` mails of that backlog, timed from
  its first claim (the same figure as the fast drain, so a rate that falls as the backlog
  grows shows as a falling ratio to the 10k row);
- ``GET /api/v1/email/result`` latency during that drain: one request at a time, 20 a
  second, for tasks spread through the backlog, through the API as users run it.

Nothing here is asserted: a row that grows worse than linearly is for the reader to see.
``/metrics`` scrape cost is to be added once that endpoint exists.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import exe, job, new_task_id, settings_env, spawn, stop, wait_until
from bench.http import RawClient, pcts, serve
from emailq.queue import EnqueueItem, Keys, Queue

BATCH = 500


async def _preload(redis_url: str, size: int, keep: int) -> list[str]:
    """Store ``size`` mails; returns ``keep`` of their task ids, spread through the backlog."""
    queue = Queue.from_url(redis_url, timeout=30)
    every = max(1, size // keep)
    kept: list[str] = []
    try:
        for start in range(0, size, BATCH * 4):
            calls = []
            for first in range(start, min(size, start + BATCH * 4), BATCH):
                items = [EnqueueItem(new_task_id(), job(i), "bench")
                         for i in range(first, min(size, first + BATCH))]  # fmt: skip
                kept += [it.task_id for k, it in enumerate(items, first) if k % every == 0]
                calls.append(queue.enqueue_all([(it, None) for it in items]))
            await asyncio.gather(*calls)
    finally:
        await queue.close()
    return kept[:keep]


async def _result_latencies(base: str, task_ids: list[str], stop_at: asyncio.Event) -> list[float]:
    client = RawClient(base)
    times: list[float] = []
    try:
        i = 0
        while not stop_at.is_set():
            started = time.perf_counter()
            await client.get(f"/api/v1/email/result?task_id={task_ids[i % len(task_ids)]}")
            times.append((time.perf_counter() - started) * 1000)
            i += 1
            await asyncio.sleep(0.05)
    finally:
        client.close()
    return times


async def _drain_with_reads(client: redis.Redis, env: dict[str, str], base: str,
                            size: int, sample: int, task_ids: list[str],
                            tmp: Path) -> dict[str, Any]:  # fmt: skip
    lane = Keys().lane("default")
    worker = spawn([exe(), "-m", "worker"], env, tmp / f"scaling-worker-{size}.log")
    try:
        started = await asyncio.to_thread(wait_until, lambda: client.llen(lane) < size, 60, 0.002)
        finished = asyncio.Event()
        reads = asyncio.create_task(_result_latencies(base, task_ids, finished))
        done = await asyncio.to_thread(wait_until, lambda: client.llen(lane) <= size - sample,
                                       600, 0.005)  # fmt: skip
        finished.set()
        latencies = await reads
    finally:
        stop(worker)
    return {"drain_rate": sample / (done - started), "result_latency": pcts(latencies)}


def one_size(redis_url: str, env: dict[str, str], base: str, size: int, sample: int,
             tmp: Path) -> dict[str, Any]:  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        task_ids = asyncio.run(_preload(redis_url, size, keep=200))
        stored = time.perf_counter() - started
        queued = int(client.info("memory")["used_memory"]) - before
        drained = asyncio.run(_drain_with_reads(client, env, base, size, min(sample, size),
                                                task_ids, tmp))  # fmt: skip
    finally:
        client.close()
    return {"size": size, "memory_per_queued": queued / size, "store_rate": size / stored,
            "sample": min(sample, size), **drained}  # fmt: skip


def run(redis_url: str, smtp_port: int, tmp: Path, *, sizes: list[int], sample: int,
        concurrency: int) -> list[dict[str, Any]]:  # fmt: skip
    env = settings_env(redis_url, smtp_port, concurrency, LOG_LEVEL="WARNING")
    api, base = serve("server.main:app", env, tmp)
    try:
        return [one_size(redis_url, env, base, size, sample, tmp) for size in sizes]
    finally:
        stop(api)
