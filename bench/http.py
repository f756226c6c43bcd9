"""Enqueue rate under wrk, and end-to-end latency from POST to the sink."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import exe, flush_all, median_by, settings_env, spawn, stop, wait_until
from bench.sink import Arrivals, start_python_sink
from emailq.devtools.redis_server import free_port

BODY = ('{"to":"user@example.com","subject":"Hello {username}",'
        '"body":"{username}님 안녕하세요!","username":"홍길동"}')  # fmt: skip
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""


# The send endpoint as users run it: `python -m server` (uvloop, httptools, its own logging),
# at the default LOG_LEVEL (INFO: an "accepted" line per mail) and at WARNING (none).
EMAILQ_RUNS = {"emailq": {}, "emailq-warning": {"LOG_LEVEL": "WARNING"}}
SHIPPED_LOGGING = ("LOG_LEVEL", "LOG_FORMAT")  # left to their defaults unless a run sets them


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=0.5).status_code < 500
    except httpx.HTTPError:
        return False


def serve(app: str, env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``app`` (``module:attribute``) under the uvicorn command line, as a bare app runs."""
    port = free_port()
    args = [exe(), "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]  # fmt: skip
    return _started(args, env, tmp / f"{app.split(':')[0]}.log", port)


def serve_emailq(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The API as shipped: ``python -m server``, configured by ``env`` alone."""
    port = free_port()
    return _started([exe(), "-m", "server", "--port", str(port)], env, log, port)


def _started(
    args: list[str], env: dict[str, str], log: Path, port: int
) -> tuple[subprocess.Popen[bytes], str]:
    proc = spawn(args, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(base), timeout=30, every=0.05)
    except TimeoutError:
        stop(proc)
        raise
    return proc, base


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(base: str, seconds: int, tmp: Path, pid: int) -> dict[str, float]:
    """wrk's rate and latency, and the server's CPU time per request: on a machine shared
    with other work that moves less than the rate does."""
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    args = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", str(script),
            f"{base}/api/v1/email/received"]  # fmt: skip
    cpu = _cpu_seconds(pid)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    cpu = _cpu_seconds(pid) - cpu
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rate": rate, "p50_ms": _latency(out, "50%"), "p99_ms": _latency(out, "99%"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "cpu_us_per_request": cpu / max(count, 1) * 1e6}  # fmt: skip


def _latency(out: str, pct: str) -> float:
    value, unit = re.search(rf"^\s+{pct}\s+([\d.]+)(us|ms|s)", out, re.M).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _shipped_env(redis_url: str, smtp_port: int, **extra: str) -> dict[str, str]:
    env = settings_env(redis_url, smtp_port, 8)
    for name in SHIPPED_LOGGING:
        env.pop(name, None)
    return {**env, **extra}


def _one_round(redis_url: str, smtp_port: int, tmp: Path, seconds: int) -> dict[str, Any]:
    env = _shipped_env(redis_url, smtp_port)
    proc, base = serve("bench.bare_app:app", env, tmp)
    try:
        measured = {"bare": _wrk(base, seconds, tmp, proc.pid)}
    finally:
        stop(proc)
    for name, extra in EMAILQ_RUNS.items():
        # Each run starts from an empty store: the last one's backlog (no worker drains it)
        # would otherwise count against the caller's MAX_STORED_BYTES_PER_KEY.
        flush_all(redis_url)
        proc, base = serve_emailq(_shipped_env(redis_url, smtp_port, **extra), tmp / f"{name}.log")
        try:
            measured[name] = _wrk(base, seconds, tmp, proc.pid)
        finally:
            stop(proc)
    return measured


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median rate (its own p50 and p99, not a mix of runs)."""
    return median_by(runs, lambda run: run["rate"])


def enqueue_rates(
    redis_url: str, smtp_port: int, tmp: Path, seconds: int, rounds: int = 3
) -> dict[str, Any]:
    """Our send endpoint as shipped (default logging, and WARNING) against the bare
    reference, interleaved over ``rounds`` rounds, so a burst of load from elsewhere does
    not land on one of them only. Each ratio is taken within its round."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (apt-get install wrk)"}
    history = [_one_round(redis_url, smtp_port, tmp, seconds) for _ in range(rounds)]
    results: dict[str, Any] = {"rounds": history}
    for name in ("bare", *EMAILQ_RUNS):
        results[name] = _median_run([one[name] for one in history])
    for name in EMAILQ_RUNS:
        ratios = sorted(one[name]["rate"] / one["bare"]["rate"] for one in history)
        p99 = sorted(one[name]["p99_ms"] / one["bare"]["p99_ms"] for one in history)
        # The bare route's CPU per request over ours: the rate ratio a quiet machine would give
        # if both were CPU-bound, as they are here.
        cpu = sorted(one["bare"]["cpu_us_per_request"] / one[name]["cpu_us_per_request"]
                     for one in history)  # fmt: skip
        results[name] |= {"ratios": ratios, "ratio": statistics.median(ratios),
                          "p99_ratio": statistics.median(p99),
                          "cpu_ratio": statistics.median(cpu)}  # fmt: skip
    return results


IDLE_SECONDS = 2.0  # well inside uvicorn's keep-alive timeout (5 s)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client for the latency runs.

    httpx spends about a millisecond of Python per request on this machine (measured
    against the bare app: 1.7 ms p50 round trip with httpx, 0.6 ms with this), and part of
    it before the request leaves, which a POST-to-sink time would count against emailq.
    """

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        # Idle connections with the time each was last used. uvicorn closes one left idle
        # for its keep-alive timeout (5 s); reusing it then raced that close and the POST read
        # nothing (IncompleteReadError, which ended a bench run). Kept for 2 s at most.
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def post(self, path: str, body: bytes) -> bytes:
        """POST JSON; returns the response body (one connection per request in flight)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return await self._request("POST", path, head.encode() + body)

    async def get(self, path: str) -> bytes:
        """GET; returns the response body."""
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        return await self._request("GET", path, head.encode())

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, used = self._idle.pop()
            if time.perf_counter() - used < IDLE_SECONDS:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def _request(self, method: str, path: str, request: bytes) -> bytes:
        reader, writer = await self._connection()
        writer.write(request)
        answer = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
        reply = await reader.readexactly(int(length.group(1)) if length else 0)
        if not answer.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"{method} {path} answered {answer.splitlines()[0]!r}: {reply!r}")
        self._idle.append((reader, writer, time.perf_counter()))
        return reply

    def close(self) -> None:
        for _, writer, _ in self._idle:
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
    flush_all(redis_url)
    arrivals = Arrivals(timestamps=True)
    port = free_port()
    sink = await start_python_sink(port, arrivals)
    env = settings_env(redis_url, port, 8, LOG_LEVEL="WARNING")
    api, base = await asyncio.to_thread(
        serve_emailq, _shipped_env(redis_url, port), tmp / "latency-api.log"
    )
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
