"""``python -m worker``: run one worker process until SIGTERM or SIGINT.

``python -m worker --check`` is the container health check: it exits 0 when a worker on
this host has sent a heartbeat to Redis recently, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import cast

from emailq.logs import configure_logging, redact_url
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.startup import exit_on_config_error, load_settings
from worker.loop import MAX_BLOCK_SECONDS, Worker, log
from worker.sender import Sender, SmtpPool


def build_worker(settings: Settings) -> Worker:
    """The queue, sender and worker composed from ``settings``: what ``python -m worker``
    runs, and what the tests run in-process (one function, so they cannot drift apart)."""
    queue = Queue.from_url(
        settings.redis_url,
        timeout=settings.redis_timeout_seconds,
        # Blocking waits read nothing until they end, so reads may take that long.
        read_timeout=MAX_BLOCK_SECONDS + settings.redis_timeout_seconds + 1,
        # One blocking wait, one renewal, one finish per send in flight, and spare.
        max_connections=settings.worker_concurrency + 4,
        prefix=settings.redis_key_prefix,
        max_attempts=settings.max_attempts,
        result_ttl_seconds=settings.result_ttl_seconds,
        success_ttl_seconds=settings.result_ttl_success_seconds,
    )
    sender = Sender(SmtpPool(settings, size=settings.worker_concurrency))
    return Worker(queue, sender, settings)


async def serve(settings: Settings) -> None:
    """Run the worker ``build_worker`` composes until a stop signal."""
    worker = build_worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("Redis at %s; SMTP %s:%d (%s)", redact_url(settings.redis_url), settings.smtp_host,
             settings.smtp_port, settings.smtp_security.value)  # fmt: skip
    try:
        await worker.run()
    finally:
        await worker.queue.close()


async def heartbeat_age(settings: Settings, host: str) -> float | None:
    """Seconds since the freshest heartbeat of a worker on ``host``; None if it has none."""
    queue = Queue.from_url(settings.redis_url, timeout=settings.redis_timeout_seconds,
                           prefix=settings.redis_key_prefix)  # fmt: skip
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
    """Exit status of the health check: 0 when this host's worker heartbeats, else 1."""
    # The window `emailq stats` counts a worker as live in: three lease periods.
    window = 3 * settings.job_lease_seconds
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker``."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if a worker on this host heartbeats, 1 if not")  # fmt: skip
    args = parser.parse_args(argv)
    with exit_on_config_error():
        settings = load_settings()
    if args.check:
        return check(settings)
    configure_logging(settings.log_level)
    try:
        import uvloop  # optional: faster loop where installed
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
