"""Where the send endpoint's time goes: microseconds per request, in-process, by layer.

``python -m bench.api_cost`` calls each app directly over ASGI (no sockets, no uvicorn), 32
requests at a time, and prints the cost per request, in wall time and in CPU time of the
process (all threads: the log writer's too), the best of three interleaved rounds, of:

- ``bare``: the enqueue reference, ``bench/bare_app.py`` (validated POST, nothing stored);
- ``route``: the emailq app with the store answered at once (middleware, routing, the send
  route's direct handler (server/direct.py): body, auth, compose, ids, response; no Redis,
  no await);
- ``await``: as ``route``, but through the coalescer with a Redis call that returns at once
  (adds the task switch every awaited store costs);
- ``emailq``: the whole app against a real redis-server, at LOG_LEVEL=WARNING;
- ``emailq-info``: the same at the default LOG_LEVEL (INFO), as shipped: an "accepted"
  line per mail, formatted and written by the log thread (its CPU counts here).

Each runs in its own process so the stubs touch nothing else. The stubs live here, in the
benchmark, and only ever replace the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, settings_env
from bench.http import BODY
from emailq.devtools.redis_server import RedisServer

VARIANTS = ("bare", "route", "await", "emailq", "emailq-info")
LOG_LEVELS = {"emailq-info": "INFO"}  # every other variant: WARNING
ROUNDS = 3
PATH = "/api/v1/email/received"


def _scope() -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(BODY.encode())).encode())],
    }  # fmt: skip


def _app(variant: str) -> Any:
    if variant == "bare":
        from bench.bare_app import app

        return app
    from emailq.coalesce import EnqueueCoalescer
    from emailq.queue import Queue

    if variant == "route":

        async def stored(self: Any, item: Any, once: Any) -> None:
            return None

        EnqueueCoalescer.enqueue_once = stored  # type: ignore[method-assign]
    elif variant == "await":

        async def instant(self: Any, entries: Any) -> list[None]:
            return [None for _ in entries]

        Queue.store_encoded = instant  # type: ignore[method-assign]
    from server.main import _app_from_environment

    return _app_from_environment()


async def _call(app: Any, body: bytes, statuses: list[int]) -> None:
    """One POST straight into the ASGI app; notes the status it answered."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # the app asks again only to watch for a disconnect
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(_scope(), receive, send)


async def _measure(variant: str, requests: int, concurrency: int) -> float:
    """Microseconds per request, of wall time (see ``_measure_both``)."""
    return (await _measure_both(variant, requests, concurrency))[0]


async def _measure_both(variant: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Microseconds per request: wall time, and CPU time of the process (every thread: the
    log writer's too). On a machine shared with other work the CPU figure moves less."""
    app = _app(variant)
    body = BODY.encode()
    statuses: list[int] = []
    async with app.router.lifespan_context(app):
        for _ in range(200):  # warm up: imports, script load, pools
            await _call(app, body, statuses)
        statuses.clear()
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests // concurrency):
            await asyncio.gather(*(_call(app, body, statuses) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if set(statuses) != {202}:
        raise RuntimeError(f"{variant}: answers {sorted(set(statuses))}, not all 202")
    return elapsed / len(statuses) * 1e6, cpu / len(statuses) * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":  # a child: one measurement
        import uvloop

        print(json.dumps(uvloop.run(_measure_both(sys.argv[2], int(sys.argv[3]), 32))))
        return
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="emailq-api-cost-")))
    redis_server.start()
    env = {**os.environ, **settings_env(redis_server.url, 2525, 8, LOG_LEVEL="WARNING")}
    try:
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for _ in range(ROUNDS):  # interleaved, the best of each kept: load elsewhere varies
            for variant in VARIANTS:
                args = [sys.executable, "-m", "bench.api_cost", "--variant", variant,
                        str(requests)]  # fmt: skip
                child = env | {"LOG_LEVEL": LOG_LEVELS.get(variant, "WARNING")}
                out = subprocess.run(args, env=child, cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout  # fmt: skip
                measured = json.loads(out.strip().splitlines()[-1])
                wall[variant] = min(wall.get(variant, measured[0]), measured[0])
                cpu[variant] = min(cpu.get(variant, measured[1]), measured[1])
    finally:
        redis_server.stop()
    print(f"best of {ROUNDS} interleaved rounds")
    print("| app | us per request | CPU us per request | added by this layer (CPU) |")
    print("|---|---|---|---|")
    previous = None
    for variant in VARIANTS:
        added = "" if previous is None else f"{cpu[variant] - cpu[previous]:+.0f}"
        print(f"| {variant} | {wall[variant]:.0f} | {cpu[variant]:.0f} | {added} |")
        previous = variant


if __name__ == "__main__":
    main()
