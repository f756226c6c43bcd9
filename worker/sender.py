"""SMTP sending over a small pool of reused connections.

aiosmtplib's errors are converted to ``SendError`` here, where they enter: 5xx replies are
permanent, and so is a mail the relay cannot take at all (a non-ASCII address without
SMTPUTF8); everything else (4xx, timeouts, drops) is transient. A refused MAIL FROM is
``SenderRefused``, whose reason names the sender. Two kinds say nothing about the mail and
use up none of its attempts (see worker.relay): ``RelayUnavailable`` (any failure to
connect, greet, STARTTLS or log in; a timeout or drop before DATA) and ``RelayThrottled``
(421, 451 or 454 to MAIL, RCPT or DATA). A timeout or drop while waiting for the reply to
the end of DATA is ``OutcomeUnknown``: the message was sent by then (see ``TimedSMTP``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.email import quote_address
from aiosmtplib.typing import Default

from emailq.errors import (
    OutcomeUnknown,
    RelayThrottled,
    RelayUnavailable,
    SenderRefused,
    SendError,
)
from emailq.message import Wire
from emailq.settings import Settings, SmtpSecurity
from worker.pipeline import ReplyReader

log = logging.getLogger("emailq.worker.smtp")

# Awaited with the step about to start ("MAIL FROM", "DATA", "message"); raises to stop the
# transaction there (the worker's lease check raises LeaseLost).
Guard = Callable[[str], Awaitable[None]]
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
# An addr-spec with nothing for email.utils.parseaddr to take apart (no spaces, quotes,
# brackets, comments, lists or controls): sent as it is, without parsing it per mail.
_BARE_ADDRESS = re.compile(r'[^\s<>"(),;:\\\[\]\x00-\x1f\x7f]+@[^\s<>"(),;:\\\[\]@\x00-\x1f\x7f]+')
_LEADING_DOT = re.compile(rb"(?m)^\.")
# Reject all C0 controls + DEL anywhere in an address, as aiosmtplib rejects them in a
# command: CR/LF would end the command line early. Checked before parsing, because
# parseaddr finds an address in a string with a line break in it ('"x\r\n<b@y>"@z' is b@y).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def smtp_path(address: str) -> str:
    """``<address>`` for MAIL FROM / RCPT TO: what aiosmtplib's ``quote_address`` gives,
    which parses every address (a few per cent of the worker's CPU at 256 in flight), for
    the bare addr-specs the API stores; anything else still goes through it. ``ValueError``
    (as aiosmtplib's) for an address that cannot go on a command line."""
    if _BARE_ADDRESS.fullmatch(address):
        return f"<{address}>"
    if _CONTROL.search(address):
        raise ValueError(f"Address {address!r} contains a prohibited control character")
    return quote_address(address)


def _envelope(sender: str, recipients: list[str]) -> list[str]:
    """The MAIL FROM and RCPT TO paths, checked before anything is sent. The API stores only
    valid addresses; one that came another way and cannot be sent fails for good (what
    aiosmtplib raises here is a ValueError, which no caller would take for the mail's)."""
    try:
        return [smtp_path(address) for address in (sender, *recipients)]
    except ValueError as exc:
        raise SendError(f"address refused before sending: {exc}", permanent=True) from exc


async def no_guard(step: str) -> None:
    """A guard that lets every step go ahead."""


def _framed(message: str | bytes) -> bytes:
    """The message as sent after DATA (RFC 5321 4.5.2): CRLF lines, dot-stuffed, ".\\r\\n"
    last, exactly as aiosmtplib's own ``data()`` frames it."""
    raw = message.encode("ascii") if isinstance(message, str) else message
    # The regular expressions visit every byte (as much CPU as building the message, per
    # mail). ``render`` already writes CRLF lines, and a body line starting with a dot is
    # rare: a few C-speed counts and a search tell when they would change nothing.
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raw = _LINE_ENDINGS.sub(b"\r\n", raw)
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    if raw.startswith(b".") or b"\n." in raw:
        raw = _LEADING_DOT.sub(b"..", raw)
    return raw + b".\r\n"


class TimedSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client with the end of a transaction done here, so ``sendmail`` (SIZE,
    MAIL, RCPT, RSET after a refusal) stays the library's:

    * every reply waits the command timeout, except the reply to the end of DATA, which waits
      ``data_timeout`` (relays scan and commit the mail before they answer). aiosmtplib has
      one timeout for both replies of its ``data()``, hence the override;
    * a timeout or a dropped connection while waiting for that reply raises
      ``OutcomeUnknown``: the message was sent, and the relay may have delivered it;
    * ``guard`` is awaited before MAIL FROM, before DATA, and after the 354 just before the
      message itself: the last moments a worker whose lease is gone can still not send;
    * ``data_started`` says whether the current transaction reached DATA: a failure before
      it left the mail untouched (the relay's fault, no attempt used), one after it may
      have delivered it.
    """

    data_started = False

    def __init__(self, *, data_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_timeout = data_timeout
        self.guard: Guard = no_guard

    async def send_wire(
        self, wire: Wire, sender: str, recipients: list[str]
    ) -> tuple[dict[str, SMTPResponse], str]:
        """``send_message`` for a message already in wire form, with the options it would
        give: SMTPUTF8 (and UTF-8 address headers) when an envelope address is not ASCII,
        BODY=8BITMIME (and 8bit text bodies) when the relay offers it."""
        await self._ehlo_or_helo_if_needed()  # the extensions decide the options
        options = []
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if utf8:
            if not self.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported(
                    "An address containing non-ASCII characters was provided, but "
                    "SMTPUTF8 is not supported by this server"
                )
            options.append("SMTPUTF8")
        eight_bit = self.supports_extension("8bitmime")
        if eight_bit:
            options.append("BODY=8BITMIME")
        message = wire.as_bytes(utf8=utf8, eight_bit=eight_bit)
        if self.supports_extension("pipelining"):
            return await self._pipelined(sender, recipients, message, options, utf8=utf8)
        _envelope(sender, recipients)  # the same refusals, before aiosmtplib sends anything
        return await self.sendmail(sender, recipients, message, mail_options=options)

    async def _pipelined(
        self, sender: str, recipients: list[str], message: bytes, options: list[str], *, utf8: bool
    ) -> tuple[dict[str, SMTPResponse], str]:
        """``sendmail`` with MAIL, RCPT and DATA written at once (RFC 2920), then read in
        order: two round trips a mail instead of 3 + recipients. Each reply raises what
        aiosmtplib's own command raises for it, so errors convert as they always have; a
        refusal leaves the connection in step for the pool's RSET (``SmtpPool.connection``)."""
        if self.supports_extension("size"):
            options = [f"SIZE={len(message)}", *options]  # render() wrote CRLF lines
        encoding = "utf-8" if utf8 else "ascii"
        mail_from, *rcpt_to = (path.encode(encoding) for path in _envelope(sender, recipients))
        group = [b" ".join([b"MAIL FROM:" + mail_from, *(o.encode("ascii") for o in options)])]
        group += [b"RCPT TO:" + path for path in rcpt_to]
        await self.guard("MAIL FROM")
        await self.guard("DATA")
        commands = b"\r\n".join([*group, b"DATA"]) + b"\r\n"
        mail, rcpts, start = await self._group(commands, len(recipients))
        taken = (SMTPStatus.completed, SMTPStatus.will_forward)
        refused = [aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
                   for rcpt, reply in zip(recipients, rcpts, strict=True)
                   if reply.code not in taken]  # fmt: skip
        no_envelope = mail.code != SMTPStatus.completed or len(refused) == len(recipients)
        if no_envelope and start.code == SMTPStatus.start_input:
            # A server should refuse DATA here (RFC 2920 3.1); one that takes it waits for a
            # message. Hanging up ends that transaction with nothing delivered.
            self.close()
        if mail.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        reply = await self._message(message)
        return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, reply.message

    async def _group(
        self, commands: bytes, rcpt_count: int
    ) -> tuple[SMTPResponse, list[SMTPResponse], SMTPResponse]:
        """Write a MAIL, RCPT..., DATA group; its replies (MAIL, each RCPT, DATA). A 421 (the
        server is closing), a timeout or a drop closes the connection and raises as
        aiosmtplib would at that command."""
        if self.protocol is None or self.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        transport = cast(asyncio.Transport, self.transport)
        reader = ReplyReader(transport, self.protocol)
        rcpts: list[SMTPResponse] = []
        try:
            transport.write(commands)
            mail = await reader.reply(self.timeout)
            if mail.code == SMTPStatus.domain_unavailable:
                raise aiosmtplib.SMTPResponseException(mail.code, mail.message)
            for _ in range(rcpt_count):
                rcpts.append(await reader.reply(self.timeout))
                if rcpts[-1].code == SMTPStatus.domain_unavailable:
                    raise aiosmtplib.SMTPResponseException(rcpts[-1].code, rcpts[-1].message)
            self.data_started = mail.code == SMTPStatus.completed  # DATA is valid from here
            start = await reader.reply(self.timeout)
            if start.code == SMTPStatus.domain_unavailable:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            if reader.unread:
                raise aiosmtplib.SMTPResponseException(-1, "a reply to no command")
        except BaseException:
            self.close()  # replies may still be on their way: only a new connection is clean
            raise
        finally:
            reader.restore()
        return mail, rcpts, start

    async def mail(
        self,
        sender: str,
        /,
        *,
        options: Any = None,
        encoding: str = "ascii",
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109  # aiosmtplib's signature
    ) -> SMTPResponse:
        await self.guard("MAIL FROM")
        return await super().mail(sender, options=options, encoding=encoding, timeout=timeout)

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109  # aiosmtplib's signature
    ) -> SMTPResponse:
        # ``timeout`` is send_message's one timeout for everything; ours are set per reply.
        await self.guard("DATA")
        self.data_started = True
        start = await self.execute_command(b"DATA")
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        return await self._message(message)

    async def _message(self, message: str | bytes) -> SMTPResponse:
        """After the 354: the last lease check, then the message and its reply."""
        try:
            await self.guard("message")
        except BaseException:
            self.close()  # the server waits for a message now; only a new connection is clean
            raise
        return await self._final_reply(_framed(message))

    async def _final_reply(self, framed: bytes) -> SMTPResponse:
        # Read as the group's replies are (ReplyReader): aiosmtplib's own read costs an
        # asyncio.wait_for (a second future, a timer and callbacks) on every mail.
        transport = cast(asyncio.Transport | None, self.transport)
        if self.protocol is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")  # nothing was sent
        reader = ReplyReader(transport, self.protocol)
        try:
            transport.write(framed)
            reply = await reader.reply(self.data_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            self.close()  # a late reply must never be read as the next command's
            what = "timed out" if isinstance(exc, aiosmtplib.SMTPTimeoutError) else "lost"
            raise OutcomeUnknown(
                f"the reply to the end of DATA {what} after the message was sent "
                f"({type(exc).__name__}); the relay may have delivered it"
            ) from exc
        except BaseException:
            self.close()  # a malformed reply, or cancelled: the connection is out of step
            raise
        finally:
            reader.restore()
        if reader.unread:
            self.close()  # the relay answered more than was asked: out of step from here
        if reply.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return reply


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
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # Raised by aiosmtplib before MAIL FROM when this mail needs an extension the relay
        # lacks (SMTPUTF8, for a non-ASCII address): about this mail, and the same on every
        # retry. As a relay-level failure it opened the breaker each time the mail was
        # claimed, paused everyone's mail, and failed only at SMTP_OUTAGE_MAX_SECONDS.
        return SendError(_text(exc), permanent=True)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return _recipients_refused(exc)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply_error(exc)
    if before_data:
        return RelayUnavailable(_text(exc))
    return SendError(_text(exc))


def _reply_error(exc: aiosmtplib.SMTPResponseException) -> SendError:
    """The relay's reply to MAIL, RCPT or DATA as the ``SendError`` it means."""
    if exc.code in THROTTLE_CODES:
        return RelayThrottled(exc.message, code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        # Both send paths (sendmail and the pipelined group) raise it for MAIL FROM.
        return SenderRefused(exc.sender, exc.message, code=exc.code)
    return SendError(exc.message, code=exc.code, permanent=500 <= exc.code < 600)


def _recipients_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> SendError:
    codes = [r.code for r in exc.recipients]
    text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
    if 421 in codes or all(c in THROTTLE_CODES for c in codes):
        return RelayThrottled(text, code=codes[0])
    return SendError(text, code=codes[0], permanent=all(c >= 500 for c in codes))


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.smtp_ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(settings.smtp_ca_file))


class Connection:
    """One pooled SMTP connection."""

    def __init__(self, settings: Settings) -> None:
        secure = settings.smtp_security
        self.smtp = TimedSMTP(
            data_timeout=settings.data_timeout_seconds,
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

    async def send(
        self, msg: Wire, sender: str, recipients: list[str], guard: Guard = no_guard
    ) -> Delivery:
        """One SMTP transaction, ``guard`` awaited before each step that sends (see
        ``TimedSMTP``). A reused connection the server dropped while idle gets one fresh
        reconnect: that is the pool's fault, not an attempt of the mail's. (A drop after the
        message was sent is ``OutcomeUnknown``, never reconnected and sent again.)"""
        self.smtp.guard = guard
        try:
            return await self._transaction(msg, sender, recipients)
        except aiosmtplib.SMTPServerDisconnected:
            if not self.reused:
                raise
            log.info("pooled connection was closed by the server; reconnecting")
            self.reused = False
            await self.open()
            return await self._transaction(msg, sender, recipients)
        finally:
            self.smtp.guard = no_guard

    async def _transaction(self, msg: Wire, sender: str, recipients: list[str]) -> Delivery:
        self.smtp.data_started = False
        errors, reply = await self.smtp.send_wire(msg, sender, recipients)
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
        self._busy = 0  # connections checked out (for the worker's metrics)

    def connections(self) -> tuple[int, int]:
        """Connections (busy, idle) now: checked out, and kept for reuse."""
        return self._busy, len(self._idle)

    def connection(self) -> Checkout:
        """``async with`` it: a connected ``Connection``, returned to the pool if the
        transaction ended cleanly (see ``Checkout``)."""
        return Checkout(self)

    async def take(self) -> Connection:
        """A pool slot and a connected ``Connection``; ``give_back`` it when done."""
        await self._slots.acquire()
        try:
            conn = await self._checkout()
        except BaseException:
            self._slots.release()
            raise
        self._busy += 1
        return conn

    async def give_back(self, conn: Connection, error: BaseException | None) -> None:
        """End a ``take``: ``error`` is what ended the transaction (None: it went cleanly)."""
        try:
            # After a SendError, a reply code means the server is still talking: RSET, keep it.
            replied = isinstance(error, SendError) and error.code is not None
            if error is None or (replied and await conn.reset()):
                self._checkin(conn)
            else:
                conn.close()
        finally:
            self._busy -= 1
            self._slots.release()

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


# The two context managers of a send are classes rather than @asynccontextmanager
# generators: each generator cost an async generator object, the loop's first-iteration
# hook (a WeakSet entry) and its asend/athrow steps on every mail, for what is two method
# calls here (callgrind, 256 in flight: about 16 K of 789 K instructions a mail).


class Checkout:
    """``async with pool.connection()``: a pool slot and a connected ``Connection`` for the
    body. A clean exit returns the connection to the pool; a ``SendError`` with a reply
    code (the server still talks) keeps it after an RSET; anything else drops it."""

    __slots__ = ("conn", "pool")

    def __init__(self, pool: SmtpPool) -> None:
        self.pool = pool
        self.conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        self.conn = await self.pool.take()
        return self.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.conn is not None  # set by __aenter__, which the body ran after
        error = self._converted(self.conn, exc)
        await self.pool.give_back(self.conn, error)
        if error is not exc:
            assert error is not None
            raise error from exc

    def _converted(self, conn: Connection, exc: BaseException | None) -> BaseException | None:
        """What the body's ``exc`` is to the pool, and to the caller: itself, here."""
        return exc


class Session(Checkout):
    """``async with sender.session()``: a ``Checkout`` whose body's aiosmtplib and socket
    errors are converted to ``SendError`` (``convert_error``) before the pool sees them,
    and raised as that."""

    __slots__ = ()

    def _converted(self, conn: Connection, exc: BaseException | None) -> BaseException | None:
        if isinstance(exc, TimeoutError | aiosmtplib.SMTPException | OSError):
            return convert_error(exc, before_data=not conn.smtp.data_started)
        return exc


class Sender:
    """Sends one message over a pooled connection, converting errors to ``SendError``."""

    def __init__(self, pool: SmtpPool) -> None:
        self.pool = pool

    def session(self) -> Session:
        """``async with`` it: a pooled connection; errors inside become ``SendError`` before
        the pool sees them, so it can tell a server that replied (RSET, keep) from a broken
        link (drop)."""
        return Session(self.pool)

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
