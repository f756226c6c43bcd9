"""Drain rate: N queued mails sent into a fast sink, against the plain aiosmtplib loop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import redis

from bench.common import (
    ROOT,
    RedisStats,
    cpu_seconds,
    exe,
    flush_all,
    job,
    new_task_id,
    rss_mb,
    send_job,
    settings_env,
    spawn,
    stop,
    wait_until,
)  # fmt: skip
from emailq.queue import Keys, Queue


async def plain_loop(port: int, n: int, connections: int) -> float:
    """The reference: ``connections`` reused aiosmtplib connections, same message build."""
    share = [n // connections + (1 if i < n % connections else 0) for i in range(connections)]

    async def one(count: int, offset: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        for i in range(count):
            j = job(offset + i)
            await send_job(smtp, new_task_id(), j)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(one(c, sum(share[:i])) for i, c in enumerate(share)))
    return n / (time.perf_counter() - started)


async def preload(redis_url: str, n: int) -> None:
    """Queue ``n`` mails through the same enqueue script the API uses."""
    queue = Queue.from_url(redis_url, timeout=5)
    try:
        for start in range(0, n, 200):
            await asyncio.gather(*(queue.enqueue(new_task_id(), job(i), request_id="bench")
                                   for i in range(start, min(n, start + 200))))  # fmt: skip
    finally:
        await queue.close()


def _drained(client: redis.Redis) -> bool:
    keys = Keys()
    return client.llen(keys.lane("default")) == 0 and client.zcard(keys.leases) == 0


def emailq_drain(redis_url: str, port: int, n: int, workers: int, concurrency: int,
                 tmp: Path, prefetch: int = 0) -> dict[str, Any]:  # fmt: skip
    """Preload ``n`` mails, start ``workers`` processes, time from the first claim to the
    empty queue (process start-up is not counted, as it is not for the peers).
    ``prefetch``: WORKER_PREFETCH (0, the default, as shipped)."""
    flush_all(redis_url)
    client = redis.Redis.from_url(redis_url)
    stats = RedisStats(client)
    before = stats.snapshot()
    asyncio.run(preload(redis_url, n))
    loaded = stats.snapshot()
    # As shipped: the default LOG_LEVEL (INFO, a "sent" line per mail), what users run. The
    # peers write no line per job (run in-process, no logging configured), so this errs
    # against us, never for us.
    extra = {"LOG_LEVEL": "INFO"} | ({"WORKER_PREFETCH": str(prefetch)} if prefetch else {})
    env = settings_env(redis_url, port, concurrency, **extra)
    procs = [spawn([exe(), "-m", "worker"], env, tmp / f"worker-{i}.log") for i in range(workers)]
    lane = Keys().lane("default")
    started = wait_until(lambda: client.llen(lane) < n, timeout=60, every=0.002)
    cpu_before = sum(cpu_seconds(p.pid) for p in procs)
    done = wait_until(lambda: _drained(client))
    cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
    after = stats.snapshot()
    rss = max(rss_mb(p.pid) for p in procs)
    for p in procs:
        stop(p)
    enqueue_cost, drain_cost = RedisStats.delta(before, loaded), RedisStats.delta(loaded, after)
    client.close()
    return {
        "rate": n / (done - started), "rss_mb": rss, "workers": workers,
        # CPU the worker processes used while draining: a share of 1.0 per process is a
        # worker that is CPU-bound, whatever the relay's latency.
        "cpu_share": cpu / (done - started), "cpu_us_per_mail": cpu / n * 1e6,
        "settings": {"WORKER_CONCURRENCY": concurrency, **extra},
        "enqueue_calls": enqueue_cost["calls"], "drain_calls": drain_cost["calls"],
        "memory_per_queued": enqueue_cost["memory"] / n,
        "memory_per_finished": (enqueue_cost["memory"] + drain_cost["memory"]) / n,
    }  # fmt: skip


def peer_drain(peer: str, redis_url: str, port: int, n: int, concurrency: int, tmp: Path,
               *extra: str) -> dict[str, Any] | None:  # fmt: skip
    """A peer queue (bench/<peer>_peer.py) on the identical job, in its own venv
    (.venv-<peer>); None if that venv is missing. ``extra``: the peer's own arguments."""
    python = ROOT / f".venv-{peer}" / "bin" / "python"
    if not python.exists():
        return None
    flush_all(redis_url)
    client = redis.Redis.from_url(redis_url)
    stats = RedisStats(client)
    before = stats.snapshot()
    env = settings_env(redis_url, port, concurrency)
    log = tmp / f"{peer}-{'-'.join(extra) or 'default'}.log"
    args = [str(python), "-m", f"bench.{peer}_peer", redis_url, str(port), str(n),
            str(concurrency), *extra]  # fmt: skip
    proc = spawn(args, env, log)
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"{peer} peer failed; see {log}")
    calls = RedisStats.delta(before, stats.snapshot())["calls"]
    client.close()
    result: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
    if result["complete"] < n:
        raise RuntimeError(f"{peer} peer completed {result['complete']} of {n}; see {log}")
    result["runs_beyond_n"] = result["complete"] - n  # jobs run twice (sent twice)
    # Every command a peer sent, enqueue included: its calls counted as round trips would
    # flatter nobody, since a peer's pipelines count one call per command here.
    result["commands_per_mail"] = sum(calls.values()) / n
    return result
