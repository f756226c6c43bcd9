"""Shared pieces of the benchmark: the test message, Redis stats, processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import redis

from emailq.message import render
from emailq.models import Job

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
MAIL_FROM = "bench <noreply@example.com>"
SENDER = "noreply@example.com"


async def send_job(smtp: aiosmtplib.SMTP, task_id: str, j: Job) -> None:
    """What every reference and peer sends: the worker's message (``render``, bytes) over
    ``smtp``, one aiosmtplib ``sendmail``; a faster build speeds them as it speeds us."""
    await smtp.sendmail(SENDER, j.recipients, render(task_id, j, MAIL_FROM).as_bytes())


def job(i: int = 0) -> Job:
    """The message every sender in the benchmark builds: small text + html, Korean subject."""
    return Job(
        to=f"user{i % 100}@example.com",
        subject="벤치마크 {i}".replace("{i}", str(i)),
        text="Hello from the benchmark.\n" * 8,
        html="<p>Hello from the benchmark.</p>" * 8,
    )


def new_task_id() -> str:
    return str(uuid.uuid4())


def flush_all(redis_url: str) -> None:
    """Empty the bench's Redis between parts. FLUSHALL is written to the AOF and fsynced:
    after a wrk run has written a large AOF, the disk took longer than redis-py's default
    5 s socket timeout once (the bench died between its http and relay parts), so wait."""
    client = redis.Redis.from_url(redis_url, socket_timeout=120)
    try:
        client.flushall()
    finally:
        client.close()


def settings_env(redis_url: str, smtp_port: int, concurrency: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "REDIS_"))}
    env.update(
        REDIS_URL=redis_url, SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp_port),
        SMTP_SECURITY="none", MAIL_FROM=MAIL_FROM, WORKER_CONCURRENCY=str(concurrency),
        PYTHONPATH=str(ROOT), **extra,
    )  # fmt: skip
    # The load comes from one address at thousands a second: measure the queue, not the limit.
    env.setdefault("RATE_LIMIT_PER_KEY", "")
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until(check: Callable[[], bool], timeout: float = 300, every: float = 0.005) -> float:
    """Poll until ``check()``; returns the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(every)
    return time.perf_counter()


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RedisStats:
    """INFO commandstats and memory deltas between two points."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def snapshot(self) -> dict[str, Any]:
        stats = self.client.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
        return {"calls": calls, "memory": self.client.info("memory")["used_memory"]}

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        names = set(before["calls"]) | set(after["calls"])
        calls = {n: after["calls"].get(n, 0) - before["calls"].get(n, 0) for n in names}
        return {
            "calls": {n: c for n, c in calls.items() if c},
            "memory": after["memory"] - before["memory"],
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exe() -> str:
    return sys.executable


def median_by(items: Sequence[T], key: Callable[[T], float]) -> T:
    """The item of the median ``key`` (the upper one of an even count): a whole run, so its
    own figures stay together rather than a mix of runs."""
    return sorted(items, key=key)[len(items) // 2]
