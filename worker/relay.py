"""The worker's view of its relay: an unreachable or throttling relay is not the mail's fault.

- A relay-level failure (``RelayUnavailable``) opens the process's circuit breaker: sends
  stop, the claim loop waits, and probes (connect, TLS, login; no mail) run with
  exponential backoff until one gets through. Each state change is logged once and
  published to Redis for ``GET /api/v1/admin/stats``.
- A throttling reply (``RelayThrottled``) halves the shared send rate (when
  SMTP_MAX_PER_SECOND is set) instead of the breaker.
- Mail caught by either goes back to the queue without using up an attempt
  (``Deferral``), until it has waited SMTP_OUTAGE_MAX_SECONDS in all; then it fails with a
  reason that says so. Ready mail that waits behind a relay down that long is failed by a
  sweep after each failed probe (``RelayStore.expire_waiting``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from emailq.errors import RelayThrottled, RelayUnavailable, SendError, StoreUnavailable
from emailq.models import RelayState
from emailq.relay import Deferral, RelayStore
from emailq.settings import Settings
from worker.breaker import CircuitBreaker
from worker.relaycheck import diagnose
from worker.sender import Sender

log = logging.getLogger("emailq.worker.relay")


def duration(seconds: float) -> str:
    """4h, 1m30s, 2s: short, for failure reasons and logs."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")


