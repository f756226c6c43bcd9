"""render(): the bytes the worker sends, held to what CPython's email package builds.

``build_message`` (EmailMessage, set_content, the generator) is the oracle: for many
generated jobs both are parsed back as a mail client would, and every header, body and
attachment must read the same, in each form a relay can ask for (SMTPUTF8 or not, 8BITMIME
or not).
"""

from __future__ import annotations

import base64
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import default
from typing import Any

import pytest
from aiosmtplib.email import flatten_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emailq.errors import HeaderInjection
from emailq.message import MAX_LINE, build_message, render
from emailq.models import Attachment, Job, Mailbox

MAIL_FROM = "emailq <noreply@mail.example.com>"
KOREAN = "홍길동님, 주문하신 상품이 발송되었습니다 — 확인해 주세요"
# The parts of a body that make the encoders' choices differ: line ends of every kind,
# trailing spaces, dots and dashes at a line's start, "=" (quoted-printable's escape),
# non-ASCII of two, three and four bytes, and long runs without a space.
PIECES = ["a", "word ", " ", "\t", "\n", "\r\n", "\r", ".", "..", "--", "=", "=?", "é",
          "한글", "😀", "x" * 90, "y " * 50, "\u2028", "\x85", "\x0c"]  # fmt: skip
SAFE_HEADER = st.lists(st.sampled_from(["a", "B", " ", "=?", "?=", "é", "한", "—", "\t", "x" * 30]),
                      max_size=40).map("".join)  # fmt: skip

bodies = st.lists(st.sampled_from(PIECES), max_size=40).map("".join) | st.text(
    st.characters(exclude_categories=["Cs"]), max_size=300
)
addresses = st.sampled_from(["user@example.com", "a.b+c@sub.example.org", "user@bücher.example",
                             "홍@example.kr", "x" * 60 + "@example.com"])  # fmt: skip
filenames = st.sampled_from(["a.txt", "report 2026.pdf", "보고서.pdf", "x" * 120 + ".bin",
                             "semi;colon.txt", "quote's.txt", "100%.csv"])  # fmt: skip
attachments = st.builds(
    lambda name, ctype, data: Attachment(filename=name, content_type=ctype,
                                         content=base64.b64encode(data).decode()),
    filenames,
    st.sampled_from(["text/plain", "application/pdf", "image/png",
                     "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"]),
    st.binary(max_size=400),
)  # fmt: skip
jobs = st.builds(
    Job,
    to=addresses,
    subject=SAFE_HEADER,
    text=bodies,
    html=st.none() | st.just("") | bodies,
    cc=st.lists(addresses, max_size=3),
    reply_to=st.none() | addresses,
    sender=st.none() | st.builds(Mailbox, name=SAFE_HEADER.map(str.strip), address=addresses),
    attachments=st.lists(attachments, max_size=2),
)


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def reading(msg: Message) -> list[Any]:
    """What a mail client reads in ``msg``: every part's headers (but Date, MIME-Version and
    the boundary, which differ by design) and its decoded content."""
    out: list[Any] = []
    for part in msg.walk():
        assert isinstance(part, EmailMessage)
        headers = sorted((k.lower(), str(v)) for k, v in part.items()
                         if k.lower() not in ("date", "mime-version", "content-type",
                                              "content-transfer-encoding"))  # fmt: skip
        params = sorted((k, v) for k, v in part.get_params() or [] if k != "boundary")
        content = None if part.is_multipart() else part.get_content()
        if isinstance(content, str):
            # In base64 text CPython's 7bit fallback keeps LF line ends, set_content CRLF
            # (RFC 2045's canonical form, which render() writes): readers take both.
            content = content.replace("\r\n", "\n")
        out.append((headers, part.get_content_type(), params, part.get_filename(), content))
    return out


def forms(job: Job) -> list[tuple[bytes, bytes]]:
    """(old, new) for each way a relay takes a mail: plain, SMTPUTF8, and without 8BITMIME."""
    old = build_message("t-1", job, MAIL_FROM)
    new = render("t-1", job, MAIL_FROM)
    return [
        (flatten_message(old), new.as_bytes()),
        (flatten_message(old, utf8=True), new.as_bytes(utf8=True)),
        (flatten_message(old, cte_type="7bit"), new.as_bytes(eight_bit=False)),
    ]


def check_same(job: Job) -> None:
    for old, new in forms(job):
        before, after = parse(old), parse(new)
        assert reading(after) == reading(before)
        assert [p.defects for p in after.walk()] == [[] for _ in after.walk()]
        head = new.split(b"\r\n\r\n", 1)[0]
        old_head = old.split(b"\r\n\r\n", 1)[0]
        if all(len(line) <= MAX_LINE for line in old_head.split(b"\r\n")):
            assert all(len(line) <= MAX_LINE for line in head.split(b"\r\n"))
        assert b"\n" not in new.replace(b"\r\n", b"")
        assert all(len(line) <= 998 for line in new.split(b"\r\n"))
    seven_bit = forms(job)[2][1]
    if job.sender is None or job.sender.address.isascii():
        assert seven_bit.split(b"\r\n\r\n", 1)[1].isascii()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs)
def test_render_reads_as_build_message_does(job: Job) -> None:
    try:
        build_message("t-1", job, MAIL_FROM)
    except HeaderInjection:
        with pytest.raises(HeaderInjection):
            render("t-1", job, MAIL_FROM)
        return
    check_same(job)


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": KOREAN * 3, "text": "본문입니다\n" * 3, "html": "<p>한글</p>"},
        {"text": "line\r\nwith CRLF\rand CR\nand LF", "html": ""},
        {"text": "x" * 2000, "html": "<p>" + "y" * 2000 + "</p>"},
        {"text": "é" * 500},
        {"text": "", "html": "<b>only html</b>"},
        {"text": ".\n..\n.", "cc": ["a@example.com"], "reply_to": "r@example.com"},
        {"text": "--=_\n=_ --", "attachments": [
            Attachment(filename="보고서 2026.pdf", content_type="application/pdf",
                       content=base64.b64encode(bytes(range(256)) * 3).decode())]},
    ],
)  # fmt: skip
def test_render_reads_as_build_message_does_for_known_cases(fields: dict[str, Any]) -> None:
    check_same(Job(**{"to": "user@example.com", "subject": "Hi", "text": "Hi", **fields}))


def test_an_8bit_body_is_written_as_7bit_for_a_relay_without_8bitmime() -> None:
    wire = render("t-1", Job(to="u@example.com", subject="s", text="한글"), MAIL_FROM)
    assert b"Content-Transfer-Encoding: 8bit" in wire.as_bytes()
    seven = wire.as_bytes(eight_bit=False)
    assert seven.isascii()
    assert parse(seven).get_content() == "한글\r\n"  # base64 of CRLF text


def test_a_boundary_is_never_inside_a_part() -> None:
    # The body may hold text that looks like a boundary; the boundary is random, and
    # render() picks another if a part holds it (here: it holds every one it could see).
    job = Job(to="u@example.com", subject="s", text="--=_ a\n--=_", html="<p>--=_</p>")
    raw = render("t-1", job, MAIL_FROM).as_bytes()
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    assert raw.count(f"--{boundary}".encode()) == 3  # two parts and the closing delimiter
