"""Waiting for results without a Redis connection per waiter.

One pub/sub subscription to the channel that names each finished task feeds any number of
waiters (the API's ``wait=``, the CLI's ``status --wait``). A waiter registers before it
re-reads the status, so a task finishing in between is not missed; and if the subscription
is down (Redis restarting) it still re-reads the status every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq import redisconn
from emailq.errors import StoreUnavailable
from emailq.models import TERMINAL, TaskRecord
from emailq.queue import Queue

log = logging.getLogger("emailq.waiting")

RECHECK_SECONDS = 5.0  # safety net while the subscription reconnects


class ResultWaiter:
    """Serves ``wait(task_id, seconds)`` calls from one shared subscription."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._events: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed_now = asyncio.Event()  # set while the subscription is live

    async def start(self) -> None:
        """Start listening (in the background; a Redis outage only delays it)."""
        self._listener = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        """Stop listening."""
        if self._listener is None:
            return
        # Cancel until it takes: on Python 3.11, asyncio.wait_for (inside redis-py's send)
        # swallows a cancel that lands as its inner await completes, and the listener would
        # then read on forever.
        while not self._listener.done():
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=0.1)
        await asyncio.gather(self._listener, return_exceptions=True)

    @property
    def waiting(self) -> int:
        """How many waiters are registered now."""
        return sum(len(events) for events in self._events.values())

    async def wait(
        self, task_id: str, seconds: float, *, known: TaskRecord | None = None
    ) -> TaskRecord | None:
        """The task's record as soon as it is final, or as it stands after ``seconds``.

        ``known`` is a record the caller has just read, saving the first read."""
        record = known if known is not None else await self.queue.get(task_id)
        if record is None or record.status in TERMINAL or seconds <= 0:
            return record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Just after start() the subscription may not be live yet; a finish published before
        # it is would only be seen at the next re-check. Give it a moment to come up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed_now.wait(), min(seconds, 1.0))
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        try:
            record = await self.queue.get(task_id)
            while record is not None and record.status not in TERMINAL:
                left = deadline - loop.time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, RECHECK_SECONDS))
                record = await self.queue.get(task_id)
            return record
        finally:
            self._forget(task_id, event)

    def _forget(self, task_id: str, event: asyncio.Event) -> None:
        events = self._events.get(task_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[task_id]

    def _notify(self, task_id: str) -> None:
        for event in self._events.get(task_id, ()):
            event.set()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._subscribed()
            except (StoreUnavailable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
                why = exc if isinstance(exc, StoreUnavailable) else redisconn.reason(exc)
                log.warning("result subscription lost (%s); retrying in %.1fs", why, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _subscribed(self) -> None:
        pubsub = self.queue.done_listener()
        try:
            await pubsub.subscribe(self.queue.keys.done_channel)
            self._subscribed_now.set()
            while True:
                # A bounded read: the pool's socket timeout is short (it bounds the API's
                # 503), so block in get_message rather than in one endless read.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._notify(str(message["data"]))
        finally:
            self._subscribed_now.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()
