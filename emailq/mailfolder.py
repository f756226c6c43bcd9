"""A folder of captured mail: written by the dev capture server
(``emailq/devtools/capture.py``), read by the dev inbox (``server/routes/inbox.py``). The
one place that knows the folder's format, so writer and reader cannot drift apart.

Each message is ``<name>.eml`` with its SMTP envelope in ``<name>.json`` (the message does
not hold its Bcc recipients; the envelope does). Names are ``<UTC time>-<random>``: they
sort by arrival and never repeat (numbering on from the count of files on disk overwrote
the newest mail once one had been deleted). The sidecar is written first and the .eml
last, each by an atomic rename, so a listed .eml is complete and has its envelope. Mail
saved before sidecars existed has none, and shows no envelope (and no Bcc).

Reading parses a message once and keeps its summary while the file is unchanged, so
listing a folder of thousands is a directory scan, not a re-parse. Names are checked
against ``MESSAGE_ID`` before they touch the file system: no dots, no slashes, nothing
outside the folder. Standard library and pydantic only: the API imports it.
"""

from __future__ import annotations

import contextlib
import email
import email.header
import email.policy
import json
import re
import secrets
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MESSAGE_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"
_MESSAGE_ID = re.compile(MESSAGE_ID)


def message_name(now: datetime) -> str:
    """A new message's name: its UTC arrival time (so names sort by arrival) and 64 random
    bits (so two in one microsecond, or from two capture servers sharing a folder, never
    collide)."""
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(8)}"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def save(folder: Path, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> Path:
    """Store one message and its envelope; returns the .eml's path."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    name = message_name(now)
    envelope = {"mail_from": mail_from, "rcpt_tos": rcpt_tos,
                "received_at": now.isoformat(timespec="milliseconds")}  # fmt: skip
    sidecar = folder / f"{name}.json"
    _write_atomically(sidecar, json.dumps(envelope).encode())
    path = folder / f"{name}.eml"
    try:
        _write_atomically(path, raw)
    except Exception:
        sidecar.unlink(missing_ok=True)  # no envelope left without its message
        raise
    return path


class Summary(BaseModel):
    """One captured message as the inbox lists it."""

    id: str
    received_at: str  # RFC 3339, when the capture server saved it
    subject: str
    from_: str = Field(serialization_alias="from")  # the From header
    to: list[str]
    cc: list[str]
    bcc: list[str] | None  # envelope recipients named in no header; None: envelope unknown
    envelope_from: str | None
    envelope_to: list[str] | None
    size: int  # bytes of the .eml
    has_html: bool
    has_text: bool


class Message(Summary):
    """One captured message in full."""

    headers: list[tuple[str, str]]  # decoded, in order
    text: str | None
    html: str | None


def _header(msg: EmailMessage, name: str) -> str:
    try:
        return str(msg.get(name, ""))
    except Exception:  # a header the parser cannot decode is shown raw, not fatal
        raw = msg.get_all(name, failobj=[])
        return " ".join(str(v) for v in raw)


def _text(raw: str) -> str:
    """A raw header value, unfolded, with RFC 2047 encoded words decoded."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", raw)
    try:
        return str(email.header.make_header(email.header.decode_header(unfolded)))
    except Exception:  # an encoded word that does not decode: show it as it came
        return unfolded


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    value = _header(msg, name)
    return [addr for _, addr in getaddresses([value]) if addr] if value else []


def _part(msg: EmailMessage, kind: str) -> str | None:
    try:
        body = msg.get_body(preferencelist=(kind,))
        return None if body is None else str(body.get_content())
    except Exception:  # an unknown charset or a broken part: show the rest of the message
        return None


def _envelope(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _parse(path: Path, message_id: str) -> Message:
    raw = path.read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    envelope = _envelope(path)
    rcpt_tos = envelope.get("rcpt_tos")
    to, cc = _addresses(msg, "To"), _addresses(msg, "Cc")
    bcc = None
    if isinstance(rcpt_tos, list):
        named = {addr.lower() for addr in to + cc}
        bcc = [str(r) for r in rcpt_tos if str(r).lower() not in named]
    received = envelope.get("received_at") or datetime.fromtimestamp(
        path.stat().st_mtime, UTC
    ).isoformat(timespec="milliseconds")
    text, html = _part(msg, "plain"), _part(msg, "html")
    headers = [(name, _text(value)) for name, value in msg.raw_items()]
    return Message(
        id=message_id, received_at=str(received), subject=_header(msg, "Subject"),
        from_=_header(msg, "From"), to=to, cc=cc, bcc=bcc,
        envelope_from=envelope.get("mail_from"),
        envelope_to=[str(r) for r in rcpt_tos] if isinstance(rcpt_tos, list) else None,
        size=len(raw), has_html=html is not None, has_text=text is not None,
        headers=headers, text=text, html=html,
    )  # fmt: skip


def _matches(summary: Summary, words: list[str]) -> bool:
    haystack = " ".join([summary.subject, summary.from_, *summary.to, *summary.cc,
                         *(summary.envelope_to or [])]).lower()  # fmt: skip
    return all(word in haystack for word in words)


class Inbox:
    """The messages of one capture folder: list, read, delete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        # name -> (mtime_ns, size, summary): parsed once while the file is unchanged
        self._summaries: dict[str, tuple[int, int, Summary]] = {}

    def path(self, message_id: str) -> Path | None:
        """The .eml of ``message_id``, if the id is well formed and the message exists."""
        if not _MESSAGE_ID.match(message_id):
            return None
        path = self.folder / f"{message_id}.eml"
        return path if path.is_file() else None

    def _ids(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = (p.stem for p in self.folder.glob("*.eml"))
        # Names start with the arrival time, so the newest sorts last.
        return sorted((n for n in names if _MESSAGE_ID.match(n)), reverse=True)

    def _summary(self, message_id: str) -> Summary | None:
        path = self.folder / f"{message_id}.eml"
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted since the listing
            return None
        with self._lock:
            cached = self._summaries.get(message_id)
        if cached and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            return cached[2]
        try:
            message = _parse(path, message_id)
        except FileNotFoundError:
            return None
        summary = Summary.model_validate(message.model_dump(include=set(Summary.model_fields)))
        with self._lock:
            self._summaries[message_id] = (stat.st_mtime_ns, stat.st_size, summary)
        return summary

    def messages(
        self, query: str = "", *, offset: int = 0, limit: int = 50
    ) -> tuple[list[Summary], int]:
        """Messages newest first whose subject, From, To, Cc or envelope contain every word
        of ``query`` (case-insensitive); one page, and how many match in all."""
        words = query.lower().split()
        found = [s for s in map(self._summary, self._ids()) if s and _matches(s, words)]
        return found[offset : offset + limit], len(found)

    def latest(self) -> Message | None:
        """The newest message, in full."""
        for message_id in self._ids():
            found = self.message(message_id)
            if found is not None:
                return found
        return None

    def message(self, message_id: str) -> Message | None:
        """One message in full, or None."""
        path = self.path(message_id)
        if path is None:
            return None
        try:
            return _parse(path, message_id)
        except FileNotFoundError:
            return None

    def raw(self, message_id: str) -> bytes | None:
        """The message as it arrived."""
        path = self.path(message_id)
        try:
            return None if path is None else path.read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, message_id: str) -> bool:
        """Delete one message and its envelope; False if there was none."""
        path = self.path(message_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        with self._lock:
            self._summaries.pop(message_id, None)
        return True

    def clear(self) -> int:
        """Delete every message; returns how many there were."""
        return sum(self.delete(message_id) for message_id in self._ids())
