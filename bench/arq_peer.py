"""arq doing emailq's job (bench/peer_job.py), at the settings arq documents for throughput.

Runs in .venv-arq (arq 0.28 needs redis<6). Usage:
``python -m bench.arq_peer URL PORT N CONCURRENCY [POLL_DELAY]``; preloads N jobs, runs a
burst worker, prints one JSON line: the rate from the first job started to the last one
done, and the settings it ran with.

Settings (arq/worker.py, ``Worker`` docstring and ``__init__``):

- ``max_jobs`` = emailq's WORKER_CONCURRENCY: "maximum number of jobs to run at a time".
- ``poll_delay``: "duration between polling the queue for new jobs", 0.5 s by default.
  ``start_jobs`` returns as soon as ``max_jobs`` are running, so a free slot waits for the
  next poll: at 0.5 s that, not the queue, sets the rate. 0.01-0.05 s keeps slots full.
- ``queue_read_limit``: "the maximum number of jobs to pull from the queue each time it's
  polled. By default it equals max_jobs * 5, or 100; whichever is higher." Given as that
  default, explicitly: a poll stops at the first full slot, so a larger read only re-reads
  ids it will skip.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit

import uvloop
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

from bench.common import job, new_task_id
from bench.peer_job import Clock, Connections


async def send(ctx: dict[str, Any], task_id: str, payload: str) -> None:
    """The job, timed."""
    ctx["clock"].started()
    await ctx["connections"].send(task_id, payload)
    ctx["clock"].finished()


def settings(concurrency: int, poll_delay: float) -> dict[str, Any]:
    return {
        "max_jobs": concurrency,
        "poll_delay": poll_delay,
        "queue_read_limit": max(concurrency * 5, 100),
    }


async def main(url: str, port: int, n: int, concurrency: int, poll_delay: float) -> None:
    parts = urlsplit(url)
    redis_settings = RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    pool = await create_pool(redis_settings)
    for start in range(0, n, 200):
        await asyncio.gather(*(pool.enqueue_job("send", new_task_id(), job(i).model_dump_json())
                               for i in range(start, min(n, start + 200))))  # fmt: skip
    await pool.aclose()
    clock, connections = Clock(n), Connections(port)
    chosen = settings(concurrency, poll_delay)

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["clock"], ctx["connections"] = clock, connections

    worker = Worker(functions=[func(send, name="send")], redis_settings=redis_settings,
                    burst=True, handle_signals=False, on_startup=startup,
                    **chosen)  # fmt: skip
    await worker.async_run()
    await worker.close()
    await connections.close()
    print(clock.result({"peer": "arq 0.28", **chosen}))


if __name__ == "__main__":
    # The loop emailq's worker runs on: the comparison is of queues, not event loops.
    args = sys.argv[1:]
    delay = float(args[4]) if len(args) > 4 else 0.01
    uvloop.run(main(args[0], int(args[1]), int(args[2]), int(args[3]), delay))
