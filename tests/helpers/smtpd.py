"""A real SMTP server for tests: aiosmtpd with a recording, scriptable handler.

Servers listen on port 0 (the kernel picks a free port, read back as ``port``), or on a
socket the test already holds (``ports.refused_port``), never on a port chosen earlier and
bound later.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword

from emailq.devtools.capture import BoundController


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    peer: tuple[str, int]
    at: float = field(default_factory=time.monotonic)  # when the server accepted it

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])

    @property
    def task_id(self) -> str:
        """The task id, read back from the Message-ID ``<task_id@domain>``."""
        return self.message_id.strip("<>").split("@")[0]


@dataclass
class RecordingHandler:
    """Accepts mail and records it. ``replies`` scripts the DATA answers ("451 later", ...):
    each message pops one; when empty, messages are accepted. ``delay`` slows each DATA.
    ``pipelining=False``: a relay that does not offer PIPELINING (one command a trip)."""

    replies: list[str] = field(default_factory=list)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    data_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Offer PIPELINING (RFC 2920), as Postfix, Exim, Gmail and SES do; aiosmtpd reads
    # one command at a time either way, so pipelined commands simply wait their turn.
    pipelining: bool = True

    async def handle_EHLO(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            self.data_calls += 1
            reply = self.replies.pop(0) if self.replies else None
        if self.delay:
            await asyncio.sleep(self.delay)
        if reply is not None:
            return reply
        with self.lock:
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos),
                         envelope.original_content or envelope.content, session.peer)
            )  # fmt: skip
        return "250 2.0.0 OK queued"

    def task_ids(self) -> list[str]:
        with self.lock:
            return [r.task_id for r in self.received]

    def connections(self) -> int:
        """Distinct client connections that delivered mail."""
        with self.lock:
            return len({r.peer for r in self.received})


@dataclass
class SlowReplyHandler(RecordingHandler):
    """A relay that is slow to answer the end of DATA, as one that scans mail first.

    Each message is recorded as soon as its data has arrived (the relay has committed it),
    then answered only after ``reply_after`` seconds. The first ``silent`` messages get no
    answer at all: the handler waits until the client gives up and hangs up (aiosmtpd then
    cancels it). ``rcpt_delay`` slows every RCPT reply, so a client spends time before DATA
    too. ``answered`` counts the end-of-DATA replies actually given."""

    reply_after: float = 0.0
    silent: int = 0
    rcpt_delay: float = 0.0
    answered: int = 0

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            self.data_calls += 1
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content or envelope.content,
                                          session.peer))  # fmt: skip
            hang = self.silent > 0
            self.silent -= hang
        if hang:
            await asyncio.Event().wait()  # until the client hangs up and aiosmtpd cancels us
        await asyncio.sleep(self.reply_after)
        with self.lock:
            self.answered += 1
        return "250 2.0.0 OK queued"

    def senders(self) -> list[tuple[str, str]]:
        """(envelope sender, task id) of every message received, in order."""
        with self.lock:
            return [(r.mail_from, r.task_id) for r in self.received]


@dataclass(frozen=True)
class Counts:
    """What the SMTP server received, against what was accepted."""

    accepted: int
    delivered: int  # distinct accepted task ids received
    lost: int
    duplicated: int  # task ids received more than once

    @classmethod
    def of(cls, accepted: list[str], handler: RecordingHandler, *,
           unknown_outcomes: int = 0) -> Counts:  # fmt: skip
        """``unknown_outcomes``: how many requests were answered 503 store_outcome_unknown (no
        task id). Each may have been stored, so up to that many mails nobody was told were
        accepted may arrive; they are not counted, and one more fails."""
        received = Counter(handler.task_ids())
        unnamed = set(received) - set(accepted)
        assert len(unnamed) <= unknown_outcomes, (
            f"received {len(unnamed)} mail(s) nobody enqueued "
            f"({unknown_outcomes} store_outcome_unknown answers)"
        )
        received = Counter({t: n for t, n in received.items() if t not in unnamed})
        return cls(
            accepted=len(accepted),
            delivered=len(received),
            lost=len(set(accepted) - set(received)),
            duplicated=sum(1 for n in received.values() if n > 1),
        )

    def report(self, label: str) -> Counts:
        """Print the counts (``pytest -s``), so they can be quoted."""
        print(f"{label}: accepted={self.accepted} delivered={self.delivered} "
              f"lost={self.lost} duplicated={self.duplicated}")  # fmt: skip
        return self


@dataclass
class ThrottlingHandler(RecordingHandler):
    """A relay that rate-limits: while ``throttling`` is set, every DATA is answered with
    ``throttle_reply`` (421, as Gmail does) and nothing is recorded; ``throttled`` counts
    those answers."""

    throttle_reply: str = "421 4.7.0 Try again later, closing connection"
    throttling: threading.Event = field(default_factory=threading.Event)
    throttled: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.throttling.is_set():
            with self.lock:
                self.data_calls += 1
                self.throttled += 1
            return self.throttle_reply
        return await super().handle_DATA(server, session, envelope)

    def times(self) -> list[float]:
        """When each accepted message arrived (monotonic), in order."""
        with self.lock:
            return sorted(r.at for r in self.received)


class Authenticator:
    """Accepts one user/password pair, for AUTH tests."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:  # fmt: skip
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user
            and auth_data.password == self.password
        )
        return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    """A running aiosmtpd controller and its handler."""

    controller: BoundController
    handler: RecordingHandler
    port: int

    def stop(self) -> None:
        """Stop the server; again does nothing (a test may stop it before teardown)."""
        if self.controller._thread is not None:  # aiosmtpd has no public "running" flag
            self.controller.stop()


