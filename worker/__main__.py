"""``python -m worker``: run one worker process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from emailq.logs import configure_logging, redact_url
from emailq.queue import Queue
from emailq.settings import Settings
from worker.loop import MAX_BLOCK_SECONDS, Worker, log
from worker.sender import Sender, SmtpPool


async def serve(settings: Settings) -> None:
    """Compose queue, sender and worker from ``settings`` and run until a stop signal."""
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
    worker = Worker(queue, sender, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("Redis at %s; SMTP %s:%d (%s)", redact_url(settings.redis_url), settings.smtp_host,
             settings.smtp_port, settings.smtp_security.value)  # fmt: skip
    try:
        await worker.run()
    finally:
        await queue.close()


def main() -> None:
    """Entry point of ``python -m worker``."""
    settings = Settings()
    configure_logging(settings.log_level)
    try:
        import uvloop  # optional: faster loop where installed
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
