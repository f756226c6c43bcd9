"""A local SMTP capture server for development (aiosmtpd).

It accepts every message, prints it to the console as the original service's development
mode did, and saves it as an .eml file. It relays nothing.

Each message gets a name of its own, with its SMTP envelope (Bcc included) beside it, in
the folder format of ``emailq.mailfolder``, which the dev inbox reads.

Its own faults never answer 5xx: a worker treats 5xx as the mail's fault and gives up on it
(once, 2,717 of 3,000 dev mails were dead-lettered because the console pipe had closed).
A message that could not be saved answers 451 (try again later) and is logged; a console
that went away is only logged, since the saved .eml is the capture.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from emailq import mailfolder

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
        return mailfolder.save(self.out_dir, raw, mail_from, rcpt_tos)

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
