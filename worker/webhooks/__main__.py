"""``python -m worker.webhooks``: run one webhook dispatcher until SIGTERM or SIGINT.

It reads WEBHOOKS_FILE (one line and exit 2 if it is invalid), registers its endpoints in
Redis, and delivers every webhook event from the queue's event stream to the endpoints
that want it. Run one, or several: they share the work through a Redis consumer group.
"""

from __future__ import annotations

import asyncio
import signal

from emailq.logs import configure_logging, redact_url
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.startup import exit_on_config_error, load_settings
from emailq.webhooks.config import load_webhooks
from emailq.webhooks.models import Endpoint
from emailq.webhooks.store import WebhookStore
from worker.webhooks.dispatcher import READ_BLOCK_MS, Dispatcher, consumer_id, log
from worker.webhooks.http import DeliveryClient, GuardedBackend


def build_dispatcher(settings: Settings, endpoints: list[Endpoint]) -> Dispatcher:
    """The dispatcher ``settings`` describe, with its own Redis pool and HTTP pool; it
    registers ``endpoints`` (WEBHOOKS_FILE's) once Redis answers."""
    queue = Queue.from_settings(
        settings,
        # A blocking stream read returns nothing until it ends.
        read_timeout=READ_BLOCK_MS / 1000 + settings.redis_timeout_seconds + 1,
        max_connections=settings.webhook_concurrency + 4,
    )
    backend = GuardedBackend(allow_private=settings.webhook_allow_private)
    client = DeliveryClient(timeout=settings.webhook_timeout_seconds,
                            concurrency=settings.webhook_concurrency, backend=backend)  # fmt: skip
    return Dispatcher(WebhookStore(queue), client, settings, consumer_id(), endpoints)


async def serve(settings: Settings, endpoints: list[Endpoint]) -> int:
    """Register the file's endpoints, then deliver until a stop signal."""
    dispatcher = build_dispatcher(settings, endpoints)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, dispatcher.stop)
    log.info("Redis at %s; %d endpoint(s) in WEBHOOKS_FILE", redact_url(settings.redis_url),
             len(endpoints))  # fmt: skip
    try:
        await dispatcher.run()
    finally:
        await dispatcher.client.aclose()
        await dispatcher.store.queue.close()
    return 0


def main() -> int:
    """Entry point of ``python -m worker.webhooks``."""
    with exit_on_config_error():
        settings = load_settings()
        endpoints = load_webhooks(settings.webhooks_file,
                                  allow_private=settings.webhook_allow_private)  # fmt: skip
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings, endpoints))


if __name__ == "__main__":
    raise SystemExit(main())
