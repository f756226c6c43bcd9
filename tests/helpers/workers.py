"""A worker run in-process, composed exactly as ``python -m worker`` composes it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from emailq.models import TERMINAL, Job, Status, TaskRecord
from emailq.queue import Queue
from emailq.settings import Settings
from tests.helpers.polling import eventually
from tests.helpers.smtpd import RecordingHandler, SmtpServer
from worker.__main__ import build_worker
from worker.loop import Worker
from worker.observer import WorkerObserver

Factory = Callable[..., SmtpServer]


@dataclass
class TrackingHandler(RecordingHandler):
    """Also records every connection that reached DATA (accepted or not) and the most
    DATA commands in progress at once."""

    peers: set[tuple[str, int]] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            self.peers.add(session.peer)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await super().handle_DATA(server, session, envelope)
        finally:
            with self.lock:
                self.in_flight -= 1


def scripted(factory: Factory, replies: Iterable[str] = (), delay: float = 0.0) -> SmtpServer:
    """An SMTP server (``smtp_factory``) answering DATA with ``replies``, then 250."""
    return tracked(factory, replies, delay)[0]


def tracked(
    factory: Factory, replies: Iterable[str] = (), delay: float = 0.0
) -> tuple[SmtpServer, TrackingHandler]:
    """``scripted``, and its handler as the ``TrackingHandler`` it is (for its counts)."""
    handler = TrackingHandler(replies=list(replies), delay=delay)
    return factory(handler=handler), handler


@dataclass
class Running:
    """A worker task and the queue it serves."""

    queue: Queue
    worker: Worker
    task: asyncio.Task[None]

    async def submit(self, count: int = 1, **job: Any) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        for task_id in ids:
            fields = {"to": "user@example.com", "subject": "Hi", "text": "Hello", **job}
            await self.queue.enqueue(task_id, Job(**fields), request_id=f"req-{task_id[:8]}")
        return ids

    async def settled(self, task_id: str) -> TaskRecord:
        """Poll until the task is terminal (bounded)."""
        found: list[TaskRecord] = []

        async def terminal() -> bool:
            record = await self.queue.get(task_id)
            if record is not None and record.status in TERMINAL:
                found.append(record)
            return bool(found)

        await eventually(terminal, f"task {task_id} to be final")
        return found[0]

    async def state(self, task_id: str) -> tuple[Status, int] | None:
        record = await self.queue.get(task_id)
        return (record.status, record.attempts) if record else None

    async def send(self, count: int = 1, **job: Any) -> list[TaskRecord]:
        return [await self.settled(task_id) for task_id in await self.submit(count, **job)]

    async def stop(self) -> None:
        self.worker.stop()
        await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def running(
    settings: Settings, observer: WorkerObserver | None = None
) -> AsyncIterator[Running]:
    """The worker ``python -m worker`` would run (``build_worker``), as a task of this
    loop; stopped, and its queue closed, at the end."""
    worker = build_worker(settings, observer)
    run = Running(worker.queue, worker, asyncio.create_task(worker.run()))
    try:
        yield run
    finally:
        if not run.task.done():
            await run.stop()
        await worker.queue.close()


async def deliver(settings: Settings, count: int = 1, **job: Any) -> list[TaskRecord]:
    """Send ``count`` jobs through a fresh worker and return their final records."""
    async with running(settings) as run:
        return await run.send(count, **job)
