"""ResultWaiter against the real Redis: stopping never hangs, whatever the listener is doing."""

from __future__ import annotations

import asyncio

from emailq.queue import Queue
from emailq.waiting import ResultWaiter


async def test_stop_returns_wherever_the_listener_is(redis_url: str) -> None:
    # Stops land while the listener connects, subscribes or reads. On Python 3.11 a cancel
    # that lands as redis-py's wait_for completes is swallowed; stop() must still return.
    for step in range(40):
        queue = Queue.from_url(redis_url, timeout=0.5)
        waiter = ResultWaiter(queue)
        await waiter.start()
        for _ in range(step % 8):
            await asyncio.sleep(0)
        await asyncio.wait_for(waiter.stop(), 5)
        await queue.close()
