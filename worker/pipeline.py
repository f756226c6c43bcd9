"""Reading the replies to a pipelined group of SMTP commands (RFC 2920).

aiosmtplib reads one reply per command it writes, and its protocol drops bytes that
arrive while no read is waiting, or while a parsed reply has not been picked up: the
second and third replies to MAIL, RCPT, DATA written together can come in that gap. So
for the group, ``ReplyReader`` stands in as the transport's protocol
(``transport.set_protocol``, asyncio's documented way to switch protocols), keeps every
byte, and hands the transport back to aiosmtplib's protocol when the group is read.
"""

from __future__ import annotations

import asyncio

from aiosmtplib import SMTPResponse, SMTPServerDisconnected, SMTPStatus
from aiosmtplib.errors import SMTPReadTimeoutError, SMTPResponseException
from aiosmtplib.protocol import SMTPProtocol

MAX_REPLY_BYTES = 32 * 1024  # aiosmtplib's limit for one reply, kept for a group's


class ReplyReader(asyncio.Protocol):
    """The transport's protocol while a group's replies come in; ``restore()`` gives the
    transport back to aiosmtplib's ``inner`` protocol. Losing the connection is passed on
    to ``inner`` at once, so aiosmtplib knows it as it would have."""

    def __init__(self, transport: asyncio.Transport, inner: SMTPProtocol) -> None:
        self.transport = transport
        self.inner = inner
        self._buffer = bytearray()
        self._lost: Exception | None = None
        self._wake: asyncio.Future[None] | None = None
        self._expired = False  # the current reply() waited its whole time
        transport.set_protocol(self)

    def restore(self) -> None:
        """Give the transport back to aiosmtplib's protocol (a no-op once it is closed)."""
        if self._lost is None:
            self.transport.set_protocol(self.inner)

    @property
    def unread(self) -> bool:
        """Bytes came that no reply read took: the server answered something not asked."""
        return bool(self._buffer)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES * 4:
            self._lost = SMTPResponseException(SMTPStatus.invalid_response, "Response too long")
            self.transport.close()
        self._notify()

    def eof_received(self) -> bool:
        self._lost = self._lost or SMTPServerDisconnected("Unexpected EOF received")
        self._notify()
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._lost or SMTPServerDisconnected(f"Connection lost: {exc}")
        self.inner.connection_lost(exc)
        self._notify()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- reading ---------------------------------------------------------------------------

    async def reply(self, seconds: float | None) -> SMTPResponse:
        """The next reply; ``SMTPReadTimeoutError`` after ``seconds`` without one,
        ``SMTPServerDisconnected`` if the connection ends first (what aiosmtplib raises)."""
        if (reply := self._parse()) is not None:
            return reply  # the common case behind the first reply: already in the buffer
        loop = asyncio.get_running_loop()
        # One timer for the whole wait that wakes it, where asyncio.wait_for made a second
        # future, a timer and callbacks for every wait.
        self._expired = False
        timer = None if seconds is None else loop.call_later(seconds, self._time_out)
        try:
            while (reply := self._parse()) is None:
                if self._lost is not None:
                    raise self._lost
                if self._expired:
                    raise SMTPReadTimeoutError("Timed out waiting for server response")
                self._wake = loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
        finally:
            if timer is not None:
                timer.cancel()
        return reply

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _time_out(self) -> None:
        self._expired = True
        self._notify()

    def _parse(self) -> SMTPResponse | None:
        """One complete reply off the buffer (RFC 5321 4.2: "250-" lines continue it)."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            lines.append(line)
            if line[3:4] != b"-":
                break
        else:
            return None
        del self._buffer[:offset]
        try:
            code = int(lines[0][:3])
        except ValueError:
            text = lines[0].decode("utf-8", "replace").strip()
            raise SMTPResponseException(
                SMTPStatus.invalid_response, f"Malformed SMTP response line: {text}"
            ) from None
        message = b"\n".join(line[4:].strip(b" \t\r\n") for line in lines)
        return SMTPResponse(code, message.decode("utf-8", "surrogateescape"))
