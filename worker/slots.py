"""The worker's send slots: at most WORKER_CONCURRENCY sends at once, handed out by lane.

Without WORKER_PREFETCH nobody ever waits here: a worker holds no more jobs than it has
slots. With it, the jobs claimed ahead wait, and a first-come semaphore would make a high
mail claimed now wait behind every default one claimed before it. So a freed slot goes to
a waiting job in the order the claim itself picks lanes (``claim.lua``'s ``lane_order``):
highest first, except that every ``fair_every``-th choice is a fair turn that starts at a
lower lane (the next lower one each turn, then the rest, lowest first), so a default or low
mail held ahead keeps moving behind a stream of high ones, as it would in Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence


def lane_order(turn: int, lanes: Sequence[str], fair_every: int) -> Sequence[str]:
    """The lanes in the order the ``turn``-th choice reads them (``claim.lua``'s rule)."""
    if turn % fair_every or len(lanes) < 2:
        return lanes
    first = len(lanes) - 1 - (turn // fair_every) % (len(lanes) - 1)  # 0-based, of the lower
    return [lanes[first], *(lanes[i] for i in reversed(range(len(lanes))) if i != first)]


class SendSlots:
    """``slots`` at once; a waiter is served by its lane (see the module docstring)."""

    def __init__(self, slots: int, lanes: Sequence[str], fair_every: int, default: str) -> None:
        self._free = slots
        self._default = default  # the lane of a job whose claim did not name one
        self._lanes = tuple(lanes)
        self._fair_every = fair_every
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {
            lane: collections.deque() for lane in self._lanes
        }
        self._waiters = 0
        self._turns = 0  # choices made among waiters, for the fair turns

    async def acquire(self, lane: str | None) -> None:
        """Take a send slot, waiting in ``lane`` while none is free; ``release`` gives it
        back. A pair of calls, not a generator-based ``async with``: one is taken per send,
        and the generator would cost each send more than the uncontended take."""
        if self._free and not self._waiters:
            self._free -= 1
            return
        await self._wait(lane if lane in self._waiting else self._default)

    async def _wait(self, lane: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(future)
        self._waiters += 1
        try:
            await future
        except asyncio.CancelledError:
            if not future.cancelled():
                self.release()  # granted as it was cancelled: the slot goes to the next
            else:
                with contextlib.suppress(ValueError):  # else release has dropped it
                    self._waiting[lane].remove(future)
                    self._waiters -= 1
            raise

    def release(self) -> None:
        """Give a slot back: straight to the next waiter by lane, or free."""
        while self._waiters:
            future = self._next()
            if not future.cancelled():  # one cancelled has yet to run its except clause
                future.set_result(None)
                return
        self._free += 1

    def _next(self) -> asyncio.Future[None]:
        self._turns += 1
        for lane in lane_order(self._turns, self._lanes, self._fair_every):
            if waiting := self._waiting[lane]:
                self._waiters -= 1
                return waiting.popleft()
        raise AssertionError("a waiter was counted but is in no lane")
