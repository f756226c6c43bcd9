"""What the default logging costs the send endpoint: in-process, as ``bench/api_cost.py``.

``python -m bench.log_cost [requests]`` runs the whole app against a real redis-server
(``api_cost``'s ``emailq`` variant: 32 POSTs at a time straight into the ASGI app), once
per logging setup, each in its own process whose log goes to a pipe this process drains:

- ``warning``: LOG_LEVEL=WARNING, no line per mail (what the other benchmarks run);
- ``text``: LOG_LEVEL=INFO, LOG_FORMAT=text: the default level, one "accepted" line per mail;
- ``json``: LOG_LEVEL=INFO, LOG_FORMAT=json: the same line as JSON (the image's default);
- ``json-sync``: as ``json``, but formatted and written at the call by a plain
  ``StreamHandler``: what the queue and its listener thread save the event loop.

It prints microseconds per request and the throughput of each as a ratio to ``warning``,
all from one run: ``ROUNDS`` rounds with the variants interleaved, the best of each kept,
so a burst of load from elsewhere on the machine does not land on one variant only. The
listener thread shares the GIL with the loop, so its formatting counts here; what it
takes off the loop is the write, and the wait for a slow reader.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, settings_env
from emailq.devtools.redis_server import RedisServer

ROUNDS = 3
VARIANTS = {
    "warning": {"LOG_LEVEL": "WARNING", "LOG_FORMAT": "json"},
    "text": {"LOG_LEVEL": "INFO", "LOG_FORMAT": "text"},
    "json": {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"},
    "json-sync": {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"},
}


def _synchronous_logging() -> None:
    """Swap our queue handler for a ``StreamHandler`` with the same JSON formatter."""
    from emailq.logs import JsonFormatter
    from server.main import _app_from_environment

    _app_from_environment()  # configures our pipeline first; the app is cached
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)


def _child(variant: str, requests: int) -> None:
    import uvloop

    from bench.api_cost import _measure

    if variant == "json-sync":
        _synchronous_logging()
    print(json.dumps(uvloop.run(_measure("emailq", requests, 32))))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--variant":  # a child: one measurement
        _child(sys.argv[2], int(sys.argv[3]))
        return
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="emailq-log-cost-")))
    redis_server.start()
    cost: dict[str, float] = {}
    lines: dict[str, int] = {}
    try:
        for _ in range(ROUNDS):
            for variant, logging_env in VARIANTS.items():
                env = {**os.environ, **settings_env(redis_server.url, 2525, 8, **logging_env)}
                args = [sys.executable, "-m", "bench.log_cost", "--variant", variant,
                        str(requests)]  # fmt: skip
                done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                                      check=True)  # fmt: skip
                measured = float(done.stdout.strip().splitlines()[-1])
                cost[variant] = min(cost.get(variant, measured), measured)
                lines[variant] = done.stderr.count('"accepted"') + done.stderr.count(" accepted")
    finally:
        redis_server.stop()
    print(f"{requests} sends per variant (plus 200 to warm up), 32 at a time, in-process; "
          f"best of {ROUNDS} interleaved rounds")  # fmt: skip
    print("| logging | us per request | 'accepted' lines | throughput vs WARNING |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        ratio = cost["warning"] / cost[variant]
        print(f"| {variant} | {cost[variant]:.0f} | {lines[variant]} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
