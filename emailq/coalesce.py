"""Coalesce concurrent enqueues, and concurrent finishes, into one Redis script call each.

Under load the API's cost per send is dominated by the Redis client, not by Redis: each call
takes a pooled connection, packs, writes, waits and parses on its own. Here every send that
arrives while a store is in flight waits for the next one, and that next one stores all of
them in one atomic ``enqueue`` call (group commit). An idle API still stores a lone send at
once. Each caller awaits its own task's reply, so 202 still means stored, and each is
checked against the storage limits on its own: one sender over its quota fails only its
own request.

When Redis stalls, a caller waits for the call in flight and then its own, each bounded by
the client's timeout, and never longer than ``budget_seconds`` in all. Its answer says what
is known: ``StoreUnavailable`` if its task was never sent (still waiting, or behind a call
that failed), ``StoreOutcomeUnknown`` if it was in a call Redis did not answer.

The worker's finishes go the same way (``FinishCoalescer``): at hundreds of sends in flight,
the outcomes of the sends that end while one ``finish`` call is in flight are recorded, and
their slots refilled, by the next single call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence

from emailq.errors import StoreOutcomeUnknown, StoreUnavailable
from emailq.models import ClaimedJob
from emailq.queue import Claim, EnqueueItem, Finish, Idempotency, Queue, Replay

MAX_BATCH = 256  # tasks per script call: Redis runs a script alone, so keep each one short

_Future = asyncio.Future["Replay | None"]
_Pending = tuple[EnqueueItem, Idempotency | None, _Future]


class EnqueueCoalescer:
    """``enqueue_once`` with the same meaning as ``Queue.enqueue_once``, stored in groups."""

    def __init__(
        self, queue: Queue, *, max_batch: int = MAX_BATCH, budget_seconds: float | None = None
    ) -> None:
        self.queue = queue
        self.max_batch = max_batch
        self.budget_seconds = budget_seconds  # longest wait for an answer; None: no limit
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        # Every caller's deadline, in the order they came: with one budget for all, that is
        # the order in which they fall due, so one timer (the watchdog, set for the oldest
        # deadline not yet answered) serves every caller, rather than a timer set and
        # cancelled per send. Answered callers are dropped when the watchdog goes off.
        self._deadlines: collections.deque[tuple[float, _Future]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    async def enqueue_once(
        self, item: EnqueueItem, idempotency: Idempotency | None
    ) -> Replay | None:
        """Store ``item`` (see ``Queue.enqueue_once``); returns once Redis has answered."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Replay | None] = loop.create_future()
        self._pending.append((item, idempotency, future))
        if self._flusher is None:
            # Runs after the callbacks already scheduled in this loop iteration, so requests
            # parsed from the same read of the sockets share the first call.
            self._flusher = asyncio.create_task(self._flush())
        if self.budget_seconds is not None:
            # The watchdog answers this caller's own future when its budget is spent,
            # rather than wait_for(shield(...)), which costs a second future and its
            # callbacks on every send. The future is this caller's alone: answering it
            # early cancels nothing its neighbours share.
            deadline = loop.time() + self.budget_seconds
            self._deadlines.append((deadline, future))
            if self._watchdog is None:
                self._watchdog = loop.call_at(deadline, self._expire)
        return await future

    def _expire(self) -> None:
        """The watchdog: give up on every caller whose budget is spent, then wait for the
        next deadline of one still waiting, if any."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, future = deadlines[0]
            if not future.done() and deadline > now:
                self._watchdog = loop.call_at(deadline, self._expire)
                return
            deadlines.popleft()
            self._give_up(future)

    def _give_up(self, future: _Future) -> None:
        """The caller's budget is spent with no answer from Redis: not stored (it was still
        waiting, and is withdrawn) or unknown (it is in a call Redis has not answered)."""
        if future.done():
            return
        waiting = len(self._pending)
        self._pending = [entry for entry in self._pending if entry[2] is not future]
        if len(self._pending) < waiting:
            future.set_exception(
                StoreUnavailable(f"not stored: Redis took nothing in {self.budget_seconds}s")
            )
        else:
            future.set_exception(
                StoreOutcomeUnknown(f"Redis did not answer within {self.budget_seconds}s")
            )

    async def _flush(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                if not await self._store(batch):
                    self._refuse_pending()
        except asyncio.CancelledError:
            # The process is stopping: no caller may be left waiting for an answer.
            for *_, future in [*batch, *self._pending]:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    def _refuse_pending(self) -> None:
        # Redis just failed a call (it timed out, or refused a connection): the ones waiting
        # behind it answer "not stored" at once, rather than each waiting out another
        # timeout and so doubling the time to a 503. Nothing of theirs was sent.
        refused, self._pending = self._pending, []
        for *_, future in refused:
            if not future.done():
                future.set_exception(StoreUnavailable("not stored: Redis failed the call before"))

    async def _store(self, batch: Sequence[_Pending]) -> bool:
        """Store one call's worth; False if Redis could not be reached or did not answer."""
        encoded, waiting = self._encode(batch)
        if not encoded:
            return True
        try:
            replies = await self.queue.store_encoded(encoded)
        except Exception as exc:  # StoreUnavailable: every caller answers its own 503
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return not isinstance(exc, StoreUnavailable)
        for future, reply in zip(waiting, replies, strict=True):
            if future.done():  # its caller may have gone (client disconnected)
                continue
            if isinstance(reply, Exception):  # its request did not fit: it alone is refused
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._forget_answered()
        return True

    def _forget_answered(self) -> None:
        # Callers are answered mostly in the order they came: drop the answered ones at
        # the front now, rather than keep their futures (and whatever those hold) alive
        # until the watchdog next goes off.
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()

    def _encode(self, batch: Sequence[_Pending]) -> tuple[list[str], list[_Future]]:
        # A task that cannot be encoded fails its own request, never the others in the call.
        encoded: list[str] = []
        waiting: list[_Future] = []
        for item, once, future in batch:
            try:
                encoded.append(self.queue.encode_task(item, once))
            except Exception as exc:  # handed to its caller, whose request fails with it
                if not future.done():
                    future.set_exception(exc)
                continue
            waiting.append(future)
        return encoded, waiting


