"""``make bench``: drain, peer, enqueue, latency, cost and scaling figures, as ratios against
references measured in the same run. Prints a table; writes bench/results/<time>.json."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import drain, http
from bench.common import ROOT, exe, spawn, stop
from bench.sink import smtp_sink_path, start_smtp_sink
from emailq.devtools.redis_server import RedisServer, free_port


def _sink(tmp: Path) -> tuple[Any, int, str]:
    port = free_port()
    if smtp_sink_path():
        proc = start_smtp_sink(port)
        name = "postfix smtp-sink"
    else:
        proc = spawn([exe(), "-m", "bench.sink", str(port)], {"PYTHONPATH": str(ROOT)},
                     tmp / "sink.log")  # fmt: skip
        name = "bench/sink.py (asyncio)"
    time.sleep(0.5)
    return proc, port, name


def run(n: int, concurrency: int, http_seconds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="emailq-bench-"))
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    sink, port, sink_name = _sink(tmp)
    url = redis_server.url
    try:
        # On uvloop, as the worker: the reference is the best one Python process can do.
        plain = uvloop.run(drain.plain_loop(port, n, concurrency))
        one = drain.emailq_drain(url, port, n, 1, concurrency, tmp)
        two = drain.emailq_drain(url, port, n, 2, concurrency, tmp)
        arq = drain.arq_drain(url, port, n, concurrency, tmp)
        web = http.run_all(url, port, tmp, seconds=http_seconds, drain_rate=one["rate"])
    finally:
        stop(sink)
        redis_server.stop()
    return {
        "machine": f"{platform.node()} {platform.machine()}, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n": n, "concurrency": concurrency, "sink": sink_name,
        "plain_rate": plain, "emailq_1": one, "emailq_2": two, "arq_rate": arq, "http": web,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("-n", type=int, default=20_000, help="mails per drain run")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--http-seconds", type=int, default=10)
    args = parser.parse_args()
    result = run(args.n, args.concurrency, args.http_seconds)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in (out / f"{stamp}.json", out / "latest.json"):
        path.write_text(json.dumps(result, indent=2))
    from bench.report import table

    print(table(result))
    print(f"\nwritten to bench/results/{stamp}.json")


if __name__ == "__main__":
    main()
