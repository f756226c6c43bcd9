"""What a Prometheus scrape of ``/metrics`` every second costs the API's send throughput.

``python -m bench.metrics_cost [--seconds 10] [--pairs 3]`` starts a redis-server and one
API process (``python -m server``, as deployed), then loads the send endpoint with 32
keep-alive connections (wrk if installed, else a uvloop client in its own process) in
alternating phases: without a scraper, then with one reading ``/metrics`` once a second
(as Prometheus would), ``--pairs`` times. Alternating within one run cancels the drift of a
shared machine; the figure is the ratio of the two rates (target: a cost under 2%).

Redis is emptied between phases, so every phase starts from the same empty queue (the
gauges' cost does not depend on the backlog anyway: tests/emailq/test_gauges.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.common import ROOT, exe, settings_env, spawn, stop, wait_until
from bench.http import BODY, RawClient, _wrk
from emailq.devtools.redis_server import RedisServer, free_port

PATH = "/api/v1/email/received"
CONNECTIONS = 32
SCRAPE_EVERY = 1.0  # seconds, as a `scrape_interval: 1s`


@dataclass(eq=False)  # a Thread must stay hashable
class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_EVERY seconds until stopped; keeps each answer's time."""

    url: str
    seconds: list[float] = field(default_factory=list)
    size: int = 0

    def __post_init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            due = time.monotonic()
            while not self.done.wait(max(0.0, due - time.monotonic())):
                started = time.perf_counter()
                response = client.get(self.url)
                self.seconds.append(time.perf_counter() - started)
                if response.status_code != 200 or "emailq_queue_depth" not in response.text:
                    raise RuntimeError(f"/metrics answered {response.status_code}")
                self.size = len(response.content)
                due += SCRAPE_EVERY


async def _python_load(base: str, seconds: float) -> float:
    """Sends per second from CONNECTIONS keep-alive connections, each one request at a time."""
    client = RawClient(base)
    body = BODY.encode()
    sent = 0
    deadline = time.perf_counter() + seconds

    async def one_connection() -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            await client.post(PATH, body)
            sent += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one_connection() for _ in range(CONNECTIONS)))
    finally:
        client.close()
    return sent / (time.perf_counter() - started)


def _load(base: str, seconds: int, tmp: Path) -> float:
    """One load phase's send rate: wrk if installed, else the Python client in a child."""
    if shutil.which("wrk"):
        # Only the rate is used here: the CPU figure wrk's helper also takes is ours.
        return _wrk(base, seconds, tmp, os.getpid())["rate"]
    args = [exe(), "-m", "bench.metrics_cost", "--load", base, str(seconds)]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _phase(base: str, seconds: int, tmp: Path, scrape: bool) -> dict[str, float]:
    scraper = Scraper(f"{base}/metrics") if scrape else None
    if scraper is not None:
        scraper.start()
    try:
        rate = _load(base, seconds, tmp)
    finally:
        if scraper is not None:
            scraper.done.set()
            scraper.join()
    result = {"rate": rate}
    if scraper is not None and scraper.seconds:
        result |= {"scrapes": len(scraper.seconds), "bytes": scraper.size,
                   "scrape_ms": statistics.median(scraper.seconds) * 1000}  # fmt: skip
    return result


def _serve(env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [exe(), "-m", "server", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(args, env, tmp / "api.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, every=0.05)
    return proc, base


def run(seconds: int, pairs: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="emailq-metrics-cost-"))
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    flush = redis.Redis.from_url(redis_server.url)
    env = settings_env(redis_server.url, 2525, 8, LOG_LEVEL="WARNING")
    api, base = _serve(env, tmp)
    phases: list[dict[str, float]] = []
    try:
        _load(base, 2, tmp)  # warm up: imports, script load, pools
        for _ in range(pairs):
            for scrape in (False, True):
                flush.flushall()
                phases.append({"scrape": float(scrape), **_phase(base, seconds, tmp, scrape)})
    finally:
        stop(api)
        flush.close()
        redis_server.stop()
    without = [p["rate"] for p in phases if not p["scrape"]]
    with_scrape = [p["rate"] for p in phases if p["scrape"]]
    ratio = statistics.mean(with_scrape) / statistics.mean(without)
    return {"load": "wrk" if shutil.which("wrk") else "python", "seconds": seconds,
            "phases": phases, "rate_without": statistics.mean(without),
            "rate_with": statistics.mean(with_scrape), "ratio": ratio,
            "cost_percent": (1 - ratio) * 100}  # fmt: skip


def _table(result: dict[str, object]) -> str:
    phases = result["phases"]
    assert isinstance(phases, list)
    scraped = [p for p in phases if p["scrape"]]
    lines = [
        "| measure | value |", "|---|---|",
        f"| sends/s without a scraper (mean of {len(phases) - len(scraped)} phases) "
        f"| {result['rate_without']:.0f} |",
        f"| sends/s with /metrics read every second (mean of {len(scraped)}) "
        f"| {result['rate_with']:.0f} |",
        f"| ratio with / without | {result['ratio']:.3f} (cost {result['cost_percent']:.1f}%; "
        "target < 2%) |",
    ]  # fmt: skip
    if scraped and "scrape_ms" in scraped[-1]:
        last = scraped[-1]
        lines.append(f"| one scrape under load: median time, size | {last['scrape_ms']:.1f} ms, "
                     f"{last['bytes']:.0f} bytes |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":  # a child: one load phase
        import uvloop

        print(uvloop.run(_python_load(sys.argv[2], float(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost")
    parser.add_argument("--seconds", type=int, default=10, help="length of each phase")
    parser.add_argument("--pairs", type=int, default=3, help="phases without and with scrapes")
    args = parser.parse_args()
    result = run(args.seconds, args.pairs)
    print(_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
