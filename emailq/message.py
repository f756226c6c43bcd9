"""Build the MIME message for a job."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr

from emailq.models import Job


def message_id(task_id: str, mail_from: str) -> str:
    """A Message-ID derived from the task id: every attempt of a task carries the same one,
    so a receiving system can recognise a repeat."""
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "emailq.invalid"
    return f"<{task_id}@{domain}>"


def build_message(task_id: str, job: Job, mail_from: str) -> EmailMessage:
    """The message as sent: UTF-8 bodies, RFC 2047 headers, Bcc only in the envelope."""
    # policy.SMTP: CRLF line ends and encoded-word headers for non-ASCII subjects.
    msg = EmailMessage(policy=SMTP)
    msg["From"] = mail_from
    msg["To"] = job.to
    if job.cc:
        msg["Cc"] = ", ".join(job.cc)
    if job.reply_to:
        msg["Reply-To"] = job.reply_to
    msg["Subject"] = job.subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(task_id, mail_from)
    msg.set_content(job.text, charset="utf-8")
    if job.html:
        msg.add_alternative(job.html, subtype="html", charset="utf-8")
    return msg
