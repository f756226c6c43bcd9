"""The worker's send slots (``worker.slots``): the bound, the order by lane, and what a
cancelled waiter leaves behind. The lane order is checked against Redis's own claim."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from emailq.models import LANES, Priority
from emailq.queue import FAIR_EVERY, Queue
from tests.helpers.queues import LONG, add
from worker.slots import SendSlots

TURNS = 3 * FAIR_EVERY  # enough choices for a fair turn to each lower lane


def slots(count: int) -> SendSlots:
    return SendSlots(count, LANES, FAIR_EVERY, Priority.DEFAULT)


@asynccontextmanager
async def slot(gate: SendSlots, lane: str | None) -> AsyncIterator[None]:
    """A slot held for the block, taken and given back as the worker does."""
    await gate.acquire(lane)
    try:
        yield
    finally:
        gate.release()


async def test_waiters_are_served_in_the_order_the_claim_pops_the_lanes(queue: Queue) -> None:
    # Redis: every lane full, claimed one at a time.
    for lane in LANES:
        await add(queue, f"{lane}-", TURNS, lane=lane)
    claimed = [(await queue.claim("w1", 1, LONG)).jobs[0].lane for _ in range(TURNS)]

    # The slots: one held, every lane waiting, then the slot passed on TURNS times.
    gate = slots(1)
    served: list[str] = []

    async def wait_in(lane: str) -> None:
        async with slot(gate, lane):
            served.append(lane)
            await asyncio.sleep(0)  # held until the next is let in, one at a time

    async with slot(gate, Priority.HIGH):
        waiters = [asyncio.create_task(wait_in(lane)) for lane in LANES for _ in range(TURNS)]
        await asyncio.sleep(0)  # all of them waiting before the first slot frees
    await asyncio.gather(*waiters)

    assert served[:TURNS] == claimed
    assert {Priority.DEFAULT, Priority.LOW} <= set(claimed)  # the fair turns were reached


async def test_no_more_than_the_slots_run_at_once_and_each_waiter_runs() -> None:
    gate = slots(2)
    running = peak = 0

    async def send(lane: str) -> None:
        nonlocal running, peak
        async with slot(gate, lane):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1

    await asyncio.gather(*(send(LANES[n % len(LANES)]) for n in range(30)))

    assert peak == 2
    assert running == 0


async def test_a_cancelled_waiter_takes_no_slot_with_it() -> None:
    gate = slots(1)
    order: list[str] = []

    async def send(name: str, lane: str | None) -> None:
        async with slot(gate, lane):
            order.append(name)

    async with slot(gate, Priority.DEFAULT):
        gone = asyncio.create_task(send("gone", Priority.HIGH))
        unnamed = asyncio.create_task(send("unnamed lane", None))  # waits as default
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
    await unnamed

    assert gone.cancelled()
    assert order == ["unnamed lane"]
    async with slot(gate, Priority.LOW):  # the slot came back: taken at once
        order.append("after")
    assert order == ["unnamed lane", "after"]


async def test_a_waiter_cancelled_as_it_is_granted_passes_the_slot_on() -> None:
    gate = slots(1)
    order: list[str] = []

    async def send(name: str) -> None:
        async with slot(gate, Priority.DEFAULT):
            order.append(name)

    await gate.acquire(Priority.DEFAULT)
    first = asyncio.create_task(send("first"))
    second = asyncio.create_task(send("second"))
    await asyncio.sleep(0)
    gate.release()  # grants "first", which has yet to run
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)

    assert first.cancelled()
    assert order == ["second"]
