"""The event stream holds every state change of a task, in order, written by the scripts
that made them: through a retry (a worker run in-process) and through a worker killed with
SIGKILL mid-send (real worker processes). Real Redis, real SMTP servers (aiosmtpd)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from emailq.models import Event, EventType
from emailq.queue import Queue
from emailq.settings import Settings
from tests.helpers.api import Api
from tests.helpers.polling import eventually, wait_until
from tests.helpers.processes import Procs, sigkill
from tests.helpers.queues import producer
from tests.helpers.smtpd import SmtpServer
from tests.helpers.workers import TrackingHandler, running, scripted

Factory = Callable[..., SmtpServer]


async def events_of(queue: Queue, task_id: str) -> list[Event]:
    """Every event of ``task_id`` in the stream, oldest first, read page by page as a
    consumer reads on from the last id it saw."""
    found: list[Event] = []
    after = "0"
    while page := await queue.events(after, count=50):
        found += [event for event in page if event.task_id == task_id]
        after = page[-1].id
    return found


def assert_ordered(events: list[Event]) -> None:
    """Stream ids strictly increase, Redis times never go back, one request id throughout."""
    ids = [tuple(int(part) for part in e.id.split("-")) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    times = [e.time for e in events]
    assert times == sorted(times)
    assert len({e.request_id for e in events}) == 1
    assert events[0].request_id


async def test_the_stream_holds_each_change_of_a_retried_task_in_order(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    smtp = scripted(smtp_factory, ["450 4.2.1 mailbox busy, try later"])
    settings = make_settings(smtp_port=smtp.port)
    async with running(settings) as run:
        (task_id,) = await run.submit()
        record = await run.settled(task_id)
        assert record.status == "success"
        events = await events_of(run.queue, task_id)

    assert [(e.type, e.attempt, e.code) for e in events] == [
        (EventType.ACCEPTED, 0, None),
        (EventType.CLAIMED, 1, None),
        (EventType.RETRY, 1, 450),
        (EventType.CLAIMED, 2, None),
        (EventType.SENT, 2, 250),
    ]
    assert events[2].reason.startswith("450")
    assert {e.lane for e in events} == {"default"}
    assert events[1].worker == events[2].worker == events[4].worker == run.worker.worker_id
    assert_ordered(events)
    assert smtp.handler.task_ids() == [task_id]


@pytest.mark.slow
async def test_the_stream_follows_a_task_across_a_worker_killed_mid_send(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    # Slow to answer DATA, so the kill lands mid-send; aiosmtpd drops the killed
    # connection's message, so the second worker's copy is the one delivered.
    handler = TrackingHandler(delay=1.0)
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, job_lease_seconds=1)
    api = Api(procs.api(settings))
    (task_id,) = api.enqueue(1)
    first = procs.worker(settings)
    wait_until(lambda: handler.in_flight > 0, what="the send in DATA", proc=first)
    sigkill(first)
    procs.worker(settings)

    async with producer(settings) as queue:

        async def sent() -> bool:
            return any(e.type is EventType.SENT for e in await events_of(queue, task_id))

        await eventually(sent, "the task to be sent by the second worker")
        events = await events_of(queue, task_id)

    assert [(e.type, e.attempt) for e in events] == [
        (EventType.ACCEPTED, 0),
        (EventType.CLAIMED, 1),
        (EventType.LEASE_EXPIRED, 1),
        (EventType.CLAIMED, 2),
        (EventType.SENT, 2),
    ]
    claimed_by = [e.worker for e in events if e.type is EventType.CLAIMED]
    assert claimed_by[0] != claimed_by[1]
    assert events[-1].worker == claimed_by[1]
    assert events[-1].code == 250
    # The lapse names the worker that stopped renewing: the first claimer, killed.
    assert events[2].reason == f"worker {claimed_by[0]} stopped renewing its lease"
    assert events[2].worker == claimed_by[0]
    assert_ordered(events)
    assert handler.task_ids() == [task_id]  # delivered once
