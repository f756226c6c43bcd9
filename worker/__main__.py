"""``python -m worker``: run one worker process until SIGTERM or SIGINT.

``python -m worker --check`` is the container health check (liveness): it exits 0 when a
worker on this host has sent a heartbeat to Redis recently, 1 otherwise. A relay that is
down does not make it fail: restarting the worker would not bring the relay back.

``python -m worker health`` (readiness): one line about this host's workers and their
relay; exit 0 while they are alive and sending, 1 otherwise (the relay is down, say).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import cast

from emailq.cli.output import relay_text
from emailq.errors import StoreUnavailable
from emailq.logs import configure_logging, redact_url
from emailq.models import RelayState
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.startup import EXIT_CONFIG, exit_on_config_error, freeze_heap, load_settings
from worker.loop import MAX_BLOCK_SECONDS, Worker, log
from worker.metrics import WorkerMetrics
from worker.observer import WorkerObserver
from worker.sender import Sender, SmtpPool


def build_worker(settings: Settings, observer: WorkerObserver | None = None) -> Worker:
    """The queue, sender and worker composed from ``settings``: what ``python -m worker``
    runs, and what the tests run in-process (one function, so they cannot drift apart).
    ``observer`` hears of every claim, send and outcome (see worker.observer)."""
    queue = Queue.from_settings(
        settings,
        # Blocking waits read nothing until they end, so reads may take that long.
        read_timeout=MAX_BLOCK_SECONDS + settings.redis_timeout_seconds + 1,
        # One blocking wait, one renewal, one finish per send in flight, and spare.
        max_connections=settings.worker_concurrency + 4,
    )
    sender = Sender(SmtpPool(settings, size=settings.worker_concurrency))
    return Worker(queue, sender, settings, observer)


async def serve(settings: Settings) -> int:
    """Run the worker ``build_worker`` composes until a stop signal, with its metrics on
    WORKER_METRICS_PORT unless that is 0; returns the exit code (2 when the relay's answer
    at startup proves a setting wrong, see worker.relaycheck, or the metrics port is taken)."""
    metrics = WorkerMetrics() if settings.worker_metrics_port else None
    worker = build_worker(settings, metrics)
    # Built: spare its heap the collector's passes while it sends. With hundreds of sends
    # in flight their objects outlive the default young generation's 700 allocations, so
    # passes ran every few mails and promoted them, and full passes walked the whole heap.
    freeze_heap()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("Redis at %s; SMTP %s:%d (%s)", redact_url(settings.redis_url), settings.smtp_host,
             settings.smtp_port, settings.smtp_security.value)  # fmt: skip
    try:
        if not await worker.relay.check():
            return EXIT_CONFIG
        down = await worker.queue.unreachable()
        if down is not None:
            log.warning("%s; this worker claims nothing until Redis answers (retrying)", down)
        if metrics is not None and not metrics.listen(worker, settings):
            return EXIT_CONFIG
        await worker.run()
    finally:
        if metrics is not None:
            await metrics.close()
        await worker.queue.close()
    return 0


async def heartbeat_age(settings: Settings, host: str) -> float | None:
    """Seconds since the freshest heartbeat of a worker on ``host``; None if it has none."""
    queue = Queue.from_settings(settings)
    try:
        # Worker ids are "host:pid:random" (worker.loop.new_worker_id); the time is Redis's.
        beats = cast(  # members are str: the queue's client decodes responses
            "list[tuple[str, float]]",
            await queue.redis.zrange(queue.keys.workers, 0, -1, withscores=True),
        )
        seconds, micros = await queue.redis.time()  # (int, int)
    finally:
        await queue.close()
    now_ms = int(seconds) * 1000 + int(micros) / 1000
    mine = [score for member, score in beats if member.startswith(f"{host}:")]
    return (now_ms - max(mine)) / 1000 if mine else None


def check(settings: Settings) -> int:
    """Exit status of the liveness check: 0 when this host's worker heartbeats, else 1."""
    # The window `emailq stats` counts a worker as live in: three lease periods.
    window = settings.live_window_ms / 1000
    host = socket.gethostname()
    try:
        age = asyncio.run(heartbeat_age(settings, host))
    except Exception as exc:  # any failure is "unhealthy", said in one line
        sys.stderr.write(f"unhealthy: Redis at {redact_url(settings.redis_url)}: {exc!r}\n")
        return 1
    if age is None or age > window:
        seen = "no heartbeat" if age is None else f"last heartbeat {age:.0f}s ago"
        sys.stderr.write(f"unhealthy: {seen} from a worker on {host}\n")
        return 1
    sys.stdout.write(f"healthy: worker on {host} sent a heartbeat {age:.1f}s ago\n")
    return 0


async def health(settings: Settings) -> int:
    """Print this host's workers' relay state; 0 if at least one is live and all send."""
    queue = Queue.from_settings(settings)
    try:
        stats = await queue.stats(live_window_ms=settings.live_window_ms)
    except StoreUnavailable as exc:
        sys.stdout.write(f"unhealthy: {exc}\n")
        return 1
    finally:
        await queue.close()
    mine = [w for w in stats.relay if w.worker_id.startswith(socket.gethostname() + ":")]
    sys.stdout.write(relay_text(mine) + "\n")
    return 0 if mine and all(w.state is RelayState.CLOSED for w in mine) else 1


def _run(command: Callable[[Settings], Awaitable[int]], settings: Settings) -> int:
    try:
        import uvloop  # optional: faster loop where installed
    except ImportError:
        return asyncio.run(command(settings))  # type: ignore[arg-type]
    return uvloop.run(command(settings))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker``."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "health"], default="run",
                        help="run a worker (default), or report the relay state")  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if a worker on this host heartbeats, 1 if not")  # fmt: skip
    args = parser.parse_args(argv)
    with exit_on_config_error():
        settings = load_settings()
    if args.check:
        return check(settings)
    if args.command == "health":
        return _run(health, settings)
    configure_logging(settings.log_level, settings.log_format)
    return _run(serve, settings)


if __name__ == "__main__":
    raise SystemExit(main())
