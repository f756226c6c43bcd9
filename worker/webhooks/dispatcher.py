"""Read the event stream, create deliveries, attempt them, retry on a schedule.

Two loops share one process. ``consume`` reads events through the consumer group (and
takes over events a dead dispatcher left unacknowledged) and records their deliveries.
``deliver`` claims due deliveries, up to WEBHOOK_CONCURRENCY at once, and attempts each:
2xx succeeds; 410 Gone fails it and disables the endpoint; anything else is retried after
the schedule's next wait (longer if Retry-After asks, up to WEBHOOK_RETRY_AFTER_MAX_SECONDS)
until the schedule runs out. A target refused after DNS fails at once (replayable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from emailq.errors import EventGroupLost, StoreUnavailable
from emailq.logs import bind, unbind
from emailq.models import Event
from emailq.settings import Settings
from emailq.webhooks import signing
from emailq.webhooks.models import DeliveryAttempt, Endpoint
from emailq.webhooks.store import Claimed, FinishOutcome, WebhookStore, later_id
from emailq.webhooks.targets import TargetRefused
from worker.webhooks.http import Answer, DeliveryClient

log = logging.getLogger("emailq.webhooks")
READ_BLOCK_MS = 500  # one blocking read of the stream; also how soon a stop is noticed
READ_COUNT = 100
IDLE_WAIT_SECONDS = 1.0  # longest sleep between looks at the due set (other dispatchers)
# A consumer that has not read for this long, with nothing pending, is a dispatcher that is
# gone (a live one reads every READ_BLOCK_MS); deleting a live one by mistake costs nothing,
# its next read joins the group again.
GONE_AFTER_MS = 600_000
JITTER = 0.1  # up to 10% added to each wait, so retries of one outage do not march together


def consumer_id() -> str:
    """This process's name in the consumer group: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def without_query(url: str) -> str:
    """``url`` as an attempt's log keeps it: no query or fragment, where a receiver may keep
    a token that a change of url is meant to retire (the log outlives the change)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class Dispatcher:
    """Delivers webhooks until ``stop``."""

    def __init__(
        self,
        store: WebhookStore,
        client: DeliveryClient,
        settings: Settings,
        consumer: str,
        file_endpoints: Sequence[Endpoint] = (),
    ) -> None:
        self.store = store
        self.file_endpoints = list(file_endpoints)  # WEBHOOKS_FILE's, registered at start
        self.client = client
        self.consumer = consumer
        self.delays = settings.webhook_retry_delays
        self.retry_after_max = settings.webhook_retry_after_max_seconds
        self.concurrency = settings.webhook_concurrency
        self.lease_ms = int(settings.webhook_lease_seconds * 1000)
        self.grace = settings.webhook_timeout_seconds + 1
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.inflight: set[asyncio.Task[None]] = set()
        # The last event this dispatcher recorded, or Redis's clock when it became ready:
        # where a lost group is created again (not at "0": every event still in the stream
        # whose delivery record has expired would be delivered a second time).
        self.read_to = "0-0"

    def stop(self) -> None:
        """Stop claiming; attempts in flight finish (up to the timeout)."""
        self.stopping.set()
        self.wake.set()

    async def run(self) -> None:
        """Both loops, until ``stop``; then wait for attempts in flight."""
        await self._until_ready()
        log.info("webhook dispatcher started as %s", self.consumer)
        try:
            await asyncio.gather(self.consume(), self.deliver())
        finally:
            if self.inflight:
                await asyncio.wait(self.inflight, timeout=self.grace)
            await self._leave()
            log.info("webhook dispatcher stopped")

    async def _until_ready(self, *, group_lost: bool = False) -> None:
        """Register WEBHOOKS_FILE's endpoints and the consumer group, waiting for Redis as
        long as it takes (a dispatcher started before its Redis waits, as a worker does).
        ``group_lost``: again, after Redis lost them; the group then reads on from the last
        event recorded here (``read_to``)."""
        delay = 0.1
        while not self.stopping.is_set():
            try:
                if group_lost:
                    await self.store.ensure_group(after=self.read_to)
                else:
                    await self.store.ensure_group()
                    self.read_to = later_id(self.read_to, await self.store.now_id())
                for taken in await self.store.sync_file(self.file_endpoints):
                    log.warning("WEBHOOKS_FILE endpoint %r not registered: an API endpoint "
                                "has that id", taken)  # fmt: skip
                return
            except StoreUnavailable as exc:
                log.warning("waiting for Redis: %s", exc)
                await self._pause(delay)
                delay = min(delay * 2, 5.0)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # -- events -> deliveries ------------------------------------------------------------

    async def consume(self) -> None:
        """Record the deliveries of new events, and of events a dead dispatcher left."""
        next_reclaim = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_reclaim:
                    await self._record(await self.store.reclaim_events(
                        self.consumer, self.lease_ms, READ_COUNT))  # fmt: skip
                    await self._prune(GONE_AFTER_MS)
                    await self._warn_if_trimmed()  # before the read moves the group past it
                    next_reclaim = time.monotonic() + self.lease_ms / 2000
                await self._record(await self.store.read_events(self.consumer, READ_COUNT,
                                                                READ_BLOCK_MS))  # fmt: skip
            except StoreUnavailable as exc:
                log.warning("event stream unavailable: %s", exc)
                await self._pause(1.0)
            except EventGroupLost as exc:
                # Redis restarted without its data: the group and WEBHOOKS_FILE's endpoints
                # went with it (the API's own endpoints too, which only their owner can
                # register again). Without this the dispatcher exited.
                log.warning("%s (did Redis restart without its data?); registering it and "
                            "WEBHOOKS_FILE's endpoints again", exc)  # fmt: skip
                await self._until_ready(group_lost=True)

    async def _prune(self, idle_ms: int) -> None:
        for name in await self.store.prune_consumers(idle_ms):
            log.info("removed webhook consumer %s: idle with nothing pending", name)

    async def _warn_if_trimmed(self) -> None:
        lost = await self.store.unread_trimmed()
        if lost:
            log.warning("%d event(s) were trimmed from the event stream before any webhook "
                        "dispatcher read them, and their webhooks will not be sent: keep a "
                        "dispatcher running, or raise EVENT_STREAM_MAXLEN", lost)  # fmt: skip

    async def _leave(self) -> None:
        """At a clean stop, leave the group if nothing is pending for this consumer (what
        is pending stays for another dispatcher to take over)."""
        with contextlib.suppress(StoreUnavailable, EventGroupLost):
            await self.store.leave_group(self.consumer)

    async def _record(self, events: list[Event]) -> None:
        if events and await self.store.record(events):
            self.wake.set()
        for event in events:
            self.read_to = later_id(self.read_to, event.id)

    # -- deliveries -> attempts ----------------------------------------------------------

    async def deliver(self) -> None:
        """Claim due deliveries into free slots and attempt them."""
        while not self.stopping.is_set():
            self.wake.clear()
            free = self.concurrency - len(self.inflight)
            try:
                claimed = await self.store.claim(free, self.lease_ms) if free > 0 else []
                for held in claimed:
                    task = asyncio.create_task(self.attempt(held))
                    self.inflight.add(task)
                    task.add_done_callback(self._done)
                if claimed and len(claimed) == free:
                    continue
                due_ms = await self.store.next_due_ms()
            except StoreUnavailable as exc:
                log.warning("delivery store unavailable: %s", exc)
                due_ms = None
            wait = IDLE_WAIT_SECONDS if due_ms is None else min(due_ms / 1000, IDLE_WAIT_SECONDS)
            if wait > 0 or free <= 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(wait, 0.01))

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())
        self.wake.set()  # a slot is free

    async def attempt(self, held: Claimed) -> None:
        """One attempt of ``held``, and its outcome recorded; its lines name the mail's task
        (the dispatcher runs each attempt as a task of its own, so the binding is its own)."""
        token = bind(task_id=held.task_id or None)
        try:
            await self._attempt(held)
        finally:
            unbind(token)

    async def _attempt(self, held: Claimed) -> None:
        endpoint = held.endpoint
        headers = signing.headers(endpoint.secrets, held.id, int(time.time()), held.body)
        try:
            answer = await self.client.post(endpoint.url, headers, held.body)
        except TargetRefused as exc:
            entry = DeliveryAttempt(attempt=held.attempt, outcome="failed", error=str(exc),
                                    url=without_query(endpoint.url))  # fmt: skip
            await self._finish(held, "failed", entry, reason=f"target refused: {exc}")
            return
        await self._judge(held, answer)

    async def _judge(self, held: Claimed, answer: Answer) -> None:
        entry = DeliveryAttempt(attempt=held.attempt, outcome="succeeded",
                                status_code=answer.status, error=answer.error,
                                duration_ms=answer.duration_ms,
                                url=without_query(held.endpoint.url))  # fmt: skip
        if answer.status is not None and 200 <= answer.status < 300:
            await self._finish(held, "succeeded", entry)
        elif answer.status == 410:
            entry.outcome = "failed"
            await self._finish(held, "failed", entry, reason="the endpoint answered 410 Gone",
                               disable="answered 410 Gone")  # fmt: skip
        elif held.attempt > len(self.delays):
            entry.outcome = "failed"
            reason = f"gave up after {held.attempt} attempts: {answer.error}"
            await self._finish(held, "failed", entry, reason=reason)
        else:
            entry.outcome = "retry"
            await self._finish(held, "retry", entry, reason=answer.error or "",
                               retry_in_ms=self._wait_ms(held.attempt, answer))  # fmt: skip

    def _wait_ms(self, attempt: int, answer: Answer) -> int:
        """The wait before the next attempt: the schedule's, or a longer Retry-After."""
        wait = self.delays[attempt - 1]
        if answer.retry_after is not None:
            wait = max(wait, min(answer.retry_after, self.retry_after_max))
        return int(wait * (1 + random.uniform(0, JITTER)) * 1000)  # noqa: S311 (not secret)

    async def _finish(
        self, held: Claimed, outcome: FinishOutcome, entry: DeliveryAttempt, *, reason: str = "",
        retry_in_ms: int = 0, disable: str = "",
    ) -> None:  # fmt: skip
        try:
            applied = await self.store.finish(held, outcome, entry, reason=reason,
                                              retry_in_ms=retry_in_ms, disable=disable)  # fmt: skip
        except StoreUnavailable as exc:
            # The lease lapses and another attempt is made: a possible duplicate, same id.
            log.warning("could not record delivery %s: %s", held.id, exc)
            return
        log.info("webhook %s to %s attempt %d: %s (%s)", held.id, held.endpoint.id,
                 held.attempt, applied, entry.status_code or entry.error)  # fmt: skip