class RelayGuard:
    """Breaker, probes, pacing and deferrals for one worker process."""

    def __init__(self, store: RelayStore, sender: Sender, settings: Settings, worker_id: str):
        self.store = store
        self.sender = sender
        self.settings = settings
        self.worker_id = worker_id
        self.breaker = CircuitBreaker(max_delay=settings.smtp_probe_max_seconds)
        self.max_rate = settings.smtp_max_per_second or None
        self.rate: float | None = self.max_rate
        self._throttled_in_a_row = 0  # without a shared rate: spaces out throttled retries
        self._hinted = False
        self._changed = asyncio.Event()  # a state change to publish, or a probe to plan

    # -- at startup -------------------------------------------------------------------

    async def check(self) -> bool:
        """Probe the relay once and log what is wrong in one line. False if the problem is
        certainly our configuration (see worker.relaycheck); otherwise the worker runs,
        with the breaker open when the relay is not there yet."""
        try:
            await self.sender.probe()
        except RelayUnavailable as exc:
            found = diagnose(exc, self.settings)
            log.error("%s", found.line)
            if not found.fatal:
                self.breaker.failure(str(exc))
            return not found.fatal
        log.info("SMTP relay %s:%d answers", self.settings.smtp_host, self.settings.smtp_port)
        return True

    # -- around each send ---------------------------------------------------------------

    def accepting(self) -> bool:
        """Whether sends may go (the breaker is closed)."""
        return self.breaker.state is RelayState.CLOSED

    async def before_send(self) -> None:
        """Refuse while the breaker is open; wait for this mail's slot of the shared rate."""
        if not self.accepting():
            raise RelayUnavailable(self.breaker.error or "relay unavailable")
        if self.max_rate is None:
            return
        try:
            wait, self.rate = await self.store.take_send_slot(self.max_rate)
        except StoreUnavailable:
            # Redis is not the relay's fault: pace this process alone meanwhile.
            wait = 1 / self.max_rate
        if wait > 0:
            await asyncio.sleep(wait)

    def delivered(self) -> None:
        """The relay took a mail (or judged it): it works."""
        self.breaker.delivered()
        self._throttled_in_a_row = 0

    async def failed(self, exc: SendError) -> None:
        """Take note of a relay-level failure or a throttling reply."""
        if isinstance(exc, RelayThrottled):
            await self._throttled(exc)
        elif isinstance(exc, RelayUnavailable) and self.breaker.failure(str(exc)):
            log.error("SMTP relay %s:%d failed (%s); pausing sends, probing in %.1fs",
                      self.settings.smtp_host, self.settings.smtp_port, exc,
                      self.breaker.seconds_to_probe())  # fmt: skip
            self._changed.set()

    async def _throttled(self, exc: RelayThrottled) -> None:
        self._throttled_in_a_row += 1
        if self.max_rate is None:
            if not self._hinted:
                self._hinted = True
                log.warning("SMTP relay is throttling (%s); set SMTP_MAX_PER_SECOND to its "
                            "limit so the workers pace themselves", exc)  # fmt: skip
            return
        with contextlib.suppress(StoreUnavailable):  # the next take will slow down anyway
            before, self.rate = self.rate, await self.store.throttled(self.max_rate)
            if before is not None and self.rate < before:
                log.warning("SMTP relay is throttling (%s); send rate now %.3g/s", exc, self.rate)

    def deferral(self, exc: SendError) -> Deferral:
        """How a mail the relay failed goes back: at once (the breaker or the shared rate
        holds it), or, throttled without a shared rate, after a growing pause."""
        kind = "throttling" if isinstance(exc, RelayThrottled) else "unreachable"
        ceiling = self.settings.smtp_outage_max_seconds
        reason = f"relay {kind} for {duration(ceiling)}: {exc}"
        delay = 0.0
        if isinstance(exc, RelayThrottled) and self.max_rate is None:
            steps = min(self._throttled_in_a_row, 16)
            delay = min(self.settings.retry_backoff_max_seconds,
                        self.settings.retry_backoff_seconds * 2 ** (steps - 1))  # fmt: skip
        return Deferral(reason, int(ceiling * 1000), int(delay * 1000))

    # -- while running ------------------------------------------------------------------

    async def wait_until_accepting(self, stopping: asyncio.Event) -> None:
        """Return once sends may go, or once the worker is stopping."""
        if self.accepting() or stopping.is_set():
            return
        closed = asyncio.create_task(self.breaker.closed.wait())
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stop):
            task.cancel()
        await asyncio.gather(closed, stop, return_exceptions=True)

    async def run(self) -> None:
        """Publish the breaker state with each heartbeat and at each change; probe the
        relay while the breaker is open. Runs until cancelled."""
        heartbeat = self.settings.heartbeat_seconds
        while True:
            self._changed.clear()
            await self._publish()
            if self.breaker.probe_due():
                await self._probe()
                continue
            wait = heartbeat
            if self.breaker.state is RelayState.OPEN:
                wait = min(wait, self.breaker.seconds_to_probe())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    async def _probe(self) -> None:
        self.breaker.probing()
        await self._publish()
        try:
            await self.sender.probe()
        except RelayUnavailable as exc:
            self.breaker.probe_failed(str(exc))
            log.debug("probe failed (%s); next in %.1fs", exc, self.breaker.seconds_to_probe())
            await self._expire_waiting()
            return
        outage = self.breaker.outage_seconds()
        self.breaker.probe_succeeded()
        log.warning("SMTP relay %s:%d is back after %s; sending again", self.settings.smtp_host,
                    self.settings.smtp_port, duration(outage))  # fmt: skip

    async def _expire_waiting(self) -> None:
        ceiling = self.settings.smtp_outage_max_seconds
        if self.breaker.outage_seconds() < ceiling:
            return
        reason = f"relay unreachable for {duration(ceiling)}: {self.breaker.error}"
        try:
            failed = await self.store.expire_waiting(int(ceiling * 1000), reason)
        except StoreUnavailable as exc:
            log.warning("could not fail mail past the outage ceiling: %s", exc)
            return
        if failed:
            log.error("failed %d waiting mail(s): %s", failed, reason)

    async def _publish(self) -> None:
        state: dict[str, object] = {
            "worker_id": self.worker_id,
            "state": self.breaker.state.value,
            "since": int(self.breaker.changed_at * 1000),
            "error": self.breaker.error,
            "send_rate": self.rate,
        }
        ttl_ms = self.settings.live_window_ms  # gone with the worker from the live list
        with contextlib.suppress(StoreUnavailable):  # the heartbeat's own retries report it
            await self.store.publish(self.worker_id, state, ttl_ms)

    async def retire(self) -> None:
        """Remove the published state of a stopping worker (best effort)."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.retire(self.worker_id)
