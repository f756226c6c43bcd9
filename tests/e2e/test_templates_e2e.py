"""The shipped Korean OTP template across real processes: the API, a worker, the CLI, Redis
and an SMTP server (aiosmtpd). Sent once each through the single send, a batch of two and
``emailq send --template``; each mail must arrive exactly once, with the original's
subject and text and our HTML part, decoded as a mail client would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path

import httpx

from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs, settings_env
from tests.helpers.smtpd import Received, SmtpServer
from tests.helpers.templates import EXAMPLES, OTP_SUBJECT, otp_text


def raw_subject(raw: bytes) -> str:
    """The Subject header decoded by RFC 2047 alone, unfolded."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    lines = head.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Subject: "))
    value = lines[start].removeprefix("Subject: ")
    for line in lines[start + 1 :]:
        if not line.startswith((" ", "\t")):
            break
        value += line
    return str(make_header(decode_header(value)))


def check_otp_mail(mail: Received, code: str) -> None:
    msg = mail.message
    assert raw_subject(mail.raw) == OTP_SUBJECT
    assert msg["Subject"] == OTP_SUBJECT
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert isinstance(text, EmailMessage)
    assert isinstance(html, EmailMessage)
    assert text.get_content_charset() == "utf-8"
    # The original's body, byte for byte as mail carries text: CRLF line ends, and one
    # ending the body (MIME's own; the template has none).
    wire = (otp_text(code) + "\n").replace("\n", "\r\n").encode("utf-8")
    assert text.get_payload(decode=True) == wire
    assert text.get_content().replace("\r\n", "\n") == otp_text(code) + "\n"
    assert f">{code}</span>" in html.get_content()
    assert '<html lang="ko">' in html.get_content()


def test_the_otp_template_arrives_through_api_batch_and_cli(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, tmp_path: Path
) -> None:
    settings = make_settings(templates_dir=EXAMPLES)
    base = procs.api(settings)
    procs.worker(settings)
    codes: dict[str, str] = {}  # task id -> the code its mail must carry

    def otp(code: str) -> dict[str, object]:
        return {"to": f"user{code}@example.com", "template": "otp", "variables": {"code": code}}

    single = httpx.post(f"{base}/api/v1/email/received", json=otp("493817"), timeout=10)
    assert single.status_code == 202, single.text
    codes[single.json()["task_id"]] = "493817"
    batch = httpx.post(f"{base}/api/v1/emails/batch",
                       json={"messages": [otp("111111"), otp("222222")]}, timeout=10)  # fmt: skip
    assert batch.status_code == 202, batch.text
    for entry, code in zip(batch.json()["results"], ("111111", "222222"), strict=True):
        codes[entry["task_id"]] = code
    cli = subprocess.run([sys.executable, "-m", "emailq.cli", "send", "--to",
                          "user333333@example.com", "--template", "otp", "--var",
                          "code=333333"], env=settings_env(settings), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    codes[cli.stdout.strip()] = "333333"

    handler = smtp.handler
    wait_until(lambda: len(handler.received) >= len(codes), what="four OTP mails")
    # Each once, nothing else: no mail lost, none duplicated.
    assert sorted(handler.task_ids()) == sorted(codes)
    for mail in handler.received:
        assert mail.rcpt_tos == [f"user{codes[mail.task_id]}@example.com"]
        check_otp_mail(mail, codes[mail.task_id])
    for task_id in codes:
        result = httpx.get(f"{base}/api/v1/email/result",
                           params={"task_id": task_id, "wait": 10}, timeout=30)  # fmt: skip
        assert result.json()["status"] == "success"


def test_a_template_send_refused_by_the_cli_stores_nothing(
    make_settings: Callable[..., Settings], tmp_path: Path, redis_url: str
) -> None:
    settings = make_settings(templates_dir=EXAMPLES)
    done = subprocess.run([sys.executable, "-m", "emailq.cli", "send", "--to",
                           "user@example.com", "--template", "otp"], env=settings_env(settings),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 1
    assert "variable 'code' is not given" in done.stderr
    assert done.stdout == ""
