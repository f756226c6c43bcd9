"""A real SMTP server for tests: aiosmtpd with a recording, scriptable handler."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


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
    each message pops one; when empty, messages are accepted. ``delay`` slows each DATA."""

    replies: list[str] = field(default_factory=list)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    data_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

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

    controller: Controller
    handler: RecordingHandler
    port: int

    def stop(self) -> None:
        """Stop the server; again does nothing (a test may stop it before teardown)."""
        if self.controller._thread is not None:  # aiosmtpd has no public "running" flag
            self.controller.stop()


def start_smtp(
    port: int,
    *,
    handler: RecordingHandler | None = None,
    starttls: ssl.SSLContext | None = None,
    implicit_tls: ssl.SSLContext | None = None,
    auth: Authenticator | None = None,
) -> SmtpServer:
    """Start aiosmtpd on 127.0.0.1:``port`` in its own thread."""
    handler = handler or RecordingHandler()
    kwargs: dict[str, Any] = {}
    if starttls is not None:
        kwargs.update(tls_context=starttls, require_starttls=True)
    if implicit_tls is not None:
        kwargs.update(ssl_context=implicit_tls)
    if auth is not None:
        kwargs.update(authenticator=auth, auth_require_tls=starttls is not None)
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    return SmtpServer(controller, handler, port)
