"""What one Redis shard carries: Redis CPU and memory per mail, and what they add up to.

``python -m bench.capacity`` starts its own redis-server, then drives the life of N mails
through the same scripts the API and the worker call, in the patterns they call them:

- store: ``enqueue.lua`` with one task a call (a quiet API) and with 32 a call (the
  coalescer's group commit under load), each with an Idempotency-Key as clients send;
- work: one ``claim`` per slot, then ``finish_and_claim`` per mail (the worker's one round
  trip a mail), recording success.

Redis's own CPU comes from INFO (its main thread, user + system) before and after each
phase, so the client's speed does not enter the figure; the shard's ceiling is one core
divided by the CPU a mail costs. That is a projection, not a measured rate: one Python
client cannot load Redis to a full core. Memory per queued mail is INFO used_memory over
the backlog. The README's capacity figures come from here.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis

from bench.common import job
from emailq.devtools.redis_server import RedisServer
from emailq.models import Attempt, ClaimedJob
from emailq.queue import EnqueueItem, Idempotency, Queue, Refill

SENT = Attempt(attempt=1, outcome="success", code=250, reply="2.0.0 Ok: queued as 4Xk2")
GiB = 1024**3


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU Redis's main thread has used (Redis 7; the whole process before)."""
    info = client.info("cpu")
    if "used_cpu_user_main_thread" in info:
        return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def items(n: int) -> list[tuple[EnqueueItem, Idempotency | None]]:
    return [(EnqueueItem(str(uuid.uuid4()), job(i), uuid.uuid4().hex, key_id="website",
                         quota="key:website"),
             Idempotency("website", uuid.uuid4().hex, "f" * 64)) for i in range(n)]  # fmt: skip


async def store(queue: Queue, n: int, group: int) -> None:
    batch = items(n)
    for start in range(0, n, group):
        await queue.enqueue_all(batch[start : start + group])


async def work(queue: Queue, slots: int) -> int:
    """Drain the backlog as ``slots`` worker slots do; returns the mails finished."""
    refill = Refill("capacity", 1, 60_000)

    async def slot() -> int:
        done = 0
        held: list[ClaimedJob] = (await queue.claim("capacity", 1, 60_000)).jobs
        while held:
            _, more = await queue.finish_and_claim(held[0], "success", SENT, refill)
            done += 1
            held = more.jobs
        return done

    return sum(await asyncio.gather(*(slot() for _ in range(slots))))


async def phase(client: redis.Redis, step: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(Redis CPU seconds, wall seconds) that ``step`` took."""
    cpu, wall = redis_cpu(client), time.perf_counter()
    await step()
    return redis_cpu(client) - cpu, time.perf_counter() - wall


async def measure(url: str, n: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    queue = Queue.from_url(url, timeout=5)
    out: dict[str, float] = {}
    try:
        for group in (1, 32):
            client.flushall()
            base = used_memory(client)
            cpu, wall = await phase(client, lambda g=group: store(queue, n, g))  # type: ignore[misc]
            out[f"store_{group}_cpu_us"] = cpu / n * 1e6
            out[f"store_{group}_rate"] = n / wall
            out["queued_bytes"] = (used_memory(client) - base) / n
            cpu, wall = await phase(client, lambda: work(queue, 8))
            out["work_cpu_us"] = cpu / n * 1e6
            out["work_rate"] = n / wall
        return out
    finally:
        await queue.close()
        client.close()


def report(r: dict[str, float], version: str, n: int) -> None:
    grouped = r["store_32_cpu_us"] + r["work_cpu_us"]
    single = r["store_1_cpu_us"] + r["work_cpu_us"]
    print(f"redis-server {version}, {n} mails a phase (bench/common.py's job: text + html)")
    print(f"{'step':44} {'Redis CPU us/mail':>18} {'client-bound rate/s':>20}")
    for name, key, rate in (("store, 1 task a call (quiet API)", "store_1_cpu_us", "store_1_rate"),
                            ("store, 32 a call (group commit under load)", "store_32_cpu_us",
                             "store_32_rate"),
                            ("claim + finish_and_claim (worker, 8 slots)", "work_cpu_us",
                             "work_rate")):  # fmt: skip
        print(f"{name:44} {r[key]:18.1f} {r[rate]:20.0f}")
    print(
        f"one shard at one full core: {1e6 / grouped:,.0f} mails/s stored and sent "
        f"(grouped stores), {1e6 / single:,.0f} mails/s (one store a call)"
    )
    print(
        f"memory: {r['queued_bytes']:,.0f} B a queued mail: "
        f"{GiB / r['queued_bytes'] / 1e6:.2f} M queued mails per GiB of used_memory"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="mails per phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(Path(data), fsync="everysec")
        server.start()
        try:
            version = redis.Redis.from_url(server.url).info()["redis_version"]
            report(asyncio.run(measure(server.url, args.n)), version, args.n)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
