"""``make bench``: drain, peer, enqueue, latency, slow-relay and cost figures, as ratios
against references measured in the same run. Prints a table; writes
bench/results/<time>.json. ``python -m bench --help`` for a shorter run (smaller -n, a
subset of --parts)."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import drain, http, scaling, slow_relay
from bench.common import ROOT, exe, listening, median_by, spawn, stop, wait_until
from bench.sink import smtp_sink_path, start_smtp_sink
from emailq.devtools.redis_server import RedisServer, free_port

PARTS = ("drain", "peers", "http", "relay", "scaling")


def _sink(tmp: Path) -> tuple[Any, int, str]:
    port = free_port()
    if smtp_sink_path():
        proc = start_smtp_sink(port)
        name = "postfix smtp-sink"
    else:
        proc = spawn([exe(), "-m", "bench.sink", str(port)], {"PYTHONPATH": str(ROOT)},
                     tmp / "sink.log")  # fmt: skip
        name = "bench/sink.py (asyncio on uvloop)"
    wait_until(lambda: listening(port), timeout=30, every=0.02)
    return proc, port, name


def _peers(url: str, port: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every peer at each setting worth trying; the table shows each peer's best."""
    runs = [drain.peer_drain("arq", url, port, args.n, args.concurrency, tmp, str(delay))
            for delay in args.arq_poll_delays]  # fmt: skip
    runs.append(drain.peer_drain("saq", url, port, args.n, args.concurrency, tmp))
    return [r for r in runs if r is not None]


def _fast(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sink, port, sink_name = _sink(tmp)
    n, c = args.n, args.concurrency
    out: dict[str, Any] = {"sink": sink_name}
    try:
        if "drain" in args.parts:
            out.update(_drain_rounds(url, port, args, tmp))
            out["emailq_2"] = drain.emailq_drain(url, port, n, 2, c, tmp)
        if "peers" in args.parts:
            out["peers"] = _peers(url, port, args, tmp)
        if "http" in args.parts:
            rate = out["emailq_1"]["rate"] if "emailq_1" in out else 500.0
            out["http"] = http.run_all(url, port, tmp, seconds=args.http_seconds, drain_rate=rate)
        if "scaling" in args.parts:
            out["scaling"] = scaling.run(url, port, tmp, sizes=args.scaling_sizes,
                                         sample=args.scaling_sample, concurrency=c)  # fmt: skip
    finally:
        stop(sink)
    return out


def _drain_round(url: str, port: int, n: int, c: int, tmp: Path) -> dict[str, Any]:
    """The reference and the one-process drains, back to back."""
    return {
        # On uvloop, as the worker: the reference is the best one Python process can do.
        "plain_rate": uvloop.run(drain.plain_loop(port, n, c)),
        "emailq_1": drain.emailq_drain(url, port, n, 1, c, tmp),
        # Claiming ahead (off by default; its price is in the README): the same sends and
        # connections, each slot's next mail already held.
        "emailq_1_prefetch": drain.emailq_drain(url, port, n, 1, c, tmp, prefetch=c),
    }


def _drain_rounds(url: str, port: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """``--drain-rounds`` rounds of reference and drains, alternating: this VM's speed moves
    within minutes (the reference alone went from 2,382 to 4,157 mails/s between two runs),
    so one pair is one sample. The round of the median ratio gives the rates shown; every
    round's ratio is kept (``drain_ratios``)."""
    rounds = [_drain_round(url, port, args.n, args.concurrency, tmp)
              for _ in range(args.drain_rounds)]  # fmt: skip
    ratios = {name: [r[name]["rate"] / r["plain_rate"] for r in rounds]
              for name in ("emailq_1", "emailq_1_prefetch")}  # fmt: skip
    median = median_by(rounds, lambda r: r["emailq_1"]["rate"] / r["plain_rate"])
    return {**median, "drain_ratios": ratios}


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="emailq-bench-"))
    redis_server = RedisServer(tmp / "redis")
    redis_server.start()
    url = redis_server.url
    result: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n": args.n, "concurrency": args.concurrency, "parts": args.parts,
    }  # fmt: skip
    try:
        result.update(_fast(url, args, tmp))
        if "relay" in args.parts:
            result["relay"] = slow_relay.run(url, tmp, delays_ms=args.relay_delays,
                                             n=args.relay_n, connections=args.relay_connections,
                                             peers=not args.relay_no_peers,
                                             rounds=args.relay_rounds)  # fmt: skip
    finally:
        redis_server.stop()
    return result


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("-n", type=int, default=20_000, help="mails per drain run")
    parser.add_argument("-c", "--concurrency", type=int, default=8,
                        help="WORKER_CONCURRENCY, and every peer's concurrency")  # fmt: skip
    parser.add_argument("--drain-rounds", type=int, default=3,
                        help="alternating rounds of the reference and the drains")  # fmt: skip
    parser.add_argument("--http-seconds", type=int, default=10)
    parser.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")  # fmt: skip
    parser.add_argument("--arq-poll-delays", type=_floats, default=[0.01, 0.05],
                        help="arq poll_delay values (s); the table shows the best")  # fmt: skip
    parser.add_argument("--relay-delays", type=_floats, default=[20.0, 100.0],
                        help="slow-relay reply delays (ms)")  # fmt: skip
    parser.add_argument("--relay-n", type=int, default=10_000, help="mails per slow-relay run")
    parser.add_argument("--relay-connections", type=int, default=256)
    parser.add_argument("--relay-rounds", type=int, default=3,
                        help="emailq drains per relay delay; the median is shown")  # fmt: skip
    parser.add_argument("--relay-no-peers", action="store_true",
                        help="skip arq and SAQ against the slow relay")  # fmt: skip
    parser.add_argument("--scaling-sizes", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[10_000, 100_000, 1_000_000],
                        help="backlog sizes (mails queued) for the scaling rows")  # fmt: skip
    parser.add_argument("--scaling-sample", type=int, default=10_000,
                        help="mails drained from each backlog for its drain rate")  # fmt: skip
    return parser


def main() -> None:
    args = _parser().parse_args()
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))}")
    result = run(args)
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
