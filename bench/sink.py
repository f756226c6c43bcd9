"""SMTP sinks for the benchmark: Postfix's ``smtp-sink`` (C) when installed, else a minimal
asyncio sink that answers 250 to everything and records arrivals.

The Python sink is a fallback for the fast runs, the latency runs' sink (it timestamps each
Message-ID) and the slow relay: given a delay, it sends every reply, the greeting included,
that long after the command (or the connection) that asked for it, in order. That is a
relay a round trip of ``delay`` away, as across a WAN: a client that waits for each reply
pays ``delay`` per command (aiosmtplib: MAIL, RCPT, DATA and the message, 4 per mail); one
that pipelines (RFC 2920; the sink offers PIPELINING) pays it once per group.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import cast

import uvloop

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^@>]+)@", re.MULTILINE | re.IGNORECASE)
_EHLO = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"


class Arrivals:
    """Counts messages and, when asked, the time each task id arrived."""

    def __init__(self, timestamps: bool = False) -> None:
        self.count = 0
        self.timestamps = timestamps
        self.at: dict[str, float] = {}

    def record(self, message: bytes) -> None:
        self.count += 1
        if self.timestamps:
            found = _MESSAGE_ID.search(message)
            if found:
                self.at[found.group(1).decode()] = time.perf_counter()


class SinkProtocol(asyncio.Protocol):
    """Just enough SMTP to accept mail: every command 250, DATA until CRLF.CRLF."""

    def __init__(self, arrivals: Arrivals, delay: float = 0.0) -> None:
        self.arrivals = arrivals
        self.delay = delay
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None
        # Replies not yet due: (due time, reply). One timer per connection, not per reply:
        # timers due at the same instant need not fire in the order they were set.
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has asyncio.Transport's methods but not its class.
        self.transport = cast(asyncio.Transport, transport)
        self._answer(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        assert self.transport is not None
        if self.in_data:
            end = self.buf.find(b"\r\n.\r\n")
            if end < 0:
                return False
            self.arrivals.record(self.buf[:end])
            self.buf = self.buf[end + 5 :]
            self.in_data = False
            self._answer(b"250 2.0.0 Ok: queued\r\n")
            return True
        end = self.buf.find(b"\r\n")
        if end < 0:
            return False
        verb, self.buf = self.buf[:4].upper(), self.buf[end + 2 :]
        self._answer(self._reply(verb))
        return True

    def _answer(self, reply: bytes) -> None:
        assert self.transport is not None
        if not self.delay:
            self._write(reply)
            return
        loop = asyncio.get_running_loop()
        self.pending.append((loop.time() + self.delay, reply))
        if len(self.pending) == 1:
            loop.call_later(self.delay, self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # libuv's timers tick in whole milliseconds: a reply due within one is due now.
        while self.pending and self.pending[0][0] <= now + 0.001:
            self._write(self.pending.popleft()[1])
        if self.pending:
            loop.call_later(self.pending[0][0] - now, self._flush)

    def _write(self, reply: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            self.pending.clear()
            return
        self.transport.write(reply)
        if reply.startswith(b"221 "):
            self.transport.close()

    def _reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return _EHLO
        if verb == b"DATA":
            self.in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            return b"221 Bye\r\n"  # the connection closes once this is written
        return b"250 Ok\r\n"


async def start_python_sink(port: int, arrivals: Arrivals, delay: float = 0.0) -> asyncio.Server:
    """The asyncio sink on 127.0.0.1:``port``, in the running loop; ``delay`` in seconds."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SinkProtocol(arrivals, delay), "127.0.0.1", port,
                                    backlog=1024)  # fmt: skip


def smtp_sink_path() -> str | None:
    """Postfix's smtp-sink, if installed (Debian: /usr/sbin, often not on PATH)."""
    return shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink") if Path(p).exists()),
        None,
    )


def start_smtp_sink(port: int) -> subprocess.Popen[bytes]:
    """smtp-sink on 127.0.0.1:``port``: accepts and discards, in C."""
    path = smtp_sink_path()
    assert path is not None
    # -u: unprivileged user when run as root; backlog 256.
    args = [path, "-u", "nobody", f"127.0.0.1:{port}", "256"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve(port: int, delay: float = 0.0) -> None:
    """Run the Python sink until killed (``python -m bench.sink PORT [DELAY_MS]``), on
    uvloop so that the sink is as far from being the limit as Python allows."""

    async def forever() -> None:
        server = await start_python_sink(port, Arrivals(), delay)
        async with server:
            await server.serve_forever()

    uvloop.run(forever())


if __name__ == "__main__":
    import sys

    serve(int(sys.argv[1]), float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0)
