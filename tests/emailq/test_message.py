"""build_message(): the MIME message as it goes over the wire."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.header import Header, decode_header, make_header
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import pytest
from aiosmtplib.email import flatten_message
from hypothesis import given
from hypothesis import strategies as st

import emailq.message
from emailq.errors import HeaderInjection
from emailq.message import (
    build_message,
    envelope_address,
    envelope_recipients,
    envelope_sender,
    message_id,
)
from emailq.models import Job, Mailbox

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


# Stored tasks need not come from this API version: cases the API normalizes are kept here.
@pytest.mark.parametrize(("fields", "envelope"), [
    ({"cc": ["user@EXAMPLE.com"], "bcc": ["user@example.com"]}, ["user@example.com"]),
    ({"cc": ["User@example.com"]}, ["user@example.com", "User@example.com"]),
    ({"bcc": ["b@example.com", "B@Example.com", "b@EXAMPLE.COM"]},
     ["user@example.com", "b@example.com", "B@Example.com"]),
    ({"to": "u@bücher.example", "cc": ["u@XN--BCHER-KVA.example", "u@BÜCHER.example"]},
     ["u@xn--bcher-kva.example"]),
    ({"to": "用户@bücher.example", "bcc": ["用户@xn--bcher-kva.example"]}, ["用户@bücher.example"]),
    ({"cc": ["user@ex\u0430mple.com"]}, ["user@example.com", "user@xn--exmple-4nf.com"]),
    # No IDNA form (a domain stored earlier, or not through the API): sent as stored.
    ({"bcc": ["b@\u2603.example", "用户@\u2603.example"]},
     ["user@example.com", "b@\u2603.example", "用户@\u2603.example"]),
])  # fmt: skip
def test_the_envelope_names_each_mailbox_once(fields: dict[str, Any], envelope: list[str]) -> None:
    j = job(**fields)
    assert envelope_recipients(j) == envelope
    assert j.recipients == [j.to, *j.cc, *j.bcc]  # the job itself keeps what was given
    assert parse(wire(j))["To"] == j.to.replace("bücher", "xn--bcher-kva")


def test_the_envelope_sender_has_an_ascii_domain_when_its_local_part_is_ascii() -> None:
    assert envelope_sender(job(), "noreply@bücher.example") == "noreply@xn--bcher-kva.example"
    own = job(sender=Mailbox(name="Shop", address="shop@bücher.example"))
    assert envelope_sender(own, "noreply@example.com") == "shop@xn--bcher-kva.example"
    assert envelope_address("用户@bücher.example") == "用户@bücher.example"  # needs SMTPUTF8


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


# -- Header injection (CVE-2024-6923 class): our text is never parsed as encoded words ---

EVIL = b"Hi\r\nFrom: Boss <boss@evil.test>\r\nBcc: x@evil.test\r\n\r\n<html>planted</html>"


def b_word(raw: bytes, charset: str = "utf-8", letter: str = "b") -> str:
    return f"=?{charset}?{letter}?{base64.b64encode(raw).decode()}?="


def q_word(raw: bytes, charset: str = "utf-8") -> str:
    return f"=?{charset}?q?{''.join(f'={byte:02X}' for byte in raw)}?="


def flattened(msg: EmailMessage) -> list[bytes]:
    """Every wire form the message takes: its own, and aiosmtplib's ASCII and UTF-8 ones."""
    return [msg.as_bytes(), flatten_message(msg), flatten_message(msg, utf8=True)]


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].decode() for line in head.split(b"\r\n")
            if line[:1] not in (b" ", b"\t")]  # fmt: skip


@pytest.mark.parametrize(
    "subject",
    [
        b_word(EVIL),
        b_word(EVIL, letter="B"),
        b_word(EVIL, "UTF-8"),
        q_word(EVIL),
        q_word(EVIL, "iso-8859-1"),
        q_word(EVIL, "us-ascii"),
        b_word(EVIL.decode().encode("utf-16"), "utf-16"),
        "Hi " + b_word(b"a\r\n") + " " + b_word(b"Bcc: x@evil.test\r\n"),
        "안녕 " + b_word(EVIL),
    ],
)
def test_encoded_words_in_the_subject_are_sent_as_literal_text(subject: str) -> None:
    msg = build_message("t-1", job(subject=subject, text="the real body"), MAIL_FROM)
    for raw in flattened(msg):
        names = header_names(raw)
        assert names.count("From") == 1
        assert "Bcc" not in names
        assert b"planted" not in raw
        back = parse(raw)
        assert back["Subject"] == subject
        assert back.get_content().rstrip("\r\n") == "the real body"


