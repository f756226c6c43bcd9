"""Scheduled mail across a worker restart, with the worker as a real ``python -m worker``
process stopped by SIGTERM. Times come from Redis (``TIME``); waits only bound a failure.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable

import pytest

from emailq.models import Status
from emailq.settings import Settings
from tests.helpers.polling import read_log
from tests.helpers.processes import Procs
from tests.helpers.queues import add, producer, redis_now_ms, settle
from tests.helpers.smtpd import SmtpServer

pytestmark = pytest.mark.slow

AHEAD_MS = 3000  # room for the first worker's SIGTERM shutdown before the mail is due


async def sigterm(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 30)


async def test_a_scheduled_mail_is_sent_on_time_after_a_worker_restart(
    make_settings: Callable[..., Settings], smtp: SmtpServer, procs: Procs
) -> None:
    settings = make_settings()
    first = procs.worker(settings)
    async with producer(settings) as queue:
        send_at = await redis_now_ms(queue) + AHEAD_MS
        [task_id] = await add(queue, "later", send_at_ms=send_at)

        signalled_at = await redis_now_ms(queue)
        code = await sigterm(first)
        stopped_at = await redis_now_ms(queue)
        between = await queue.get(task_id)

        second = procs.worker(settings)
        final = (await settle(queue, [task_id]))[task_id]
        await sigterm(second)

    print(
        f"\nfirst worker exited {stopped_at - signalled_at} ms after SIGTERM; mail sent "
        f"{(final.sent_at or 0) - send_at} ms after its time by the second"
    )
    assert code == 0, read_log(first)[-2000:]
    assert stopped_at < send_at  # the first worker really was gone before the mail was due
    assert between is not None
    assert (between.status, between.scheduled_at, between.attempts) == (Status.PENDING, send_at, 0)
    assert final.status is Status.SUCCESS
    assert final.sent_at is not None
    assert final.sent_at >= send_at
    assert smtp.handler.task_ids() == [task_id]
