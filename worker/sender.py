"""SMTP sending over a small pool of reused connections.

aiosmtplib's errors are converted to ``SendError`` here, where they enter: 5xx replies are
permanent, everything else (4xx, timeouts, drops) is transient. Two kinds say nothing
about the mail and use up none of its attempts (see worker.relay): ``RelayUnavailable``
(any failure to connect, greet, STARTTLS or log in; a timeout or drop before DATA) and
``RelayThrottled`` (421, 451 or 454 to MAIL, RCPT or DATA).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from emailq.errors import RelayThrottled, RelayUnavailable, SendError
from emailq.settings import Settings, SmtpSecurity

log = logging.getLogger("emailq.worker.smtp")


@dataclass(frozen=True)
class Delivery:
    """The server's answer to an accepted message."""

    code: int
    reply: str


# Replies with which relays (Gmail 421 4.7.0, Outlook 451 4.7.500, SES 454 "Throttling
# failure") ask a client to slow down, rather than judge the mail.
THROTTLE_CODES = frozenset({421, 451, 454})


def convert_error(
    exc: BaseException, *, connecting: bool = False, before_data: bool = False
) -> SendError:
    """An aiosmtplib or socket error as a ``SendError`` with code and permanence.

    ``connecting``: it happened while connecting, greeting, STARTTLS or login.
    ``before_data``: no DATA command was sent yet, so the relay has nothing of the mail.
    """
    if connecting:
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return RelayUnavailable(exc.message, code=exc.code)
        return RelayUnavailable(_text(exc))
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        if 421 in codes or all(c in THROTTLE_CODES for c in codes):
            return RelayThrottled(text, code=codes[0])
        return SendError(text, code=codes[0], permanent=all(c >= 500 for c in codes))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code in THROTTLE_CODES:
            return RelayThrottled(exc.message, code=exc.code)
        return SendError(exc.message, code=exc.code, permanent=500 <= exc.code < 600)
    if before_data:
        return RelayUnavailable(_text(exc))
    return SendError(_text(exc))


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class _SMTP(aiosmtplib.SMTP):
    """Remembers whether the current transaction reached DATA: a failure before it left
    the mail untouched, one after it may have delivered it."""

    data_started = False

    async def data(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        self.data_started = True
        return await super().data(*args, **kwargs)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.smtp_ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(settings.smtp_ca_file))


class Connection:
    """One pooled SMTP connection."""

    def __init__(self, settings: Settings) -> None:
        secure = settings.smtp_security
        self.smtp = _SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_user,
            password=settings.smtp_pass.get_secret_value() if settings.smtp_pass else None,
            use_tls=secure is SmtpSecurity.TLS,
            start_tls=secure is SmtpSecurity.STARTTLS,
            validate_certs=settings.smtp_validate_certs,
            tls_context=_tls_context(settings),
            timeout=settings.smtp_timeout_seconds,
        )
        self.last_used = time.monotonic()
        self.reused = False

    async def open(self) -> None:
        """Connect, upgrade (STARTTLS) and log in, as configured."""
        try:
            await self.smtp.connect()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self.smtp.close()
            raise convert_error(exc, connecting=True) from exc

    async def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        """One SMTP transaction. A reused connection the server dropped while idle gets one
        fresh reconnect: that is the pool's fault, not an attempt of the mail's."""
        try:
            return await self._transaction(msg, sender, recipients)
        except aiosmtplib.SMTPServerDisconnected:
            if not self.reused:
                raise
            log.info("pooled connection was closed by the server; reconnecting")
            self.reused = False
            await self.open()
            return await self._transaction(msg, sender, recipients)

    async def _transaction(self, msg: EmailMessage, sender: str, recipients: list[str]) -> Delivery:
        self.smtp.data_started = False
        errors, reply = await self.smtp.send_message(msg, sender=sender, recipients=recipients)
        if errors:
            refused = "; ".join(f"{addr}: {r.code} {r.message}" for addr, r in errors.items())
            reply = f"{reply} (refused: {refused})"
        return Delivery(250, reply)

    async def reset(self) -> bool:
        """RSET after a failed transaction; False if the connection is no longer usable."""
        try:
            await self.smtp.rset()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            return False
        return True

    def close(self) -> None:
        """Drop the connection without a QUIT round trip."""
        self.smtp.close()


class SmtpPool:
    """Up to ``size`` connections, reused; reconnects after errors and idle timeouts."""

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connected ``Connection``; returned to the pool if the transaction ended cleanly."""
        async with self._slots:
            conn = await self._checkout()
            try:
                yield conn
            except SendError as exc:
                # A reply code means the server is still talking: RSET and keep it.
                if exc.code is not None and await conn.reset():
                    self._checkin(conn)
                else:
                    conn.close()
                raise
            except BaseException:
                conn.close()
                raise
            self._checkin(conn)

    async def _checkout(self) -> Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            fresh = now - conn.last_used < self.settings.smtp_idle_seconds
            if fresh and conn.smtp.is_connected:
                conn.reused = True
                return conn
            conn.close()
        conn = Connection(self.settings)
        await conn.open()
        return conn

    def _checkin(self, conn: Connection) -> None:
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    async def close(self) -> None:
        """QUIT idle connections politely; best effort."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.smtp.quit(), timeout=2)
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                conn.close()


class Sender:
    """Sends one message over a pooled connection, converting errors to ``SendError``."""

    def __init__(self, pool: SmtpPool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """A pooled connection; errors inside become ``SendError`` before the pool sees
        them, so it can tell a server that replied (RSET, keep) from a broken link (drop)."""
        async with self.pool.connection() as conn:
            try:
                yield conn
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                raise convert_error(exc, before_data=not conn.smtp.data_started) from exc

    async def probe(self) -> None:
        """Connect, STARTTLS and log in as a send would, then QUIT; no mail is involved.
        Raises ``RelayUnavailable`` saying what failed."""
        conn = Connection(self.pool.settings)
        await conn.open()
        try:
            await conn.smtp.quit()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            conn.close()  # the relay let us in: that is all a probe asks

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()
