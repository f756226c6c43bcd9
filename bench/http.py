"""Enqueue rate under wrk, and end-to-end latency from POST to the sink."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import exe, settings_env, spawn, stop, wait_until
from bench.sink import Arrivals, start_python_sink
from emailq.devtools.redis_server import free_port

BODY = ('{"to":"user@example.com","subject":"Hello {username}",'
        '"body":"{username}님 안녕하세요!","username":"홍길동"}')  # fmt: skip
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


def serve(app: str, env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [exe(), "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]  # fmt: skip
    proc = spawn(args, env, tmp / f"{app.split(':')[0]}.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/docs", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, every=0.05)
    return proc, base


def _wrk(base: str, seconds: int, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    args = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", str(script),
            f"{base}/api/v1/email/received"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rate": rate, "p50_ms": _latency(out, "50%"), "p99_ms": _latency(out, "99%"),
            "non_2xx": int(errors.group(1)) if errors else 0}  # fmt: skip


def _latency(out: str, pct: str) -> float:
    value, unit = re.search(rf"^\s+{pct}\s+([\d.]+)(us|ms|s)", out, re.M).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def enqueue_rates(redis_url: str, smtp_port: int, tmp: Path, seconds: int) -> dict[str, Any]:
    """Our send endpoint and the bare reference, same uvicorn flags, same wrk run."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    env = settings_env(redis_url, smtp_port, 8, LOG_LEVEL="WARNING")
    results = {}
    for name, app in (("bare", "bench.bare_app:app"), ("emailq", "server.main:app")):
        proc, base = serve(app, env, tmp)
        try:
            results[name] = _wrk(base, seconds, tmp)
        finally:
            stop(proc)
    return results


class RawClient:
    """A minimal HTTP/1.1 keep-alive client for the latency runs.

    httpx spends about a millisecond of Python per request on this machine (measured
    against the bare app: 1.7 ms p50 round trip with httpx, 0.6 ms with this), and part of
    it before the request leaves, which a POST-to-sink time would count against emailq.
    """

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> bytes:
        """POST JSON; returns the response body (one connection per request in flight)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return await self._request("POST", path, head.encode() + body)

    async def get(self, path: str) -> bytes:
        """GET; returns the response body."""
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        return await self._request("GET", path, head.encode())

    async def _request(self, method: str, path: str, request: bytes) -> bytes:
        reader, writer = self._idle.pop() if self._idle else \
            await asyncio.open_connection(self.host, self.port)  # fmt: skip
        writer.write(request)
        answer = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
        reply = await reader.readexactly(int(length.group(1)) if length else 0)
        if not answer.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"{method} {path} answered {answer.splitlines()[0]!r}: {reply!r}")
        self._idle.append((reader, writer))
        return reply

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


async def _latencies(base: str, arrivals: Arrivals, rate: float, count: int) -> list[float]:
    sent: dict[str, float] = {}
    client = RawClient(base)

    async def one() -> None:
        started = time.perf_counter()
        reply = await client.post("/api/v1/email/received", BODY.encode())
        sent[json.loads(reply)["task_id"]] = started

    try:
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 30
        # Arrivals are recorded by the sink's protocol callbacks; a short poll reads them.
        while not set(sent) <= set(arrivals.at) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        client.close()
    return [(arrivals.at[t] - s) * 1000 for t, s in sent.items() if t in arrivals.at]


def pcts(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100)
    return {"p50_ms": statistics.median(values), "p99_ms": q[98], "n": len(values)}


async def _e2e(redis_url: str, tmp: Path, drain_rate: float) -> dict[str, Any]:
    # The wrk run left a backlog with no worker to drain it; latency starts from empty.
    flush = redis.Redis.from_url(redis_url)
    flush.flushall()
    flush.close()
    arrivals = Arrivals(timestamps=True)
    port = free_port()
    sink = await start_python_sink(port, arrivals)
    env = settings_env(redis_url, port, 8, LOG_LEVEL="WARNING")
    api, base = await asyncio.to_thread(serve, "server.main:app", env, tmp)
    worker = spawn([exe(), "-m", "worker"], env, tmp / "latency-worker.log")
    await asyncio.sleep(1.5)
    try:
        idle = pcts(await _latencies(base, arrivals, rate=20, count=200))
        half = drain_rate / 2
        loaded = pcts(await _latencies(base, arrivals, rate=half, count=int(half * 5)))
    finally:
        stop(worker)
        stop(api)
        sink.close()
    return {"idle": idle, "half_load": {**loaded, "rate": half}}


def run_all(redis_url: str, smtp_port: int, tmp: Path, *, seconds: int,
            drain_rate: float) -> dict[str, Any]:  # fmt: skip
    return {
        "enqueue": enqueue_rates(redis_url, smtp_port, tmp, seconds),
        "latency": asyncio.run(_e2e(redis_url, tmp, drain_rate)),
    }
