"""What ``REDIS_WAIT_REPLICAS=1`` costs the store step: enqueues per second through the API's
group commit (``EnqueueCoalescer``), with and without the WAIT for one replica.

``python -m bench.replicas`` starts a master and one replica (the suite's redis-server, on
loopback) and, in alternating rounds so both see the same machine load, stores
``MAILS`` mails from ``CONCURRENCY`` concurrent senders with ``Replicas(0)`` and
``Replicas(1)``. It prints each round and the median ratio; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import redis

from bench.common import job, new_task_id
from emailq.coalesce import EnqueueCoalescer
from emailq.devtools.redis_server import RedisServer
from emailq.queue import EnqueueItem, Queue, Replicas

MAILS = 4000
CONCURRENCY = 64
ROUNDS = 3


async def _rate(url: str, replicas: Replicas) -> float:
    """Mails stored per second with ``replicas``."""
    queue = Queue.from_url(url, timeout=5, replicas=replicas)
    coalescer = EnqueueCoalescer(queue)
    todo = iter(range(MAILS))

    async def sender() -> None:
        for i in todo:
            item = EnqueueItem(new_task_id(), job(i), request_id=f"r{i}")
            await coalescer.enqueue_once(item, None)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await queue.close()
    return MAILS / elapsed


def _linked(replica_port: int) -> bool:
    client = redis.Redis(port=replica_port, decode_responses=True)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


def main() -> None:
    """Run the rounds and print the rates and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        master = RedisServer(Path(tmp) / "master")
        master.start()
        follow = ["--replicaof", "127.0.0.1", str(master.port)]
        replica = RedisServer(Path(tmp) / "replica", extra_args=follow)
        replica.start()
        try:
            deadline = time.monotonic() + 30
            while not _linked(replica.port):
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not link to the master")
                time.sleep(0.05)
            ratios = []
            for n in range(ROUNDS):
                redis.Redis(port=master.port).flushall()
                plain = asyncio.run(_rate(master.url, Replicas(0)))
                redis.Redis(port=master.port).flushall()
                waited = asyncio.run(_rate(master.url, Replicas(1, 0.25)))
                ratios.append(waited / plain)
                print(f"round {n + 1}: {plain:,.0f} mails/s without WAIT, {waited:,.0f} with "
                      f"WAIT 1 ({waited / plain:.2f}x)")  # fmt: skip
            print(f"REDIS_WAIT_REPLICAS=1 stores at {statistics.median(ratios):.2f}x the rate "
                  f"of 0 (median of {ROUNDS}; {MAILS} mails, {CONCURRENCY} senders, replica on "
                  f"loopback; load {os.getloadavg()[0]:.1f})")  # fmt: skip
        finally:
            replica.stop()
            master.stop()


if __name__ == "__main__":
    main()