@pytest.mark.parametrize(
    "bad", ["a\r\nBcc: x@evil.test", "a\x0bb", "a\x0cb", "a\x1cb", "a\x85b", "a\u2028b", "a\x00b"]
)
def test_a_control_character_in_a_stored_subject_is_refused_not_sent(bad: str) -> None:
    with pytest.raises(HeaderInjection):
        build_message("t-1", job(subject=bad), MAIL_FROM)


@pytest.mark.parametrize(
    "address", ["=?us-ascii?q?victim=40evil.test=2C?=@example.com", "a@b.example, c@d.example",
                "Boss <boss@evil.test>", "a\r\nBcc: x@evil.test"],
)  # fmt: skip
@pytest.mark.parametrize("field", ["to", "cc", "reply_to"])
def test_an_address_that_is_not_a_plain_addr_spec_is_refused(field: str, address: str) -> None:
    value: Any = [address] if field == "cc" else address
    with pytest.raises(HeaderInjection):
        build_message("t-1", job(**{field: value}), MAIL_FROM)


@pytest.mark.parametrize(
    ("mail_from", "name"),
    [
        ("홍길동 <noreply@example.com>", "홍길동"),
        ('"Ops, \\"Team\\"" <noreply@example.com>', 'Ops, "Team"'),
        (b_word(EVIL) + " <noreply@example.com>", b_word(EVIL)),
        ("A display name long enough to need a fold before its address <no@example.com>",
         "A display name long enough to need a fold before its address"),
    ],
)  # fmt: skip
def test_mail_from_display_name_is_encoded_by_us(mail_from: str, name: str) -> None:
    for raw in flattened(build_message("t-1", job(), mail_from)):
        assert header_names(raw).count("From") == 1
        assert "Bcc" not in header_names(raw)
        # RFC 2047 decoding (CPython's address parser puts a space between two encoded
        # words of one display name, which the RFC says to drop).
        value = (b"\r\n" + raw).split(b"\r\nFrom: ", 1)[1].split(b"\r\nTo: ", 1)[0]
        value = value.replace(b"\r\n", b"")
        decoded = str(make_header(decode_header(value.decode())))
        assert parseaddr(decoded) == (name, parseaddr(mail_from)[1])


def test_plain_ascii_subjects_keep_their_text_exactly() -> None:
    for subject in ["  leading and trailing  ", "tab\there", "a =? b", "x" * 200,
                    " ".join(f"word{i}" for i in range(200))]:  # fmt: skip
        for raw in flattened(build_message("t-1", job(subject=subject), MAIL_FROM)):
            head = raw.split(b"\r\n\r\n", 1)[0]
            assert all(len(line) <= 78 for line in head.split(b"\r\n"))
            assert parse(raw)["Subject"] == subject


def test_long_plain_subject_is_folded_at_spaces_not_encoded() -> None:
    subject = " ".join(f"word{i}" for i in range(100))
    raw = wire(job(subject=subject))
    assert b"=?" not in raw
    assert parse(raw)["Subject"] == subject


def test_many_cc_addresses_fold_between_addresses() -> None:
    cc = [f"person{i}@example.com" for i in range(30)]
    for raw in flattened(build_message("t-1", job(cc=cc), MAIL_FROM)):
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))
        assert [a.addr_spec for a in parse(raw)["Cc"].addresses] == cc


def test_international_addresses_are_utf8_in_smtputf8_and_idna_otherwise() -> None:
    msg = build_message("t-1", job(to="user@bücher.example"), MAIL_FROM)
    assert parse(flatten_message(msg, utf8=True))["To"] == "user@bücher.example"
    assert parse(flatten_message(msg))["To"] == "user@xn--bcher-kva.example"


@pytest.mark.parametrize("mail_from", ["a <x@evil.test\u2028Bcc: y@evil.test>", "x@=?u?q?a?=.b"])
def test_message_id_keeps_only_a_plain_host_name(mail_from: str) -> None:
    assert message_id("t", mail_from) == "<t@emailq.invalid>"


@given(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
    | st.lists(
        st.sampled_from(["a", " ", "é", "한", "😀", "=", "?", "_", "x" * 20]), max_size=40
    ).map("".join),
    st.sampled_from(["Subject", "From", "", "X-A-Rather-Long-Header-Name"]),
    st.booleans(),
)
def test_encoded_words_are_what_the_legacy_header_encoder_writes(
    text: str, name: str, fold: bool
) -> None:
    # The one-word shortcut must write exactly what email.header.Header writes, folded or
    # not, in base64 or quoted-printable, whichever Header would have chosen.
    expected = Header(text, "utf-8", header_name=name).encode(maxlinelen=None if fold else 0)
    assert emailq.message._encoded_words(name, text, fold=fold) == expected
