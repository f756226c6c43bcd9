"""A local SMTP capture server for development (aiosmtpd).

It accepts every message, prints it to the console as the original service's development
mode did, and saves it as an .eml file. It relays nothing.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
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


class CaptureHandler:
    """aiosmtpd handler: print, save as .eml, answer 250."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        # Carry on numbering after an earlier session's mail rather than overwrite it.
        self.count = len(list(out_dir.glob("*.eml"))) if out_dir.is_dir() else 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802  # aiosmtpd's hook name
        """Called by aiosmtpd once per message."""
        self.count += 1
        raw: bytes = envelope.original_content or envelope.content
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.count:06d}.eml"
        path.write_bytes(raw)
        print(describe(raw, list(envelope.rcpt_tos)), f"\nsaved to {path}\n", flush=True)  # noqa: T201  # the console is dev mode's output
        return "250 Message accepted for delivery"


def serve(host: str, port: int, out_dir: Path) -> None:
    """Run the capture server until interrupted."""
    controller = Controller(CaptureHandler(out_dir), hostname=host, port=port)
    controller.start()
    print(f"SMTP capture server on {host}:{port}; mail saved to {out_dir}", flush=True)  # noqa: T201  # the console is dev mode's output
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
