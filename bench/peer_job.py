"""The job every peer queue runs, and the clock that times it.

The job is the plain loop's: emailq's message build, sent with ``aiosmtplib.SMTP`` over
connections that are opened once and reused, one per job in flight. It imports nothing
from ``worker/``: a peer sends the way a user of that peer would, so its rate divided by
the plain loop's is what the peer's queue costs. (emailq's own sender adds its per-step
deadline guards on top; that cost is emailq's to carry.)

Runs in the peers' venvs (.venv-arq, .venv-saq): only pydantic, email-validator,
aiosmtplib and the standard library are needed here.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiosmtplib

from bench.common import send_job
from emailq.models import Job


class Connections:
    """Reused SMTP connections: one per job in flight, opened on first use."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[aiosmtplib.SMTP] = []

    async def send(self, task_id: str, payload: str) -> None:
        """The job: parse the stored job, build the message, send it."""
        j = Job.model_validate_json(payload)
        smtp = self._idle.pop() if self._idle else await self._open()
        await send_job(smtp, task_id, j)
        self._idle.append(smtp)

    async def _open(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
        await smtp.connect()
        return smtp

    async def close(self) -> None:
        """QUIT every connection at once: one by one is a round trip each to a slow relay."""
        await asyncio.gather(*(smtp.quit() for smtp in self._idle), return_exceptions=True)


class Clock:
    """From the first job started to the ``n``-th job done: the peer's own start-up (venv
    imports, connecting, registering) and its burst-mode shutdown are not counted, as the
    emailq drain is timed from its first claim to the empty queue."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done = 0
        self.first: float | None = None
        self.last = 0.0

    def started(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def finished(self) -> None:
        self.done += 1
        self.last = time.perf_counter()

    def result(self, settings: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        """The one JSON line the harness reads back. The rate counts distinct mails: a job
        run twice costs its peer time but delivers nothing new."""
        elapsed = self.last - (self.first or self.last)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        return json.dumps({"rate": rate, "complete": self.done, "settings": settings,
                           **(extra or {})})  # fmt: skip
