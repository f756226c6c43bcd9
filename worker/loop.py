"""The worker: claim -> send -> finish, with leases renewed while sends are in flight.

One task claims (blocking on Redis when there is nothing to do), one renews leases, and
each claimed job runs as its own task, sending at most WORKER_CONCURRENCY at once (with
WORKER_PREFETCH, that many more wait claimed for a send slot). Every outcome is
written to Redis before the job leaves the in-flight set, so a crash at any point leaves
the job either finished or under a lease that will lapse and put it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec

import tenacity

from emailq.coalesce import FinishCoalescer
from emailq.errors import (
    LeaseLost,
    OutcomeUnknown,
    RelayThrottled,
    RelayUnavailable,
    SendError,
    StoreUnavailable,
)
from emailq.logs import bind, log_line, unbind
from emailq.message import envelope_recipients, envelope_sender, render
from emailq.models import LANES, Attempt, ClaimedJob, Priority
from emailq.queue import FAIR_EVERY, Claim, Finish, Outcome, Queue, Refill
from emailq.relay import RelayStore
from emailq.settings import Settings, UnknownOutcome
from worker.observer import NoObserver, WorkerObserver
from worker.relay import RelayGuard
from worker.retry import RetryPolicy
from worker.sender import Delivery, Sender
from worker.slots import SendSlots

log = logging.getLogger("emailq.worker")

MAX_BLOCK_SECONDS = 5.0  # longest BLPOP; wake tokens make it end early when work arrives
# The share of a lease the worker does not count on: its clock starts when the claim or
# renewal was *sent* (Redis started the lease later), and the margin covers the last lease
# check before the message to the moment it is on the wire (one DATA command round trip).
LEASE_SAFETY = 0.2
LOST = float("-inf")  # the lease deadline of a job whose lease Redis says is gone
RECORD_ON_EXIT_SECONDS = 2.0  # longest wait to record a send the drain cut off
RECANCEL_SECONDS = 0.5  # a task still running this long after a cancel is cancelled again

P = ParamSpec("P")


def new_worker_id() -> str:
    """host:pid:random, unique per process, readable in lease tokens and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _until_redis_answers(
    what: str, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> tenacity.AsyncRetrying:
    """Retry forever on StoreUnavailable, backing off to 5 s, logging each wait."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0
        # Says which outage: unreachable, or full (StoreFull, Redis at maxmemory), which
        # waits the same way: the outcome of a sent mail is kept here until Redis takes it.
        error = state.outcome.exception() if state.outcome else None
        log.warning("Redis unavailable during %s (%s); retrying in %.1fs", what, error, wait)

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(StoreUnavailable),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.5),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


class Worker:
    """Runs until ``stop()``; then stops claiming, drains within the grace period, returns."""

    def __init__(
        self,
        queue: Queue,
        sender: Sender,
        settings: Settings,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.queue = queue
        self.sender = sender
        self.settings = settings
        self.observer: WorkerObserver = observer or NoObserver()
        self.worker_id = new_worker_id()
        self.concurrency = settings.worker_concurrency
        # Jobs held at once: the sends, and the jobs claimed ahead of a free send slot
        # (WORKER_PREFETCH), which wait for one in _process. Only a busy worker's refills
        # claim ahead (_claim_ahead); the claim loop claims for free send slots alone.
        self.held_limit = self.concurrency + settings.worker_prefetch
        self._asked_ahead = 0  # jobs ahead asked for by refills whose claims are on the way
        self.lease_ms = int(settings.job_lease_seconds * 1000)
        self.policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            backoff_seconds=settings.retry_backoff_seconds,
            max_backoff=settings.retry_backoff_max_seconds,
        )
        self._inflight: dict[str, ClaimedJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started: set[str] = set()
        self._recording: set[str] = set()  # outcome being written; its lease goes with it
        self._slot_freed = asyncio.Event()
        self._send_slots = SendSlots(self.concurrency, LANES, FAIR_EVERY, Priority.DEFAULT)
        self._stopping = asyncio.Event()
        self._renewed_at = 0.0  # monotonic time the last successful renewal was sent
        # task id -> monotonic time until which its lease is known to hold (see _lease_ok)
        self._lease_until: dict[str, float] = {}
        # task id -> monotonic time its expires_at passes, for the jobs that have one
        self._expires_at: dict[str, float] = {}
        self._in_data: set[str] = set()  # message sent or being sent; no longer abortable
        self._abandoned: set[asyncio.Task[bool]] = set()  # cancelled BLPOPs still unwinding
        # The relay's breaker, probes and shared send rate (see worker.relay).
        self.relay = RelayGuard(RelayStore(queue), sender, settings, self.worker_id)
        self.finishes = FinishCoalescer(queue)  # every outcome is recorded through it
        # Settings are fixed for the run; the property parses MAIL_FROM on every read.
        self._mail_from_address = settings.mail_from_address

    @property
    def in_flight(self) -> int:
        """Jobs held now: claimed, and their outcome not yet recorded (for metrics)."""
        return len(self._inflight)

    def stop(self) -> None:
        """Ask the worker to stop claiming and drain (safe from a signal handler)."""
        self._stopping.set()
        self._slot_freed.set()  # a claimer waiting for a free slot must see the stop

    async def run(self) -> None:
        """Claim and send until stopped, then drain."""
        # Every line of this worker, and of the tasks it starts, names it.
        token = bind(worker_id=self.worker_id)
        try:
            await self._run()
        finally:
            unbind(token)

    async def _run(self) -> None:
        log.info("worker %s started, concurrency %d", self.worker_id, self.concurrency)
        claimer = asyncio.create_task(self._claim_loop())
        renewer = asyncio.create_task(self._renew_loop())
        relay = asyncio.create_task(self.relay.run())
        # Not cancelled: the claimer returns by itself at its next wait once stopping. A
        # cancel landing mid-claim loses the reply to a claim Redis already ran (those jobs
        # stay leased to nobody until the lease lapses), and on Python 3.11 a cancel that
        # races redis-py's write (asyncio.wait_for) can be swallowed, leaving it claiming.
        (outcome,) = await asyncio.gather(claimer, return_exceptions=True)
        if isinstance(outcome, Exception):
            log.error("claim loop crashed (%r); draining, then exiting", outcome)
            self.stop()
        await self._drain()
        await _cancel_all([renewer, relay])
        await self.relay.retire()
        # Off the live-worker list now that no heartbeat can put us back on it.
        await _best_effort(lambda: self.queue.release([], worker_id=self.worker_id), "retire")
        # A BLPOP that lost its cancel (see _wait_for_work) is blocked in Redis by now, where
        # a cancel lands. Left alone, closing the pool only makes redis-py's retry re-send it,
        # and the process's exit waits out the whole block.
        await _cancel_all(list(self._abandoned))
        await self.sender.close()
        log.info("worker %s stopped", self.worker_id)
        if isinstance(outcome, Exception):
            raise outcome  # a non-zero exit, so the supervisor restarts us

    # -- claiming ---------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        async for attempt in _until_redis_answers("claim", sleep=self._nap):
            with attempt:
                await self._claim_forever()

    async def _claim_forever(self) -> None:
        while True:
            # While the relay is down, claiming would only hand the jobs straight back.
            await self.relay.wait_until_accepting(self._stopping)
            free = await self._free_slots()
            if self._stopping.is_set():
                return
            # Our leases may have lapsed if renewals failed (a Redis outage) or stalled: renew
            # before claiming, or this very claim would put our in-flight jobs back and send
            # them again. The outage may end unseen by this loop (waiting for a free slot
            # while finished sends retry their outcome), so go by the last renewal's age.
            if self._renewal_is_stale():
                await self._renew_once()
            sent = time.monotonic()
            claim = await self.queue.claim(self.worker_id, free, self.lease_ms)
            await self._take(claim, sent)
            if not claim.jobs and not claim.unreadable:
                await self._wait_for_work(self._block_seconds(claim.next_deadline_ms))

    async def _wait_for_work(self, seconds: float) -> None:
        # Ended early by stop(). Cancelling a BLPOP costs at most one wake token, which only
        # delays another idle worker until its next deadline; no job is at risk.
        blpop = asyncio.create_task(self.queue.wait_for_work(seconds))
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({blpop, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        blpop.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        if blpop.done() and not blpop.cancelled():
            blpop.result()  # StoreUnavailable goes to the retry loop
            return
        # On Python 3.11 redis-py's read (asyncio.wait_for) can swallow the cancel, and the
        # BLPOP then runs to its own timeout. Shutdown must not wait for that: give it a
        # moment, then leave it; closing the pool at exit ends it. Keep a reference so the
        # loop does not collect a pending task.
        await asyncio.wait({blpop}, timeout=0.5)
        if not blpop.done():
            self._abandoned.add(blpop)
            blpop.add_done_callback(self._abandoned.discard)

    async def _nap(self, seconds: float) -> None:
        """Sleep between claim retries, ended early by stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _free_slots(self) -> int:
        """Free send slots, once there is one. Not the room to hold jobs ahead: an idle
        worker that claimed that too would keep a burst from the other idle workers."""
        while len(self._inflight) >= self.concurrency and not self._stopping.is_set():
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return self.concurrency - len(self._inflight)

    @staticmethod
    def _block_seconds(next_deadline_ms: int | None) -> float:
        # Wake for the next retry or lease deadline; Redis pushes no event for those.
        if next_deadline_ms is None:
            return MAX_BLOCK_SECONDS
        return min(MAX_BLOCK_SECONDS, max(0.01, next_deadline_ms / 1000 + 0.005))

    async def _take(self, claim: Claim, sent: float) -> None:
        """Start the jobs of a claim that was sent at monotonic time ``sent``."""
        _notify(self.observer.on_claim, len(claim.jobs) + len(claim.unreadable),
                time.monotonic() - sent)  # fmt: skip
        if claim.lapsed_from:
            self._report_lapsed(claim.lapsed_from)
        late = self._claim_is_late(claim, sent)
        if (self._stopping.is_set() or late) and claim.jobs:
            # A claim that was on its way when stop() came (a finish's refill, typically):
            # the drain has already chosen what to wait for, so give these back unstarted.
            # A late one may already be another worker's: release is fenced by our token.
            release = functools.partial(
                self.queue.release, claim.jobs, worker_id=self.worker_id, retire=False
            )
            await _best_effort(release, "release")
        else:
            deadline = self._lease_deadline(sent)
            for claimed in claim.jobs:
                self._lease_until[claimed.task_id] = deadline
                if claimed.expires_in_ms is not None:
                    # On the safe side: Redis read its clock after `sent`.
                    self._expires_at[claimed.task_id] = sent + claimed.expires_in_ms / 1000
                self._start(claimed)
        for lost in claim.unreadable:
            # It can never be sent; failing it keeps it from coming back on every claim.
            log.error("failing task %s: %s", lost.task_id, lost.error)
            await _best_effort(functools.partial(self.queue.fail_unreadable, lost), "fail")
            _notify(self.observer.on_failed, lost, None, lost.error, 0.0)

    def _report_lapsed(self, workers: list[str]) -> None:
        """Say which workers' leases this claim found lapsed: the operator's first sign that
        one died (kill -9, OOM) or lost Redis. Their mails are back in their lanes (or
        failed, out of attempts); the task logs say `lease_expired`."""
        for worker_id, jobs in Counter(workers).items():
            log.warning("put back %d job(s) whose lease worker %s stopped renewing (it died or "
                        "lost Redis); each interrupted attempt counts", jobs,
                        worker_id or "(unknown)")  # fmt: skip
            _notify(self.observer.on_lapsed, worker_id, jobs)

    def _start(self, claimed: ClaimedJob) -> None:
        # A task claimed again while its previous run winds down (see _forget) starts clean:
        # that run's outcome is already recorded, or the task could not be claimed again.
        for flags in (self._started, self._in_data, self._recording):
            flags.discard(claimed.task_id)
        self._inflight[claimed.task_id] = claimed
        _notify(self.observer.on_claimed, claimed)
        task = asyncio.create_task(self._process(claimed))
        self._tasks[claimed.task_id] = task
        task.add_done_callback(lambda done: self._forget(claimed.task_id, done))

    def _forget(self, task_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(task_id) is task:
            self._lease_until.pop(task_id, None)
            self._expires_at.pop(task_id, None)
            self._in_data.discard(task_id)
            self._inflight.pop(task_id, None)
            self._tasks.pop(task_id, None)
            self._started.discard(task_id)
            self._recording.discard(task_id)
        # Else the same task was claimed again before this run's callback came (deferred,
        # then taken at once by a refill): its new run owns these entries. Dropping them
        # lost its lease deadline and its renewals, so its lease lapsed and cost an attempt.
        if len(self._inflight) < self.concurrency:
            # Only a free slot wakes the claim loop: on a busy worker the finish's refill
            # has already taken this slot over, and a wake-up per mail found it full.
            self._slot_freed.set()

    # -- sending ----------------------------------------------------------------------

    async def _process(self, claimed: ClaimedJob) -> None:
        ctx = _log_context(claimed)
        # A job claimed ahead (WORKER_PREFETCH) waits here for a send slot, by its lane,
        # which is given back as the send ends: recording its outcome takes no slot from
        # the next send.
        await self._send_slots.acquire(claimed.lane)
        try:
            if self._expired_while_waiting(claimed.task_id):
                result: Delivery | LeaseLost | SendError | None = None
            else:
                started = time.perf_counter()  # the attempt's time, not its wait for a slot
                try:
                    result = await self._attempt(claimed, ctx)
                except (LeaseLost, SendError) as exc:
                    result = exc
        finally:
            self._send_slots.release()
        if result is None:
            await self._give_back_expired(claimed, ctx)
        else:
            await self._settle(claimed, result, started, ctx)

    def _expired_while_waiting(self, task_id: str) -> bool:
        """Whether the job's expires_at has passed since it was claimed: a job held ahead
        of a free slot (WORKER_PREFETCH) can outwait it, and must then never be sent."""
        expires_at = self._expires_at.get(task_id)
        return expires_at is not None and time.monotonic() >= expires_at

    async def _give_back_expired(self, claimed: ClaimedJob, ctx: dict[str, Any]) -> None:
        # Back to its lane uncounted, where the next claim fails it as 'expired', as it
        # does a mail that expired in the queue. Not reachable (Redis down): its lease lapses
        # and the claim after that fails it all the same.
        log.info("not sent: its expires_at passed while it waited for a send slot", extra=ctx)
        release = functools.partial(self.queue.release, [claimed], worker_id=self.worker_id,
                                    retire=False)  # fmt: skip
        await _best_effort(release, "release")

    async def _settle(
        self,
        claimed: ClaimedJob,
        result: Delivery | LeaseLost | SendError,
        started: float,
        ctx: dict[str, Any],
    ) -> None:
        """Record what the attempt came to and tell the relay's guard how the relay did."""
        if isinstance(result, LeaseLost):
            # Nothing was sent and nothing is recorded: the job is its new owner's.
            log.info("not sent: %s", result, extra=ctx)
            _notify(self.observer.on_lease_lost, claimed, str(result))
        elif isinstance(result, OutcomeUnknown):
            await self._unknown(claimed, result, started, ctx)
        elif isinstance(result, RelayUnavailable | RelayThrottled):
            await self.relay.failed(result)
            await self._defer(claimed, result, started, ctx)
        elif isinstance(result, SendError):
            if result.code is not None:  # the relay answered about the mail: it works
                self.relay.delivered()
            await self._failed(claimed, result, started, ctx)
        else:
            self.relay.delivered()
            await self._sent(claimed, result, started, ctx)

    async def _attempt(self, claimed: ClaimedJob, ctx: dict[str, Any]) -> Delivery:
        try:
            msg = render(claimed.task_id, claimed.job, self.settings.mail_from)
            await self.relay.before_send()  # the shared send rate's slot, if it is limited
            guard = functools.partial(self._check_lease, claimed)
            async with self.sender.session() as conn:
                self._started.add(claimed.task_id)
                sender = envelope_sender(claimed.job, self._mail_from_address)
                return await conn.send(msg, sender, envelope_recipients(claimed.job), guard)
        except (LeaseLost, SendError):
            raise
        except Exception as exc:
            # A bug or a message that cannot be built: every retry would repeat it, and an
            # unrecorded crash would send the task round the lease-expiry loop instead.
            log.exception("unexpected error while sending", extra=ctx)
            raise SendError(f"internal error: {type(exc).__name__}", permanent=True) from exc

    async def _sent(
        self, claimed: ClaimedJob, delivery: Delivery, started: float, ctx: dict[str, Any]
    ) -> None:
        ms = (time.perf_counter() - started) * 1000
        if log.isEnabledFor(logging.INFO):  # the line's fields are not built for nothing
            # A line per mail: queued as a tuple and made on the log thread (log_line), not
            # a LogRecord on the loop (about 128 K to 80 K instructions a line, measured).
            log_line(log, logging.INFO, "sent", {**ctx, "smtp_code": delivery.code,
                                                 "smtp_reply": delivery.reply,
                                                 "duration_ms": round(ms, 1)})  # fmt: skip
        entry = Attempt(attempt=claimed.attempt, outcome="success", code=delivery.code,
                        reply=delivery.reply, duration_ms=round(ms, 2))  # fmt: skip
        await self._record(claimed, "success", entry)
        _notify(self.observer.on_sent, claimed, delivery.code, ms / 1000)

    async def _failed(
        self, claimed: ClaimedJob, exc: SendError, started: float, ctx: dict[str, Any]
    ) -> None:
        ms = (time.perf_counter() - started) * 1000
        delay = self.policy.retry_delay(claimed.attempt, exc)
        entry = Attempt(attempt=claimed.attempt, outcome="retry" if delay is not None else "failed",
                        code=exc.code, reply=str(exc), duration_ms=round(ms, 2))  # fmt: skip
        ctx = {**ctx, "smtp_code": exc.code, "duration_ms": round(ms, 1)}
        if delay is None:
            kind = "permanent error" if exc.permanent else "out of attempts"
            reason = f"{kind} after {claimed.attempt} attempt(s): {exc}"
            log.warning("failed: %s", reason, extra=ctx)
            await self._record(claimed, "failed", entry, reason=reason)
            _notify(self.observer.on_failed, claimed, exc.code, reason, ms / 1000)
        else:
            log.info("attempt %d of %d failed (%s); retry in %.1fs", claimed.attempt,
                     self.policy.max_attempts, exc, delay, extra=ctx)  # fmt: skip
            await self._record(claimed, "retry", entry, retry_in_ms=int(delay * 1000))
            _notify(self.observer.on_retry, claimed, exc.code, delay, ms / 1000)

    async def _unknown(
        self, claimed: ClaimedJob, exc: OutcomeUnknown, started: float, ctx: dict[str, Any]
    ) -> None:
        """The message went out and its reply never came: record ``outcome_unknown``, then
        retry or fail as ON_UNKNOWN_OUTCOME says; never the plain retry of a failed send."""
        ms = (time.perf_counter() - started) * 1000
        entry = Attempt(attempt=claimed.attempt, outcome="outcome_unknown", reply=str(exc),
                        duration_ms=round(ms, 2))  # fmt: skip
        ctx = {**ctx, "duration_ms": round(ms, 1)}
        policy = self.settings.on_unknown_outcome
        delay = self.policy.retry_delay(claimed.attempt, exc)
        if policy is UnknownOutcome.RETRY and delay is not None:
            log.warning("outcome unknown on attempt %d (%s); ON_UNKNOWN_OUTCOME=retry: sending "
                        "again in %.1fs, a possible duplicate", claimed.attempt, exc, delay,
                        extra=ctx)  # fmt: skip
            await self._record(claimed, "retry", entry, retry_in_ms=int(delay * 1000))
            _notify(self.observer.on_unknown_outcome, claimed, ms / 1000)
            _notify(self.observer.on_retry, claimed, None, delay, ms / 1000)
            return
        why = "ON_UNKNOWN_OUTCOME=fail" if policy is UnknownOutcome.FAIL else "out of attempts"
        reason = f"outcome unknown after {claimed.attempt} attempt(s) ({why}): {exc}"
        log.warning("failed: %s", reason, extra=ctx)
        await self._record(claimed, "failed", entry, reason=reason)
        _notify(self.observer.on_unknown_outcome, claimed, ms / 1000)
        _notify(self.observer.on_failed, claimed, None, reason, ms / 1000)

    async def _defer(
        self, claimed: ClaimedJob, exc: SendError, started: float, ctx: dict[str, Any]
    ) -> None:
        """The relay failed, not the mail: back to the queue without using up an attempt,
        unless the mail has waited on the relay for SMTP_OUTAGE_MAX_SECONDS."""
        ms = (time.perf_counter() - started) * 1000
        how = self.relay.deferral(exc)
        entry = Attempt(attempt=claimed.attempt, outcome="deferred", code=exc.code,
                        reply=str(exc), duration_ms=round(ms, 2))  # fmt: skip
        self._recording.add(claimed.task_id)
        applied = "deferred"
        # Nothing was sent, but a lapsed lease would count the attempt: keep trying.
        async for attempt in _until_redis_answers("defer"):
            with attempt:
                applied = await self.relay.store.defer(claimed, entry, how)
        if applied == "failed":
            log.warning("failed: %s", how.reason_if_expired, extra=ctx)
            _notify(self.observer.on_failed, claimed, exc.code, how.reason_if_expired, ms / 1000)
        elif applied == "deferred":
            log.debug("relay failed (%s); back in the queue, attempt not counted", exc, extra=ctx)
            _notify(self.observer.on_deferred, claimed, exc.code, ms / 1000)
        else:
            log.warning("deferral not applied (%s): lease was lost", applied, extra=ctx)
            _notify(self.observer.on_lease_lost, claimed, f"deferral not applied ({applied})")

    async def _record(
        self, claimed: ClaimedJob, outcome: Outcome, entry: Attempt, **kwargs: Any
    ) -> None:
        self._recording.add(claimed.task_id)
        # The busy path: record, and claim the job that takes over this slot, in one round
        # trip, shared with the other slots whose sends ended meanwhile (FinishCoalescer).
        # The claim loop only claims for slots left empty.
        refill = self._refill()
        ahead = refill.count - 1 if refill is not None else 0  # counted in _asked_ahead
        done = Finish(claimed, outcome, entry, refill=refill, **kwargs)
        try:
            sent = time.monotonic()  # no later than the call: the lease clock's safe side
            try:
                applied, claim = await self.finishes.finish(done)
            finally:
                # What the claim brought is in _inflight once _take starts (no await before
                # it does), so it is counted there and not here.
                self._asked_ahead -= ahead
            if claim is not None:
                await self._take(claim, sent)
        except StoreUnavailable as exc:
            # The send already happened: keep trying to record it through a Redis outage.
            # Without a claim: jobs claimed by a call whose reply was lost would sit leased
            # to nobody until their lease lapsed. Should Redis have run the call that
            # failed, the retry is answered as that call was (finish.lua).
            log.warning("Redis unavailable during finish (%s); retrying", exc,
                        extra=_log_context(claimed))  # fmt: skip
            async for attempt in _until_redis_answers("finish"):
                with attempt:
                    applied = await self.queue.finish(claimed, outcome, entry, **kwargs)
        self._report_lost_outcome(claimed, outcome, applied)

    @staticmethod
    def _report_lost_outcome(claimed: ClaimedJob, outcome: Outcome, applied: str) -> None:
        """Warn when the lease was lost and it mattered: a retry or failure that another
        worker now decides, or a success for a task someone had already finished (a second
        copy went out). A lease lost only while the outcome was being written is no loss."""
        if applied not in ("stale", "ignored", "missing"):
            return
        ctx = _log_context(claimed)
        if applied == "missing":
            # Not a lease passed on: nothing of the task is left to record this in (Redis
            # restarted without its data, or it was deleted). No other worker has it.
            log.warning("outcome %s not recorded: the task is no longer in Redis (did Redis "
                        "lose its data?)", outcome, extra=ctx)  # fmt: skip
        elif outcome == "success":
            log.warning(
                "sent, but the task was already final: its lease had passed to "
                "another worker mid-send, so this copy may be a duplicate",
                extra=ctx,
            )
        else:
            log.warning("outcome %s not applied (%s): the lease was lost and the task is "
                        "another worker's now", outcome, applied, extra=ctx)  # fmt: skip

    def _refill(self) -> Refill | None:
        """The claim to make with a finish: this slot's replacement, unless stopping, or
        unless our leases may have lapsed (see _claim_forever: the claim would put our own
        in-flight jobs back), or unless the relay is down."""
        if self._stopping.is_set() or self._renewal_is_stale() or not self.relay.accepting():
            return None
        return Refill(self.worker_id, 1 + self._claim_ahead(), self.lease_ms)

    def _claim_ahead(self) -> int:
        """1 while every send slot is taken and fewer than WORKER_PREFETCH jobs are held
        ahead (counting those asked for and on the way), else 0. So the hold builds one job
        a finish on a busy worker only, and never past ``held_limit``. The slots are judged
        by the jobs held alone: a slot left empty (a deferral, say) is the claim loop's to
        fill, and counting a job asked ahead against it as well let the hold pass its limit
        (helper review: 5 held at a limit of 4 with a slow Redis)."""
        held = len(self._inflight) + self._asked_ahead  # the job finishing still counts
        if len(self._inflight) < self.concurrency or held >= self.held_limit:
            return 0
        self._asked_ahead += 1
        return 1

    def _renewal_is_stale(self) -> bool:
        return time.monotonic() - self._renewed_at > self.settings.job_lease_seconds / 2

    # -- leases -----------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = self.settings.heartbeat_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew_once()
            except StoreUnavailable as exc:
                log.warning("heartbeat and lease renewal failed: %s", exc)

    async def _renew_once(self) -> None:
        sent = time.monotonic()
        held = list(self._inflight.values())
        lost = await self.queue.renew(held, self.lease_ms, worker_id=self.worker_id)
        self._renewed_at = sent
        self._note_renewal([c.task_id for c in held], set(lost), sent)
        _notify(self.observer.on_renewal, len(held), len(lost))

    def _note_renewal(self, renewed: list[str], lost: set[str], sent: float) -> None:
        """Move each renewed job's lease deadline on; a lost one is not sent any more (its
        next lease check stops it). No warning here: a job whose outcome is being written
        loses its lease by design, and one already in DATA may still be delivered and
        recorded; ``_record`` warns when an outcome really was lost."""
        deadline = self._lease_deadline(sent)
        for task_id in renewed:
            if task_id in self._lease_until:
                self._lease_until[task_id] = LOST if task_id in lost else deadline

    def _lease_deadline(self, sent: float) -> float:
        """Until when a lease granted (or renewed) by a call sent at ``sent`` may be trusted."""
        return sent + self.settings.job_lease_seconds * (1 - LEASE_SAFETY)

    def _claim_is_late(self, claim: Claim, sent: float) -> bool:
        """A claim reply that came after its own lease deadline (a stalled Redis, a paused
        process): its leases may have lapsed and the jobs may be another worker's already."""
        if not claim.jobs or time.monotonic() < self._lease_deadline(sent):
            return False
        log.warning("claim reply came %.1fs after it was sent, past its lease; giving back "
                    "%d job(s) unsent", time.monotonic() - sent, len(claim.jobs))  # fmt: skip
        return True

    async def _check_lease(self, claimed: ClaimedJob, step: str) -> None:
        """Raise ``LeaseLost`` unless this job's lease surely still holds: the guard run
        before MAIL FROM, DATA and the message (see ``TimedSMTP``). Within the local deadline
        it costs nothing; past it (renewals late or failing, the process paused), one
        renewal of this job asks Redis, and anything but "still yours" stops the send."""
        task_id = claimed.task_id
        until = self._lease_until.get(task_id, LOST)
        if until == LOST:
            raise LeaseLost(f"lease passed to another worker before {step}")
        if time.monotonic() >= until:
            sent = time.monotonic()
            try:
                lost = await self.queue.renew([claimed], self.lease_ms, worker_id=self.worker_id)
            except StoreUnavailable as exc:
                raise LeaseLost(f"lease unconfirmed before {step} (Redis: {exc})") from exc
            if lost:
                self._lease_until[task_id] = LOST
                raise LeaseLost(f"lease passed to another worker before {step}")
            self._lease_until[task_id] = self._lease_deadline(sent)
        if step == "message":
            self._in_data.add(task_id)

    # -- shutdown ---------------------------------------------------------------------

    async def _drain(self) -> None:
        unstarted = [c for tid, c in self._inflight.items() if tid not in self._started]
        await _cancel_all([self._tasks[c.task_id] for c in unstarted if c.task_id in self._tasks])
        if unstarted:
            await _best_effort(
                lambda: self.queue.release(unstarted, worker_id=self.worker_id), "release"
            )
            log.info("returned %d unstarted job(s) to the queue", len(unstarted))
        running = list(self._tasks.values())
        if running:
            grace = self.settings.worker_shutdown_grace_seconds
            log.info("waiting up to %.0fs for %d send(s) in flight", grace, len(running))
            _, late = await asyncio.wait(running, timeout=grace)
            if late:
                log.warning("%d send(s) outlived the grace period; their leases will lapse "
                            "and another worker will retry them", len(late))  # fmt: skip
                sent = [self._inflight[t] for t in self._in_data if t in self._inflight]
                await _cancel_all(list(late))
                await self._record_cut_off(sent)

    async def _record_cut_off(self, sent: list[ClaimedJob]) -> None:
        """Sends cut off by the drain after their message went out: their outcome is
        unknown, so say so (ON_UNKNOWN_OUTCOME decides) rather than let the lease lapse
        into a silent resend."""
        for claimed in sent:
            ctx = _log_context(claimed)
            cut = OutcomeUnknown("the worker stopped while waiting for the reply to the end "
                                 "of DATA; the relay may have delivered it")  # fmt: skip
            # Bounded: _record waits out a Redis outage, and an exit must not. If Redis does
            # not take it in time, the lease lapses and the task is retried, as before.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECORD_ON_EXIT_SECONDS):
                    await self._unknown(claimed, cut, time.perf_counter(), ctx)


def _log_context(claimed: ClaimedJob) -> dict[str, Any]:
    """What every log line about ``claimed`` carries (worker_id is bound for the run)."""
    return {"task_id": claimed.task_id, "request_id": claimed.request_id,
            "lane": claimed.lane, "attempt": claimed.attempt}  # fmt: skip


def _notify(hook: Callable[P, None], *args: P.args, **kwargs: P.kwargs) -> None:
    """Call an observer hook; a failing observer is logged, never the worker's failure."""
    try:
        hook(*args, **kwargs)
    except Exception:
        log.exception("observer hook %s failed", getattr(hook, "__name__", hook))


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again while any runs.

    On Python 3.11 a cancel that lands as a timeout fires inside redis-py or
    ``asyncio.wait_for`` can come out as a TimeoutError, which the loops here take for an
    outage and go on (after SIGSTOP/SIGCONT every timer fires at once): a single cancel
    then left ``run()`` waiting for the relay task forever, and the process never exited."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
    await asyncio.gather(*tasks, return_exceptions=True)


async def _best_effort(call: Callable[[], Awaitable[object]], what: str) -> None:
    try:
        await call()
    except StoreUnavailable as exc:
        log.warning("%s skipped, Redis unavailable (%s); leases will lapse instead", what, exc)
