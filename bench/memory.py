"""Redis memory per mail: queued, delivered and dead-lettered, from INFO memory.

``python -m bench.memory`` starts its own redis-server (the one ``make dev`` would use),
stores N mails of each size through the same script the API uses, then records every one
as sent (or failed) as a worker would, and prints used_memory per mail at each stage with
the job size the stored-bytes budgets count. The figures in the README come from here.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

import redis

from emailq.devtools.redis_server import RedisServer
from emailq.models import Attempt, Job
from emailq.queue import EnqueueItem, Idempotency, Outcome, Queue

N = 2_000
SIZES = {"small (300 B text)": 300, "10 KB text + 10 KB html": 10_000}
SENT = Attempt(attempt=1, outcome="success", code=250, reply="2.0.0 Ok: queued as 4Xk2")
FAILED = Attempt(attempt=1, outcome="failed", code=550, reply="5.1.1 no such user")


def used(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def mail(i: int, size: int) -> Job:
    html = "<p>" + "y" * size + "</p>" if size >= 10_000 else None
    return Job(to=f"user{i}@example.com", subject=f"Your receipt {i}", text="x" * size, html=html)


async def measure(url: str, size: int, outcome: Outcome) -> tuple[float, float, int]:
    """(bytes per queued mail, bytes per finished mail, job bytes) for N mails of ``size``."""
    queue = Queue.from_url(url, timeout=5)
    try:
        await queue.redis.flushall()
        base = used(url)
        items = [EnqueueItem(str(uuid.uuid4()), mail(i, size), uuid.uuid4().hex,
                             key_id="website", quota="key:website") for i in range(N)]  # fmt: skip
        for start in range(0, N, 200):  # as the API stores them: with an Idempotency-Key
            chunk = items[start : start + 200]
            await queue.enqueue_all([(item, Idempotency("website", item.task_id, "f" * 64))
                                     for item in chunk])  # fmt: skip
        queued = used(url)
        entry, reason = (SENT, "") if outcome == "success" else (FAILED, "550 no such user")
        while claimed := (await queue.claim("bench", 200, 60_000)).jobs:
            for job in claimed:
                await queue.finish(job, outcome, entry, reason=reason)
        finished = used(url)
        job_bytes = len(items[0].job.model_dump_json().encode())
        return (queued - base) / N, (finished - base) / N, job_bytes
    finally:
        await queue.close()


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(Path(data), fsync="everysec")
        server.start()
        try:
            print(f"redis-server {redis.Redis.from_url(server.url).info()['redis_version']}, "
                  f"{N} mails each")  # fmt: skip
            for name, size in SIZES.items():
                outcomes: tuple[Outcome, ...] = ("success", "failed")
                for outcome in outcomes:
                    queued, finished, job_bytes = await measure(server.url, size, outcome)
                    print(f"{name:26} job {job_bytes:6} B  queued {queued:8.0f} B/mail  "
                          f"{outcome:7} {finished:8.0f} B/mail")  # fmt: skip
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
