"""Coalesce concurrent enqueues into one Redis script call.

Under load the API's cost per send is dominated by the Redis client, not by Redis: each call
takes a pooled connection, packs, writes, waits and parses on its own. Here every send that
arrives while a store is in flight waits for the next one, and that next one stores all of
them in one atomic ``enqueue`` call (group commit). An idle API still stores a lone send at
once. Each caller awaits its own task's reply, so 202 still means stored, and each is
checked against the storage limits on its own: one sender over its quota fails only its
own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from emailq.queue import EnqueueItem, Idempotency, Queue, Replay

MAX_BATCH = 256  # tasks per script call: Redis runs a script alone, so keep each one short

_Future = asyncio.Future["Replay | None"]
_Pending = tuple[EnqueueItem, Idempotency | None, _Future]


class EnqueueCoalescer:
    """``enqueue_once`` with the same meaning as ``Queue.enqueue_once``, stored in groups."""

    def __init__(self, queue: Queue, *, max_batch: int = MAX_BATCH) -> None:
        self.queue = queue
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def enqueue_once(
        self, item: EnqueueItem, idempotency: Idempotency | None
    ) -> Replay | None:
        """Store ``item`` (see ``Queue.enqueue_once``); returns once Redis has answered."""
        future: asyncio.Future[Replay | None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, idempotency, future))
        if self._flusher is None:
            # Runs after the callbacks already scheduled in this loop iteration, so requests
            # parsed from the same read of the sockets share the first call.
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._store(batch)
        except asyncio.CancelledError:
            # The process is stopping: no caller may be left waiting for an answer.
            for *_, future in [*batch, *self._pending]:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    async def _store(self, batch: Sequence[_Pending]) -> None:
        encoded, waiting = self._encode(batch)
        if not encoded:
            return
        try:
            replies = await self.queue.store_encoded(encoded)
        except Exception as exc:  # StoreUnavailable: every caller answers its own 503
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, reply in zip(waiting, replies, strict=True):
            if future.done():  # its caller may have gone (client disconnected)
                continue
            if isinstance(reply, Exception):  # its request did not fit: it alone is refused
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _encode(self, batch: Sequence[_Pending]) -> tuple[list[str], list[_Future]]:
        # A task that cannot be encoded fails its own request, never the others in the call.
        encoded: list[str] = []
        waiting: list[_Future] = []
        for item, once, future in batch:
            try:
                encoded.append(self.queue.encode_task(item, once))
            except Exception as exc:  # handed to its caller, whose request fails with it
                future.set_exception(exc)
                continue
            waiting.append(future)
        return encoded, waiting
