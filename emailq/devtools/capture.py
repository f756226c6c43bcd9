"""A local SMTP capture server for development (aiosmtpd).

It accepts every message, prints it to the console as the original service's development
mode did, and saves it as an .eml file. It relays nothing.

Each message is saved under a name of its own, ``<UTC time>-<random>.eml``, that sorts by
arrival and never repeats: numbering on from the count of files on disk overwrote the
newest mail once one had been deleted. Beside it a JSON sidecar (``<name>.json``) keeps
the SMTP envelope, which the message itself does not hold: its Bcc recipients appear
nowhere else. The sidecar is written first and the .eml last, each by an atomic rename, so
a listed .eml is always complete and has its envelope (``emailq.devtools.inbox`` reads them).

Its own faults never answer 5xx: a worker treats 5xx as the mail's fault and gives up on it
(once, 2,717 of 3,000 dev mails were dead-lettered because the console pipe had closed).
A message that could not be saved answers 451 (try again later) and is logged; a console
that went away is only logged, since the saved .eml is the capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import logging
import secrets
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

log = logging.getLogger("emailq.capture")


def describe(raw: bytes, envelope_to: list[str]) -> str:
    """The console view of one captured message: headers decoded, text body shown."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    lines = ["=" * 60, "EMAIL CAPTURED (development mode, not delivered)", "=" * 60]
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Message-ID"):
        if msg[name]:
            lines.append(f"{name}: {msg[name]}")
    lines.append(f"Envelope-To: {', '.join(envelope_to)}")
    body = msg.get_body(preferencelist=("plain", "html"))
    lines += ["", body.get_content() if body is not None else "(no text body)", "=" * 60]
    return "\n".join(lines)


def message_name(now: datetime) -> str:
    """A new message's file name without extension: its UTC arrival time (so names sort by
    arrival) and 64 random bits (so two in the same microsecond, or from two capture
    servers sharing a folder, never collide)."""
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(8)}"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


class CaptureHandler:
    """aiosmtpd handler: print, save as .eml with its envelope beside it, answer 250."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802  # aiosmtpd's hook name
        """Called by aiosmtpd once per message."""
        raw: bytes = envelope.original_content or envelope.content
        rcpt_tos = [str(r) for r in envelope.rcpt_tos]
        try:
            path = self._save(raw, str(envelope.mail_from or ""), rcpt_tos)
        except Exception:  # whatever it was, it is ours, not the mail's: answer 4xx
            log.exception("could not save a captured message; answering 451")
            return "451 4.3.0 Capture server could not save the message; try again later"
        self._show(raw, rcpt_tos, path)
        return "250 Message accepted for delivery"

    def _save(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        now = datetime.now(UTC)
        name = message_name(now)
        envelope = {"mail_from": mail_from, "rcpt_tos": rcpt_tos,
                    "received_at": now.isoformat(timespec="milliseconds")}  # fmt: skip
        sidecar = self.out_dir / f"{name}.json"
        _write_atomically(sidecar, json.dumps(envelope).encode())
        path = self.out_dir / f"{name}.eml"
        try:
            _write_atomically(path, raw)
        except Exception:
            sidecar.unlink(missing_ok=True)  # no envelope left without its message
            raise
        return path

    @staticmethod
    def _show(raw: bytes, envelope_to: list[str], path: Path) -> None:
        try:
            text = describe(raw, envelope_to)
        except Exception:  # a message our viewer cannot parse is still captured
            log.exception("could not display %s", path)
            text = f"(could not display {path})"
        try:
            print(text, f"\nsaved to {path}\n", flush=True)  # noqa: T201  # the console is dev mode's output
        except OSError as exc:  # the console went away (`emailq dev | head`): it is saved
            log.warning("could not print a captured message (%s); saved to %s", exc, path)


class BoundController(Controller):
    """aiosmtpd's ``Controller``, which can also listen on port 0 or on a socket the caller
    already bound, and sets ``port`` to the port it really listens on.

    aiosmtpd 1.4 takes a fixed port only; picking a "free" port first and binding it later
    races with everything else on the machine.
    """

    def __init__(self, handler: Any, *, sock: socket.socket | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sock = sock

    def _create_server(self) -> Any:
        return self._listen()

    async def _listen(self) -> asyncio.AbstractServer:
        where: dict[str, Any] = (
            {"sock": self.sock} if self.sock else {"host": self.hostname, "port": self.port}
        )
        server = await self.loop.create_server(self._factory_invoker, ssl=self.ssl_context, **where)
        self.port = server.sockets[0].getsockname()[1]
        return server


def serve(host: str, port: int, out_dir: Path) -> None:
    """Run the capture server until interrupted (``port`` 0: any free port, printed)."""
    controller = BoundController(CaptureHandler(out_dir), hostname=host, port=port)
    controller.start()
    try:
        _announce(f"SMTP capture server on {host}:{controller.port}; mail saved to {out_dir}")
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


def _announce(text: str) -> None:
    try:
        print(text, flush=True)  # noqa: T201  # the console is dev mode's output
    except OSError as exc:  # the console is gone; keep capturing into the mail folder
        log.warning("console unavailable (%s): %s", exc, text)
