"""A relay that offers PIPELINING and then breaks the protocol in the middle of a group: each
mail still ends recorded, and the real aiosmtpd server behind it counts every mail received
at most once (none lost, none twice). The worker runs in-process as ``python -m worker``
composes it, against the test's Redis."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from emailq.models import Status
from emailq.settings import Settings
from tests.helpers.smtpd import RecordingHandler, SmtpServer, take_mail
from tests.helpers.workers import running

MAILS = 6
SPOILED = 2  # the first transactions the relay spoils; the rest it takes as it should


@dataclass
class UnrulyHandler(RecordingHandler):
    """aiosmtpd, spoiling its first ``SPOILED`` transactions as ``fault`` says (see
    ``FAULTS``). aiosmtpd writes each reply with CRLF; ``server._writer`` writes raw bytes."""

    fault: str = ""
    spoiled: int = 0

    def _spoil(self) -> bool:
        with self.lock:
            if self.spoiled >= SPOILED:
                return False
            self.spoiled += 1
            return True

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        taken = take_mail(envelope, address, options)
        if self.fault == "421 to MAIL" and self._spoil():
            return "421 4.7.0 Try again later, closing connection"
        if self.fault == "an extra line" and self._spoil():
            return "250 OK\r\n250 2.1.0 a reply to no command"
        return taken

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        if self.fault == "DATA's reply early" and self._spoil():
            return "354 End data with <CR><LF>.<CR><LF>"  # and DATA's own 354 follows
        if self.fault == "closed mid-group" and self._spoil():
            server.transport.close()
            return "250 OK"
        if self.fault == "bytes after a partial reply" and self._spoil():
            server._writer.write(b"250 OK\r\n25")  # a reply cut short, then the next one
            await asyncio.sleep(0.05)
            return "250 OK"
        if self.fault == "replies split mid-line":  # allowed by TCP: must be read as one
            server._writer.write(b"25")
            await asyncio.sleep(0.05)
            return "0 OK"
        return "250 OK"


FAULTS = ["421 to MAIL", "an extra line", "DATA's reply early", "closed mid-group",
          "bytes after a partial reply", "replies split mid-line"]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_relay_breaking_the_pipelined_group_loses_and_doubles_nothing(
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    fault: str,
) -> None:
    server = smtp_factory(handler=UnrulyHandler(fault=fault))
    settings = make_settings(smtp_port=server.port, max_attempts=SPOILED + 1,
                             worker_concurrency=2)  # fmt: skip
    async with running(settings) as run:
        records = await run.send(MAILS)
    received = Counter(server.handler.task_ids())
    ids = [r.task_id for r in records]
    assert received == Counter(ids), (fault, received)  # each exactly once
    assert [r.status for r in records] == [Status.SUCCESS] * MAILS
    outcomes = Counter(entry.outcome for r in records for entry in r.log)
    print(f"{fault}: {dict(outcomes)}")  # what the spoiled ones were recorded as
    assert outcomes["success"] == MAILS
    if fault != "replies split mid-line":
        assert sum(outcomes.values()) > MAILS, "the relay spoiled nothing"
    else:
        assert sum(outcomes.values()) == MAILS


@pytest.mark.parametrize(
    "address",
    ["a@example.com\r\nRCPT TO:<evil@example.com>", '"a\r\nRCPT TO:<evil@example.com>"@example.com',
     "a@example.com\x00", "a b@example.com"],
)  # fmt: skip
async def test_a_recipient_that_cannot_go_on_a_command_line_fails_alone(
    make_settings: Callable[..., Settings], smtp: SmtpServer, address: str
) -> None:
    # The API refuses these; a job stored another way must still not reach the relay as a
    # command, nor take the other mails with it. As a Bcc it is in no header: only the
    # envelope carries it.
    async with running(make_settings(worker_concurrency=2)) as run:
        [bad] = await run.submit(bcc=[address])
        good = await run.submit(2)
        failed = await run.settled(bad)
        records = [await run.settled(task_id) for task_id in good]
    assert failed.status is Status.FAILED
    assert failed.attempts == 1
    assert "address refused before sending" in (failed.reason or "")
    assert [r.status for r in records] == [Status.SUCCESS] * 2
    assert Counter(smtp.handler.task_ids()) == Counter(good)
    assert all(r.rcpt_tos == ["user@example.com"] for r in smtp.handler.received)


@pytest.mark.parametrize("address", ["x" * 5000 + "@example.com", "a@" + "b" * 5000 + ".example"])
async def test_a_recipient_too_long_for_the_relay_is_its_refusal(
    make_settings: Callable[..., Settings], smtp: SmtpServer, address: str
) -> None:
    # Past the relay's command line (aiosmtpd: 512 bytes): its 500 refuses that recipient,
    # in step with the rest of the group, and the mail's other recipient still gets it.
    async with running(make_settings()) as run:
        [task_id] = await run.submit(bcc=[address])
        record = await run.settled(task_id)
        [alone] = await run.submit(to=address)
        refused = await run.settled(alone)
    assert record.status is Status.SUCCESS
    assert "500 Command line too long" in (record.log[-1].reply or "")
    assert refused.status is Status.FAILED
    assert refused.attempts == 1
    assert "500" in (refused.reason or "")
    assert smtp.handler.task_ids() == [task_id]
    assert smtp.handler.received[0].rcpt_tos == ["user@example.com"]
