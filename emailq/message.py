"""Build the MIME message for a job."""

from __future__ import annotations

from datetime import UTC, datetime
from email.header import Header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr

from emailq.models import Job


class _CachedHeaderRegistry(HeaderRegistry):
    """``HeaderRegistry`` that makes each header class once.

    CPython's registry builds a new class with ``type()`` on every header it parses; that was
    a quarter of the worker's CPU time (13 headers per message). The classes hold no state,
    so one per header name serves every message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# policy.SMTP: CRLF line ends and encoded-word headers for non-ASCII subjects.
_POLICY = SMTP.clone(header_factory=_CachedHeaderRegistry())


def message_id(task_id: str, mail_from: str) -> str:
    """A Message-ID derived from the task id: every attempt of a task carries the same one,
    so a receiving system can recognise a repeat."""
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    return f"<{task_id}@{domain if at and domain else 'emailq.invalid'}>"


def build_message(task_id: str, job: Job, mail_from: str) -> EmailMessage:
    """The message as sent: UTF-8 bodies, RFC 2047 headers, Bcc only in the envelope."""
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = mail_from
    msg["To"] = job.to
    if job.cc:
        msg["Cc"] = ", ".join(job.cc)
    if job.reply_to:
        msg["Reply-To"] = job.reply_to
    if job.subject.isascii():
        msg["Subject"] = job.subject
    else:
        # CPython's folder (before gh-144156) can leave the space between two encoded
        # words outside them, where decoders drop it: "발송 확인" arrives as "발송확인".
        # The legacy encoder keeps every space inside the words; set_raw stops a refold.
        msg.set_raw("Subject", Header(job.subject, "utf-8", header_name="Subject").encode())
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(task_id, mail_from)
    msg.set_content(job.text, charset="utf-8")
    if job.html:
        msg.add_alternative(job.html, subtype="html", charset="utf-8")
    return msg
