"""``python -m worker``: run one worker process until SIGTERM or SIGINT.

``python -m worker health``: one line about this host's workers and their relay; exit 0
while they are alive and sending, 1 otherwise (a container healthcheck).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from emailq.errors import StoreUnavailable
from emailq.logs import configure_logging, redact_url
from emailq.models import RelayState
from emailq.output import relay_text
from emailq.queue import Queue
from emailq.settings import Settings
from worker.loop import MAX_BLOCK_SECONDS, Worker, log
from worker.sender import Sender, SmtpPool

EXIT_CONFIG = 2  # the relay's answer proves a setting wrong (see worker.relaycheck)


async def serve(settings: Settings) -> int:
    """Compose queue, sender and worker from ``settings`` and run until a stop signal.
    Returns the exit code."""
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
    )
    sender = Sender(SmtpPool(settings, size=settings.worker_concurrency))
    worker = Worker(queue, sender, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("Redis at %s; SMTP %s:%d (%s)", redact_url(settings.redis_url), settings.smtp_host,
             settings.smtp_port, settings.smtp_security.value)  # fmt: skip
    try:
        if not await worker.relay.check():
            return EXIT_CONFIG
        await worker.run()
    finally:
        await queue.close()
    return 0


async def health(settings: Settings) -> int:
    """Print this host's workers' relay state; 0 if at least one is live and all send."""
    queue = Queue.from_url(settings.redis_url, timeout=settings.redis_timeout_seconds,
                           prefix=settings.redis_key_prefix)  # fmt: skip
    try:
        stats = await queue.stats(live_window_ms=int(3 * settings.job_lease_seconds * 1000))
    except StoreUnavailable as exc:
        sys.stdout.write(f"unhealthy: {exc}\n")
        return 1
    finally:
        await queue.close()
    mine = [w for w in stats.relay if w.worker_id.startswith(socket.gethostname() + ":")]
    sys.stdout.write(relay_text(mine) + "\n")
    return 0 if mine and all(w.state is RelayState.CLOSED for w in mine) else 1


def main() -> None:
    """Entry point of ``python -m worker``."""
    settings = Settings()
    configure_logging(settings.log_level)
    command = health if sys.argv[1:] == ["health"] else serve
    try:
        import uvloop  # optional: faster loop where installed
    except ImportError:
        code = asyncio.run(command(settings))
    else:
        code = uvloop.run(command(settings))
    sys.exit(code)


if __name__ == "__main__":
    main()
