"""build_message(): the MIME message as it goes over the wire."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtplib.email import flatten_message

import emailq.message
from emailq.message import build_message, message_id
from emailq.models import Job

MAIL_FROM = "emailq <noreply@mail.example.com>"
KOREAN = "홍길동님, 주문하신 상품이 발송되었습니다 — 확인해 주세요"


def job(**fields: Any) -> Job:
    base: dict[str, Any] = {"to": "user@example.com", "subject": "Hello", "text": "Hi"}
    return Job(**{**base, **fields})


def wire(j: Job, task_id: str = "t-1", mail_from: str = MAIL_FROM) -> bytes:
    return build_message(task_id, j, mail_from).as_bytes()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_message_id_is_the_task_id_at_the_sender_domain_on_every_build() -> None:
    first = parse(wire(job(), "abc123"))
    second = parse(wire(job(), "abc123"))
    assert first["Message-ID"] == "<abc123@mail.example.com>"
    assert second["Message-ID"] == first["Message-ID"]


@pytest.mark.parametrize("mail_from", ["nobody", "App <nobody@>"])
def test_message_id_without_a_sender_domain_uses_a_placeholder(mail_from: str) -> None:
    assert message_id("t", mail_from) == "<t@emailq.invalid>"


def test_headers_for_to_cc_reply_to_and_from() -> None:
    j = job(cc=["a@example.com", "b@example.com"], reply_to="help@example.com")
    msg = parse(wire(j))
    assert msg["From"] == MAIL_FROM
    assert msg["To"] == "user@example.com"
    assert msg["Cc"] == "a@example.com, b@example.com"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["Date"] is not None


def test_bcc_is_in_the_envelope_only() -> None:
    j = job(cc=["c@example.com"], bcc=["secret@example.com"])
    raw = wire(j)
    assert b"secret@example.com" not in raw
    assert "Bcc" not in parse(raw)
    assert j.recipients == ["user@example.com", "c@example.com", "secret@example.com"]


def test_optional_headers_are_absent_when_unset() -> None:
    msg = parse(wire(job()))
    assert msg["Cc"] is None
    assert msg["Reply-To"] is None


def test_korean_subject_is_rfc2047_encoded_and_decodes_intact() -> None:
    raw = wire(job(subject=KOREAN, text="본문입니다"))
    assert b"=?utf-8?" in raw.lower()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    msg = parse(raw)
    assert msg["Subject"] == KOREAN
    assert msg.get_content().rstrip("\r\n") == "본문입니다"


def korean_subjects() -> list[str]:
    """Long subjects whose folds land on spaces, em dashes and double spaces."""
    words = ["홍길동님,", "주문하신", "상품이", "발송되었습니다", "—", "확인해", "주세요", "a", " "]
    return [
        " ".join(words[(i * k) % len(words)] for i in range(n))
        for k in (1, 2, 5)
        for n in (20, 40, 90)
    ]


@pytest.mark.parametrize("subject", [KOREAN * 8, *korean_subjects()])
def test_long_korean_subject_folds_and_decodes_intact(subject: str) -> None:
    msg = build_message("t-1", job(subject=subject), MAIL_FROM)
    # Both the message's own bytes and what aiosmtplib sends (it re-flattens).
    for raw in (msg.as_bytes(), flatten_message(msg)):
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert head.isascii()
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))
        assert parse(raw)["Subject"] == subject


def test_message_id_keeps_the_domain_after_the_last_at() -> None:
    assert message_id("t", 'App <"a@b"@Example.com>') == "<t@Example.com>"


def test_lines_end_with_crlf() -> None:
    raw = wire(job(text="one\ntwo"))
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_html_gives_multipart_alternative_with_text_and_html() -> None:
    msg = parse(wire(job(text="plain 한글", html="<p>html 한글</p>")))
    assert msg.get_content_type() == "multipart/alternative"
    parts = {part.get_content_type(): part for part in msg.iter_parts()}
    assert set(parts) == {"text/plain", "text/html"}
    assert parts["text/plain"].get_content().rstrip("\r\n") == "plain 한글"
    assert parts["text/html"].get_content().rstrip("\r\n") == "<p>html 한글</p>"


def test_text_only_is_a_single_utf8_part() -> None:
    msg = parse(wire(job(text="한글")))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"


def _comparable(raw: bytes) -> bytes:
    """The wire form without what differs between two builds: the date and the boundary."""
    raw = re.sub(rb"^Date: .*\r\n", b"", raw, flags=re.M)
    return re.sub(rb"={15}\d+==", b"BOUNDARY", raw)


def test_reused_header_classes_build_what_the_stock_policy_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker's policy makes each header class once instead of once per header; the
    # wire form must be exactly what CPython's own policy.SMTP gives.
    first = job(subject=KOREAN, cc=["a@example.com"], html="<p>안녕</p>")
    second = job(subject="Plain", reply_to="r@example.com", text="Hi\nthere")
    a, b = build_message("t-1", first, MAIL_FROM), build_message("t-2", second, MAIL_FROM)
    assert type(a["Subject"]) is type(b["Subject"])  # one class per header name
    ours = [wire(j) for j in (first, second, first)]
    monkeypatch.setattr(emailq.message, "_POLICY", email.policy.SMTP)
    stock = [wire(j) for j in (first, second, first)]
    assert [_comparable(r) for r in ours] == [_comparable(r) for r in stock]
