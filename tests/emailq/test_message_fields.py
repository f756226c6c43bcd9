"""What Resend and Postmark users expect of a send, in the core: ``from`` and who may use
it, strict placeholders, metadata and tags, attachments; and the MIME the worker builds
from them (parsed back, as a mail client would)."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import ValidationError

from emailq import labels
from emailq.apikeys import ANONYMOUS, ApiKey, Principal, Scope
from emailq.compose import EmailRequest, compose
from emailq.errors import Forbidden, InvalidMessage, MessageTooLarge
from emailq.message import MAX_LINE, build_message, disposition, envelope_sender
from emailq.models import Attachment, Mailbox, TaskRecord
from emailq.queue import EnqueueItem, Queue
from emailq.settings import Settings
from emailq.submit import OPERATOR, OperatorLimits, prepare
from tests.helpers.queues import job

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SHOP = frozenset({"@shop.example.com", "billing@example.org"})
LIMITS = OperatorLimits(max_body_bytes=4096, sender_allow_list=SHOP)
HEX = "a" * 64


def request(**fields: Any) -> EmailRequest:
    base: dict[str, Any] = {"to": "user@example.com", "subject": "Hi", "body": "Hello"}
    return EmailRequest.model_validate({**base, **fields})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wire(job_request: EmailRequest, mail_from: str = "App <noreply@example.com>") -> bytes:
    job = compose(job_request, max_body_bytes=1 << 20)
    return build_message("t-1", job, mail_from).as_bytes()


def parsed(job_request: EmailRequest) -> EmailMessage:
    msg = email.message_from_bytes(wire(job_request), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def error_field(info: pytest.ExceptionInfo[ValidationError]) -> str:
    return ".".join(str(p) for p in info.value.errors()[0]["loc"])


# -- from ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "name", "address"),
    [
        ("shop@shop.example.com", "", "shop@shop.example.com"),
        ("Shop <shop@shop.example.com>", "Shop", "shop@shop.example.com"),
        ('"Shop, Inc." <shop@Shop.Example.com>', "Shop, Inc.", "shop@shop.example.com"),
        ('"Say \\"hi\\"" <a@shop.example.com>', 'Say "hi"', "a@shop.example.com"),
        ("발송팀 <a@shop.example.com>", "발송팀", "a@shop.example.com"),
        # Plain text: an encoded word in the name is sent as the literal text it is.
        ("=?utf-8?b?Qm9zcw==?= <a@shop.example.com>", "=?utf-8?b?Qm9zcw==?=", "a@shop.example.com"),
    ],
)
def test_from_takes_a_display_name_as_plain_text(given: str, name: str, address: str) -> None:
    assert request(**{"from": given}).from_ == Mailbox(name=name, address=address)


@pytest.mark.parametrize(
    "given",
    [
        "Boss\r\nBcc: x@evil.test <a@shop.example.com>",  # CR/LF in the name
        "Boss\u2028 <a@shop.example.com>",  # a line separator
        "\u202eelgoog <a@shop.example.com>",  # a bidi override makes the name read backwards
        "=?us-ascii?q?victim=40evil.test=2C?=@shop.example.com",  # an encoded word in the address
        "A <b@shop.example.com> <c@evil.test>",  # two addresses
        "a@shop.example.com, b@evil.test",
        "Shop <>",
        "x" * 1000 + " <a@shop.example.com>",
    ],
)
def test_a_hostile_from_is_a_422_naming_from(given: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(**{"from": given})
    assert error_field(info) == "from"


def test_from_only_by_its_own_name() -> None:
    with pytest.raises(ValidationError):  # extra="forbid": the Python name is not a field
        request(from_="a@shop.example.com")


@pytest.mark.parametrize(
    ("principal", "limits", "sender"),
    [
        (ANONYMOUS, LIMITS, "x@other.example"),  # outside ALLOWED_SENDERS
        (ANONYMOUS, LIMITS, "someone@example.org"),  # an address listed is that address only
        (ANONYMOUS, LIMITS, "a@sub.shop.example.com"),  # subdomains are not included
        (ANONYMOUS, OperatorLimits(4096), "a@shop.example.com"),  # nothing allowed at all
        (Principal("web", Scope.SEND, senders=frozenset({"@shop.example.com"})), LIMITS,
         "billing@example.org"),  # allowed globally, not to this key
        (OPERATOR, LIMITS, "x@other.example"),  # the CLI too: it protects the domains
    ],
)  # fmt: skip
def test_a_from_outside_the_allowed_senders_is_forbidden(
    principal: Principal, limits: OperatorLimits, sender: str
) -> None:
    with pytest.raises(Forbidden):
        prepare(request(**{"from": sender}), principal, NOW, limits, request_id="r")


def test_a_from_inside_the_allowed_senders_and_the_keys_own_is_taken() -> None:
    web = Principal("web", Scope.SEND, senders=frozenset({"news@shop.example.com"}))
    item = prepare(request(**{"from": "News <News@shop.example.com>"}), web, NOW, LIMITS,
                   request_id="r")  # fmt: skip
    # Normalized as every address is: email-validator lower-cases role names (RFC 2142).
    assert item.job.sender == Mailbox(name="News", address="news@shop.example.com")
    assert envelope_sender(item.job, "noreply@example.com") == "news@shop.example.com"
    without = prepare(request(), web, NOW, LIMITS, request_id="r")
    assert without.job.sender is None  # MAIL_FROM, which every caller may use
    assert envelope_sender(without.job, "noreply@example.com") == "noreply@example.com"


def test_without_allowed_senders_only_mail_froms_domain_is_allowed() -> None:
    settings = Settings(_env_file=None, mail_from="App <noreply@Example.com>")  # type: ignore[call-arg]
    assert settings.sender_allow_list == frozenset({"@example.com"})
    prepare(request(**{"from": "shop@example.com"}), ANONYMOUS, NOW, settings, request_id="r")
    with pytest.raises(Forbidden):
        prepare(request(**{"from": "shop@other.org"}), ANONYMOUS, NOW, settings, request_id="r")
    listed = Settings(_env_file=None, allowed_senders="@shop.example.com")  # type: ignore[call-arg, arg-type]
    assert listed.sender_allow_list == frozenset({"@shop.example.com"})


@pytest.mark.parametrize(
    ("entry", "domains", "senders"),
    [
        (f"web:send:{HEX}", set(), set()),
        (f"web:send:{HEX}:a.com", {"a.com"}, set()),
        (f"web:send:{HEX}::@Shop.example.com", set(), {"@shop.example.com"}),
        (f"web:send:{HEX}:a.com:me@b.com,@c.com", {"a.com"}, {"me@b.com", "@c.com"}),
    ],
)
def test_an_api_keys_entry_may_list_its_senders(
    entry: str, domains: set[str], senders: set[str]
) -> None:
    key = ApiKey.parse(entry)
    assert (set(key.domains), set(key.senders)) == (domains, senders)
    assert ApiKey.parse(key.entry()) == key  # printed as it is parsed


@pytest.mark.parametrize(
    "entry", [f"web:send:{HEX}:a.com:", f"web:send:{HEX}::not an address", f"w:send:{HEX}:a:b:c"]
)
def test_a_bad_senders_list_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="API_KEYS entry"):
        ApiKey.parse(entry)


def test_the_from_header_is_written_from_its_parts() -> None:
    word = "=?utf-8?b?Qm9zcw0KQmNjOiB4QGV2aWwudGVzdA==?="  # "Boss\r\nBcc: x@evil.test"
    raw = wire(request(**{"from": f'"Shop, {word}" <shop@shop.example.com>'}))
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    [line] = re.findall(r"^From: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, flags=re.MULTILINE)
    # Decoded by RFC 2047 alone (CPython's address parser adds a space between two encoded
    # words of a display name, which RFC 2047 says to drop): the name as it was given.
    text = str(make_header(decode_header(line.replace("\r\n", ""))))
    assert text == f"Shop, {word} <shop@shop.example.com>"
    assert not re.search(r"^Bcc:", head, flags=re.MULTILINE)
    default = parsed(request())
    assert default["From"].addresses[0].addr_spec == "noreply@example.com"


# -- placeholders --------------------------------------------------------------------------


def test_the_originals_username_placeholder_works_exactly() -> None:
    job = compose(request(subject="{username}님", body="{username}님 안녕하세요!",
                          username="홍길동"), max_body_bytes=4096)  # fmt: skip
    assert (job.subject, job.text) == ("홍길동님", "홍길동님 안녕하세요!")


@pytest.mark.parametrize(
    ("fields", "field", "name"),
    [
        ({"body": "Hi {name}"}, "body", "name"),
        ({"subject": "Order {order}"}, "subject", "order"),
        ({"html": "<p>{code}</p>", "variables": {"other": "1"}}, "html", "code"),
        ({"body": "Hi {username}"}, "body", "username"),  # the original's, without its value
    ],
)
def test_a_placeholder_without_a_value_is_refused_naming_it(
    fields: dict[str, Any], field: str, name: str
) -> None:
    with pytest.raises(InvalidMessage, match=f"{{{name}}}") as info:
        compose(request(**fields), max_body_bytes=4096)
    assert info.value.field == field


def test_braces_that_are_not_placeholders_are_text() -> None:
    body = 'JSON {"a": 1}, {0}, {a.b}, {username.__class__}, {}, { x }'
    assert compose(request(body=body), max_body_bytes=4096).text == body


def test_placeholders_off_sends_every_brace_as_written() -> None:
    job = compose(request(subject="{title}", body="function() {return}", html="<b>{x}</b>",
                          username="Kim", placeholders="off"), max_body_bytes=4096)  # fmt: skip
    assert (job.subject, job.text, job.html) == ("{title}", "function() {return}", "<b>{x}</b>")
    with pytest.raises(ValidationError):
        request(placeholders="maybe")


# -- metadata and tags ---------------------------------------------------------------------


def test_metadata_and_tags_are_stored_on_the_task_not_in_the_job() -> None:
    item = prepare(request(metadata={"order_id": "1042", "user-id": "u_7"},
                           tags=["receipt", "shop", "receipt"]),
                   ANONYMOUS, NOW, LIMITS, request_id="r")  # fmt: skip
    assert labels.decode(item.labels) == {"metadata": {"order_id": "1042", "user-id": "u_7"},
                                          "tags": ["receipt", "shop"]}  # fmt: skip
    assert "1042" not in item.job.model_dump_json()
    assert prepare(request(), ANONYMOUS, NOW, LIMITS, request_id="r").labels == ""


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"metadata": {"bad key": "x"}}, "metadata"),
        ({"metadata": {"k": "a\r\nBcc: x@evil.test"}}, "metadata.k"),
        ({"metadata": {"k": "x" * 257}}, "metadata.k"),
        ({"metadata": {f"k{i}": "x" for i in range(21)}}, "metadata"),
        ({"metadata": {f"k{i}": "x" * 250 for i in range(10)}}, "metadata"),  # over 2 KB
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"tags": ["a b"]}, "tags.0"),
        ({"tags": ["x" * 41]}, "tags.0"),
        ({"tags": [f"t{i}" for i in range(11)]}, "tags"),
    ],
)
def test_bad_metadata_or_tags_are_a_422(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(**fields)
    assert error_field(info).startswith(where)


def test_a_label_filter_keeps_tasks_with_every_tag_and_pair() -> None:
    keep = labels.LabelFilter.parse(["a", "b"], [("order", "1")])
    assert keep.matches(["b", "a", "c"], {"order": "1", "x": "y"})
    assert not keep.matches(["a"], {"order": "1"})
    assert not keep.matches(["a", "b"], {"order": "2"})
    assert not labels.LabelFilter()  # empty: no filter
    with pytest.raises(ValueError, match="not a tag"):
        labels.LabelFilter.parse(["a b"], [])


# -- attachments ---------------------------------------------------------------------------


def attach(name: str = "report.pdf", data: bytes = b"%PDF-1.4 x", **extra: Any) -> dict[str, Any]:
    return {"filename": name, "content": b64(data), **extra}


@pytest.mark.parametrize(
    "name",
    [
        "a\r\nContent-Type: text/html.pdf",
        "a\n.pdf",
        "a\x00.pdf",
        "report\u202efdp.exe",  # bidi override: shows as report-exe.pdf
        "=?utf-8?q?evil.exe?=",  # clients decode words in parameters: shows as evil.exe
        '"; filename="evil.exe',
        "../../etc/passwd",
        "C:\\Windows\\x.txt",
        "a:stream.txt",
        "",
        " a.pdf",
        "..",
        "x" * 256,
    ],
)
def test_a_hostile_filename_is_a_422(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(attachments=[attach(name)])
    assert error_field(info).startswith("attachments.0.filename")


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"content_type": "text/html; charset=utf-8"}, "attachments.0.content_type"),
        ({"content_type": "text/html\r\nBcc: x@evil.test"}, "attachments.0.content_type"),
        ({"content_type": "multipart/mixed"}, "attachments.0.content_type"),
        ({"content_type": "message/rfc822"}, "attachments.0.content_type"),
        ({"content_type": "pdf"}, "attachments.0.content_type"),
        ({"content": "not base64!"}, "attachments.0.content"),
        ({"content": "aGk"}, "attachments.0.content"),  # unpadded
        ({"size": 1}, "attachments.0.size"),
    ],
)
def test_a_bad_content_type_or_content_is_a_422(extra: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(attachments=[{**attach(), **extra}])
    assert error_field(info) == where


def test_at_most_ten_attachments() -> None:
    with pytest.raises(ValidationError):
        request(attachments=[attach(f"{i}.txt") for i in range(11)])


def test_the_type_defaults_from_the_file_name_and_base64_line_breaks_are_fine() -> None:
    wrapped = "\r\n".join(b64(bytes(range(256)))[i : i + 76] for i in range(0, 344, 76))
    given = [attach("a.PDF"), attach("b.tar.gz"), attach("noext"),
             {"filename": "c.txt", "content": wrapped}]  # fmt: skip
    items = request(attachments=given).attachments
    got = [item.attachment() for item in items]
    assert [a.content_type for a in got] == ["application/pdf", "application/octet-stream",
                                             "application/octet-stream", "text/plain"]  # fmt: skip
    assert got[3].data == bytes(range(256))


@pytest.mark.parametrize("name", ["setup.exe", "SETUP.EXE", "invoice.pdf.exe", "x.exe.",
                                  "x.exe .", "run.js", "a.vbs", "disk.img", "disk.vhd", "addin.xll",
                                  "launch.jnlp", "mod.mjs", "setup.ex_"])  # fmt: skip
def test_a_blocked_extension_is_refused(name: str) -> None:
    with pytest.raises(InvalidMessage, match="BLOCKED_ATTACHMENT_EXTENSIONS") as info:
        prepare(request(attachments=[attach(name)]), ANONYMOUS, NOW, LIMITS, request_id="r")
    assert info.value.field == "attachments.0.filename"
    open_limits = OperatorLimits(4096, blocked_extensions=frozenset())
    prepare(request(attachments=[attach(name)]), ANONYMOUS, NOW, open_limits, request_id="r")


def test_attachments_count_in_max_body_bytes_decoded() -> None:
    # 3,000 bytes decoded are 4,000 in base64: counted as 3,000, with the text.
    fits = request(body="x" * 1000, attachments=[attach(data=b"\0" * 3000)])
    assert compose(fits, max_body_bytes=4000).attachments[0].data == b"\0" * 3000
    over = request(body="x" * 1001, attachments=[attach(data=b"\0" * 3000)])
    with pytest.raises(MessageTooLarge, match="MAX_BODY_BYTES"):
        compose(over, max_body_bytes=4000)


def test_an_attachment_arrives_byte_identical_with_its_name() -> None:
    data = bytes(range(256)) * 3 + b"\r\n.\r\nFrom: x\r\n"
    names = ["report.pdf", "보고서 2030년 1월.pdf", "a;b=c%20'd'.txt",
             "a very long file name that does not fit on one header line at all.txt"]  # fmt: skip
    msg = parsed(request(html="<p>Hello</p>", attachments=[attach(n, data) for n in names]))
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_body(("plain",)).get_content().strip() == "Hello"  # type: ignore[union-attr]
    got = [(a.get_filename(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    assert got == [(n, data) for n in names]


@pytest.mark.parametrize("name", ["보고서 " * 40 + ".pdf", "a" * 255, "%" * 200, "a b " * 60 + "z"])
def test_a_long_filename_is_folded_in_rfc2231_pieces(name: str) -> None:
    header = disposition(name).fold(policy=email.policy.SMTP)
    lines = header.split("\r\n")[:-1]
    assert all(len(line) <= MAX_LINE for line in lines), lines
    assert all(line.isascii() for line in lines)
    part = email.message_from_string(f"{header}\r\n", policy=email.policy.default)
    assert part.get_filename() == name


# What CPython's own add_attachment(filename=...) turned into a second header line on an
# unpatched 3.11 (3.11.7 here): its parser decodes the word inside the quoted parameter.
CRLF_WORD = "=?utf-8?b?" + b64(b'a.txt"\r\nBcc: x@evil.test\r\nX: "') + "?="


def test_the_worker_refuses_a_stored_hostile_attachment() -> None:
    # A task written by an older version, or by hand: never sent as it is.
    job = compose(request(), max_body_bytes=4096)
    for bad in (Attachment(filename="a\r\nBcc: x@evil.test", content_type="text/plain",
                           content="aGk="),
                Attachment(filename=CRLF_WORD, content_type="text/plain", content="aGk="),
                Attachment(filename="a.txt", content_type="text/plain\r\nBcc: x@evil.test",
                           content="aGk=")):  # fmt: skip
        with pytest.raises(InvalidMessage):
            build_message("t", job.model_copy(update={"attachments": [bad]}), "a@example.com")


# -- labels in Redis -----------------------------------------------------------------------


async def cancelled(queue: Queue, name: str, tags: list[str], **metadata: str) -> str:
    """A dead letter with these labels: queued, then cancelled (it ends failed)."""
    item = EnqueueItem(name, job(name), "r", labels=labels.encode(metadata, tags))
    await queue.enqueue_many([item])
    assert await queue.cancel(name) == "cancelled"
    return name


async def test_labels_outlive_the_job_and_filter_the_dead_letters(queue: Queue) -> None:
    # Newest first: c, b, a.
    a = await cancelled(queue, "a", ["shop"], order="1")
    b = await cancelled(queue, "b", ["news"])
    c = await cancelled(queue, "c", ["shop", "vip"], order="2")
    record = await queue.get(a)
    assert record is not None
    assert (record.tags, record.metadata) == (["shop"], {"order": "1"})

    def only(*tags: str, **metadata: str) -> Callable[[TaskRecord], bool]:
        keep = labels.LabelFilter.parse(tags, metadata.items())
        return lambda r: keep.matches(r.tags, r.metadata)

    async def ids(keep: Callable[[TaskRecord], bool], **page: int) -> tuple[list[str], int | None]:
        found, next_offset = await queue.failed_matching(
            keep, **{"offset": 0, "limit": 50, "max_scan": 100, **page}
        )
        return [r.task_id for r in found], next_offset

    assert await ids(only("shop")) == ([c, a], None)
    assert await ids(only("shop", "vip")) == ([c], None)
    assert await ids(only(order="1")) == ([a], None)
    assert await ids(only("none")) == ([], None)
    # A page ends where its last task was found; the next one starts after it.
    assert await ids(only("shop"), limit=1) == ([c], 1)
    assert await ids(only("shop"), limit=1, offset=1) == ([a], None)
    # A call reads at most max_scan entries, and says where to go on.
    assert await ids(only(order="1"), max_scan=2) == ([], 2)
    assert await ids(only(order="1"), offset=2, max_scan=2) == ([a], None)
    assert b not in (await ids(only("shop")))[0]