_Finished = tuple[str, "Claim | None"]  # the outcome applied, and the slot's refill if any
_FinishFuture = asyncio.Future[_Finished]


class FinishCoalescer:
    """``finish`` with the meaning of ``Queue.finish_many`` for one ``Finish``, recorded in
    groups: every finish that comes while a call is in flight goes in the next one. A lone
    finish is sent at once. A Redis error of a call is the error of every finish in it
    (Redis ran all of them or none: one script), so each caller retries on its own, as it
    did when it had a call of its own; a retry of one Redis had recorded after all is
    answered as that call was (finish.lua)."""

    def __init__(self, queue: Queue, *, max_batch: int = MAX_BATCH) -> None:
        self.queue = queue
        self.max_batch = max_batch
        self._pending: list[tuple[Finish, _FinishFuture]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def finish(self, done: Finish) -> _Finished:
        """Record ``done``; returns the outcome applied and, if it asked for a refill, the
        claim of its slot's share (possibly empty)."""
        future: _FinishFuture = asyncio.get_running_loop().create_future()
        self._pending.append((done, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[Finish, _FinishFuture]] = []
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                # A caller cancelled while waiting (a drain cut its send off) is not
                # recorded here, as its own call would not have been made.
                batch = [(done, future) for done, future in batch if not future.done()]
                if batch:
                    await self._record(batch)
        except asyncio.CancelledError:
            for _, future in [*batch, *self._pending]:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    async def _record(self, batch: Sequence[tuple[Finish, _FinishFuture]]) -> None:
        try:
            shares = await self.queue.finish_many([done for done, _ in batch])
        except Exception as exc:  # StoreUnavailable and its kinds: each caller retries
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        orphans: list[ClaimedJob] = []
        owner = ""
        for (done, future), (applied, claim) in zip(batch, shares, strict=True):
            if not future.done():
                future.set_result((applied, claim))
            elif claim is not None and done.refill is not None:
                orphans += claim.jobs  # claimed for a caller who has gone
                owner = done.refill.worker_id
        if orphans:
            # Back to their lane now, rather than leased to nobody until the lease lapses
            # (best effort: that lapse is the fallback).
            with contextlib.suppress(StoreUnavailable):
                await self.queue.release(orphans, worker_id=owner, retire=False)