def start_smtp(
    *,
    sock: socket.socket | None = None,
    handler: RecordingHandler | None = None,
    starttls: ssl.SSLContext | None = None,
    implicit_tls: ssl.SSLContext | None = None,
    auth: Authenticator | None = None,
    smtputf8: bool = True,
) -> SmtpServer:
    """Start aiosmtpd in its own thread on 127.0.0.1, on port 0 or on ``sock`` (bound).
    ``smtputf8=False``: a relay that does not offer SMTPUTF8 (many do not)."""
    handler = handler or RecordingHandler()
    kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8}
    if starttls is not None:
        kwargs.update(tls_context=starttls, require_starttls=True)
    if implicit_tls is not None:
        kwargs.update(ssl_context=implicit_tls)
    if auth is not None:
        kwargs.update(authenticator=auth, auth_require_tls=starttls is not None)
    if sock is not None:
        # The server owns the socket from now on; closing the holder's object is a no-op.
        sock = socket.socket(fileno=sock.detach())
    controller = BoundController(handler, hostname="127.0.0.1", port=0, sock=sock, **kwargs)
    controller.start()
    return SmtpServer(controller, handler, controller.port)


def delayed_smtp(smtp_factory: Callable[..., SmtpServer], delay: float) -> SmtpServer:
    """An SMTP server that takes ``delay`` seconds over each mail."""
    return smtp_factory(handler=RecordingHandler(delay=delay))


def take_mail(envelope: Any, address: str, options: list[str]) -> str:
    """For a handler's ``handle_MAIL``: what aiosmtpd does itself when a handler has none
    (keep the sender and its parameters, answer 250)."""
    envelope.mail_from = address
    envelope.mail_options.extend(options)
    return "250 OK"


@dataclass
class EnvelopeHandler(RecordingHandler):
    """Records every MAIL FROM (address and parameters) and every RCPT TO command as it
    arrived, accepted or not, so a test counts commands rather than stored envelopes.
    ``refuse_sender`` answers every MAIL FROM with that reply ("550 5.7.1 ...")."""

    refuse_sender: str | None = None
    mails: list[tuple[str, list[str]]] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        with self.lock:
            self.mails.append((address, list(mail_options)))
        if self.refuse_sender is not None:
            return self.refuse_sender
        return take_mail(envelope, address, mail_options)

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self.lock:
            self.rcpts.append(address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"
