"""SAQ doing emailq's job (bench/peer_job.py), at the settings SAQ documents for throughput.

Runs in .venv-saq (saq's redis extra needs redis<8). Usage:
``python -m bench.saq_peer URL PORT N CONCURRENCY``; preloads N jobs, runs a burst worker,
prints one JSON line: the rate from the first job started to the last one done, and the
settings it ran with.

Settings (saq/worker.py ``Worker``, saq/queue/redis.py ``RedisQueue``):

- ``concurrency`` = emailq's WORKER_CONCURRENCY: "number of jobs to process concurrently".
- No poll delay to tune: on Redis each of the ``concurrency`` tasks blocks in BLMOVE
  (``RedisQueue.dequeue``; README: "Avoids polling by leveraging BLMOVE or RPOPLPUSH").
  ``poll_interval`` "only affects Postgres".
- ``dequeue_timeout``: how long BLMOVE waits; burst mode requires it > 0 and ends when a
  dequeue times out, which the clock does not count. 1 s.
- ``max_concurrent_ops`` (queue): "This throttles calls to enqueue, job, and abort to
  prevent the Queue from consuming too many Redis connections", 20 by default. Every
  dequeue reads its job through that throttle, so it is raised to the concurrency when
  that is higher: one Redis connection per job in flight, as the worker already holds.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop
from saq import Queue, Worker

from bench.common import job, new_task_id
from bench.peer_job import Clock, Connections


def settings(concurrency: int) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "dequeue_timeout": 1.0,
        "max_concurrent_ops": max(20, concurrency),
    }


async def main(url: str, port: int, n: int, concurrency: int) -> None:
    chosen = settings(concurrency)
    queue = Queue.from_url(url, max_concurrent_ops=chosen["max_concurrent_ops"])
    for start in range(0, n, 200):
        await asyncio.gather(*(queue.enqueue("send", task_id=new_task_id(),
                                             payload=job(i).model_dump_json())
                               for i in range(start, min(n, start + 200))))  # fmt: skip
    clock, connections = Clock(n), Connections(port)

    async def send(ctx: dict[str, Any], *, task_id: str, payload: str) -> None:
        """The job, timed."""
        clock.started()
        await connections.send(task_id, payload)
        clock.finished()

    worker = Worker(queue, functions=[("send", send)], concurrency=concurrency, burst=True,
                    dequeue_timeout=chosen["dequeue_timeout"])  # fmt: skip
    await worker.start()
    await connections.close()
    await queue.disconnect()
    # A job the start-up sweep finds in the active list before its worker has marked it
    # ACTIVE is aborted and retried: it may run twice. The harness counts those runs.
    extra = {"saq_retried": queue.retried, "saq_aborted": queue.aborted}
    print(clock.result({"peer": "saq 0.26", **chosen}, extra))


if __name__ == "__main__":
    # The loop emailq's worker runs on: the comparison is of queues, not event loops.
    args = sys.argv[1:]
    uvloop.run(main(args[0], int(args[1]), int(args[2]), int(args[3])))
