"""SMTP sinks for the benchmark: Postfix's ``smtp-sink`` (C) when installed, else a minimal
asyncio sink that answers 250 to everything and records arrivals.

The Python sink is only a fallback and for latency runs (it timestamps each Message-ID);
``python -m bench`` measures it against the plain sending loop and reports the ratio so a
reader can see whether the sink or the sender was the limit.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path

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

    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink ESMTP\r\n")

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
            self.transport.write(b"250 2.0.0 Ok: queued\r\n")
            return True
        end = self.buf.find(b"\r\n")
        if end < 0:
            return False
        verb, self.buf = self.buf[:4].upper(), self.buf[end + 2 :]
        self.transport.write(self._reply(verb))
        return True

    def _reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return _EHLO
        if verb == b"DATA":
            self.in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            assert self.transport is not None
            self.transport.close()
            return b"221 Bye\r\n"
        return b"250 Ok\r\n"


async def start_python_sink(port: int, arrivals: Arrivals) -> asyncio.Server:
    """The asyncio sink on 127.0.0.1:``port``, in the running loop."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SinkProtocol(arrivals), "127.0.0.1", port)


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


def serve(port: int) -> None:
    """Run the Python sink until killed (``python -m bench.sink PORT``)."""

    async def forever() -> None:
        server = await start_python_sink(port, Arrivals())
        async with server:
            await server.serve_forever()

    asyncio.run(forever())


if __name__ == "__main__":
    import sys

    serve(int(sys.argv[1]))
