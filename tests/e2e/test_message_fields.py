"""``from``, strict placeholders, metadata and tags, attachments across real processes:
the API and a worker as the README runs them, real Redis, and aiosmtpd; what arrived is
parsed as a mail client would and counted."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from emailq.apikeys import hash_key
from emailq.settings import Settings
from tests.helpers.api import task_keys
from tests.helpers.processes import Procs, settings_env
from tests.helpers.smtpd import Received, RecordingHandler, SmtpServer

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
RESULT = "/api/v1/email/result"
FAILED = "/api/v1/admin/failed"
SHOP_KEY = "eq_shop-test-key-0123456789"  # test keys, not credentials
ADMIN_KEY = "eq_admin-test-key-0123456789"
# Every header emailq writes, at the top and in each part; anything else was planted.
OUR_HEADERS = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version",
               "content-type", "content-transfer-encoding", "content-disposition"}  # fmt: skip
WORKER_KEYS = re.compile(r"^\{emailq\}:(workers|stats:.*|fairness|relay:.*)$")


@dataclass
class RefusingHandler(RecordingHandler):
    """Refuses RCPT for ``gone@...`` (550, a permanent failure: a dead letter)."""

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address.startswith("gone@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@dataclass
class Service:
    base: str
    settings: Settings
    smtp: SmtpServer
    store: redis.Redis

    def post(self, path: str, body: dict[str, Any], key: str = SHOP_KEY) -> httpx.Response:
        return httpx.post(self.base + path, json=body, headers=bearer(key), timeout=30)

    def result(self, task_id: str, key: str = SHOP_KEY) -> dict[str, Any]:
        params: dict[str, str | int] = {"task_id": task_id, "wait": 10}
        answer = httpx.get(self.base + RESULT, params=params, headers=bearer(key), timeout=30)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def mail_of(self, task_id: str, key: str = SHOP_KEY) -> Received:
        assert self.result(task_id, key)["status"] == "success"
        [mail] = [m for m in self.smtp.handler.received if m.task_id == task_id]
        return mail

    def stored(self) -> list[str]:
        """Every key but those a worker writes on its own (heartbeats, claim fairness, its
        relay state)."""
        keys = [str(k) for k in self.store.keys()]  # noqa: SIM118  # a Redis client, not a dict
        return sorted(k for k in keys if not WORKER_KEYS.match(k))

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = settings_env(self.settings)
        return subprocess.run([sys.executable, "-m", "emailq.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def mail(**fields: Any) -> dict[str, Any]:
    return {"to": "user@example.com", "subject": "Hello", "body": "Hi", **fields}


@pytest.fixture
def service(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer],
    redis_url: str,
) -> Iterator[Service]:  # fmt: skip
    smtp = smtp_factory(handler=RefusingHandler())
    settings = make_settings(
        smtp_port=smtp.port,
        mail_from="emailq <noreply@example.com>",
        allowed_senders="@example.com, @shop.example.com, billing@partner.example.org",
        api_keys=f"shop:send:{hash_key(SHOP_KEY)}::@shop.example.com "
        f"ops:admin:{hash_key(ADMIN_KEY)}",
        max_attempts=1,
    )
    base = procs.api(settings)
    procs.worker(settings)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    yield Service(base, settings, smtp, store)
    store.close()


def decoded_header(raw: bytes, name: str, *, part: int = 0) -> str:
    """A header of the message (or of its ``part``-th MIME part, in order of appearance),
    unfolded and decoded by RFC 2047 alone."""
    block = raw.split(b"\r\n\r\n")[0] if part == 0 else part_blocks(raw)[part - 1]
    for field in unfolded(block):
        field_name, _, value = field.partition(": ")
        if field_name.lower() == name.lower():
            return str(make_header(decode_header(value)))
    raise AssertionError(f"no {name} header")


def unfolded(block: bytes) -> list[str]:
    text = block.decode("ascii")  # every header line emailq writes is ASCII
    return text.replace("\r\n ", " ").replace("\r\n\t", "\t").split("\r\n")


def part_blocks(raw: bytes) -> list[bytes]:
    """The header block of every MIME part, in order."""
    msg = Received("", [], raw, ("", 0)).message
    boundary = msg.get_boundary()
    assert boundary is not None
    chunks = raw.split(b"--" + boundary.encode())[1:-1]
    return [chunk.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0] for chunk in chunks]


def header_names(raw: bytes) -> list[list[str]]:
    """The header names of the message, then of each part, lower case."""
    blocks = [raw.split(b"\r\n\r\n", 1)[0]]
    if b"multipart/" in blocks[0]:
        blocks += part_blocks(raw)
    return [[f.split(":", 1)[0].lower() for f in unfolded(b)] for b in blocks]


def check_headers(raw: bytes) -> None:
    """Only headers emailq writes, none twice, in the message and in every part."""
    for names in header_names(raw):
        assert set(names) <= OUR_HEADERS, names
        assert len(names) == len(set(names)), names


# -- from ----------------------------------------------------------------------------------


def test_from_sets_the_from_header_and_the_envelope_sender(service: Service) -> None:
    answer = service.post(SEND, mail(**{"from": "상점 Orders <Orders@shop.example.com>"}))
    assert answer.status_code == 202, answer.text
    plain = service.post(SEND, mail())
    assert plain.status_code == 202, plain.text

    sent = service.mail_of(answer.json()["task_id"])
    assert sent.mail_from == "Orders@shop.example.com"  # the envelope follows From
    assert decoded_header(sent.raw, "From") == "상점 Orders <Orders@shop.example.com>"
    check_headers(sent.raw)
    default = service.mail_of(plain.json()["task_id"])
    assert default.mail_from == "noreply@example.com"
    assert decoded_header(default.raw, "From") == "emailq <noreply@example.com>"
    assert len(service.smtp.handler.received) == 2


@pytest.mark.parametrize(
    ("key", "sender"),
    [
        (SHOP_KEY, "noreply@example.com"),  # allowed to others, not to this key
        (SHOP_KEY, "billing@partner.example.org"),
        (ADMIN_KEY, "ceo@bank.example.net"),  # outside ALLOWED_SENDERS, even for admin
        (ADMIN_KEY, "other@partner.example.org"),  # an address listed is that address only
    ],
)
def test_from_outside_the_allowed_senders_is_403_and_stores_nothing(
    service: Service, key: str, sender: str
) -> None:
    before = service.stored()
    answer = service.post(SEND, mail(**{"from": f"Boss <{sender}>"}), key=key)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == "forbidden"
    assert sender in answer.json()["detail"]
    batch = service.post(BATCH, {"messages": [mail(**{"from": sender})]}, key=key)
    assert batch.status_code == 403, batch.text
    assert batch.json()["results"][0]["error"] == "forbidden"
    assert service.stored() == before
    assert task_keys(service.store) == []
    assert service.smtp.handler.received == []


def test_an_encoded_word_in_the_display_name_arrives_as_text(service: Service) -> None:
    word = "=?utf-8?b?" + base64.b64encode(b"Boss\r\nBcc: x@evil.test").decode() + "?="
    answer = service.post(SEND, mail(**{"from": f"{word} <news@shop.example.com>"}))
    assert answer.status_code == 202, answer.text
    sent = service.mail_of(answer.json()["task_id"])
    assert decoded_header(sent.raw, "From") == f"{word} <news@shop.example.com>"
    assert sent.rcpt_tos == ["user@example.com"]
    check_headers(sent.raw)


# -- placeholders --------------------------------------------------------------------------


def test_a_placeholder_without_a_value_is_a_422_naming_it(service: Service) -> None:
    before = service.stored()
    answer = service.post(SEND, mail(body="Hello {name}, your code is {code}",
                                     variables={"code": "1234"}))  # fmt: skip
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"] == "invalid_message"
    assert "{name}" in body["detail"]
    assert body["fields"][0]["loc"] == ["body", "body"]
    assert service.stored() == before

    literal = service.post(SEND, mail(body='Hello {name} {"a": 1}', placeholders="off"))
    assert literal.status_code == 202, literal.text
    original = service.post(SEND, mail(subject="{username}님", body="{username}님 안녕하세요!",
                                       username="홍길동"))  # fmt: skip
    assert original.status_code == 202, original.text
    sent = service.mail_of(literal.json()["task_id"])
    assert sent.message.get_body().get_content().strip() == 'Hello {name} {"a": 1}'  # type: ignore[union-attr]
    korean = service.mail_of(original.json()["task_id"])
    assert korean.message["Subject"] == "홍길동님"
    assert korean.message.get_body().get_content().strip() == "홍길동님 안녕하세요!"  # type: ignore[union-attr]
    assert len(service.smtp.handler.received) == 2


# -- metadata and tags ---------------------------------------------------------------------


def test_metadata_and_tags_are_returned_and_filter_the_dead_letters(service: Service) -> None:
    sent = service.post(SEND, mail(metadata={"order_id": "7"}, tags=["receipt"]))
    gone_shop = service.post(SEND, mail(to="gone@example.com", metadata={"order_id": "8"},
                                        tags=["receipt", "shop"]))  # fmt: skip
    gone_news = service.post(SEND, mail(to="gone@example.com", tags=["news"]))
    untagged = service.post(SEND, mail(to="gone@example.com"))
    ids = [r.json()["task_id"] for r in (sent, gone_shop, gone_news, untagged)]

    result = service.result(ids[0])
    assert result["status"] == "success"
    assert (result["metadata"], result["tags"]) == ({"order_id": "7"}, ["receipt"])
    assert service.result(ids[1])["status"] == "failed"
    assert service.result(ids[2])["status"] == "failed"
    failed = service.result(ids[3])
    assert failed["status"] == "failed"
    assert "metadata" not in failed
    assert "tags" not in failed
    mail_sent = service.mail_of(ids[0])
    assert b"order_id" not in mail_sent.raw
    assert b"receipt" not in mail_sent.raw

    def listed(query: str) -> list[str]:
        page = httpx.get(f"{service.base}{FAILED}?{query}", headers=bearer(ADMIN_KEY), timeout=30)
        assert page.status_code == 200, page.text
        return [t["task_id"] for t in page.json()["tasks"]]

    assert listed("tag=receipt") == [ids[1]]
    assert listed("tag=news") == [ids[2]]
    assert listed("tag=receipt&tag=shop&metadata.order_id=8") == [ids[1]]
    assert listed("metadata.order_id=7") == []  # that one was sent, not failed
    assert listed("") == [ids[3], ids[2], ids[1]]
    bad = httpx.get(f"{service.base}{FAILED}?tag=a%20b", headers=bearer(ADMIN_KEY), timeout=30)
    assert bad.status_code == 422
    assert bad.json()["error"] == "validation_error"

    cli = service.cli("failed", "--tag", "shop", "--json")
    assert cli.returncode == 0, cli.stderr
    [task] = json.loads(cli.stdout)["tasks"]
    assert (task["task_id"], task["tags"], task["metadata"]) == (ids[1], ["receipt", "shop"],
                                                                 {"order_id": "8"})  # fmt: skip
    table = service.cli("status", ids[1])
    lines = [line.split(None, 1) for line in table.stdout.splitlines() if line.strip()]
    assert ["tags", "receipt, shop"] in lines, table.stdout
    assert ["metadata.order_id", "8"] in lines, table.stdout


# -- attachments ---------------------------------------------------------------------------


def attachment(name: str, data: bytes, **extra: str) -> dict[str, str]:
    return {"filename": name, "content": base64.b64encode(data).decode(), **extra}


def test_attachments_arrive_byte_identical_with_their_names(service: Service) -> None:
    blob = os.urandom(48 * 1024) + b"\r\n.\r\nFrom: x@evil.test\r\n\r\n"
    long_name = "2030년 1월 보고서 (최종본) - 아주 긴 이름이라 한 줄에 다 들어가지 않습니다.pdf"
    names = ["report.pdf", long_name, "a;b=c%20'd' (1).txt", "x\u00a0y.bin"]
    body = mail(html="<p>Hi</p>", attachments=[attachment(n, blob) for n in names])
    answer = service.post(SEND, body)
    assert answer.status_code == 202, answer.text

    sent = service.mail_of(answer.json()["task_id"])
    msg = sent.message
    assert msg.get_content_type() == "multipart/mixed"
    got = [(a.get_filename(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    assert got == [(n, blob) for n in names]
    types = [a.get_content_type() for a in msg.iter_attachments()]
    assert types == ["application/pdf", "application/pdf", "text/plain",
                     "application/octet-stream"]  # fmt: skip
    assert msg.get_body(("plain",)).get_content().strip() == "Hi"  # type: ignore[union-attr]
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hi</p>"  # type: ignore[union-attr]
    check_headers(sent.raw)
    assert len(service.smtp.handler.received) == 1


@pytest.mark.parametrize(
    ("item", "status", "field"),
    [
        (attachment("a\r\nBcc: x@evil.test\r\n\r\nplanted.txt", b"x"), 422,
         "attachments.0.filename"),
        (attachment('a"; filename="evil.exe', b"x"), 422, "attachments.0.filename"),
        (attachment("=?utf-8?q?evil.exe?=", b"x"), 422, "attachments.0.filename"),
        (attachment("invoice.pdf.exe", b"MZ"), 422, "attachments.0.filename"),
        (attachment("x.pdf", b"x", content_type="text/html\r\nBcc: x@evil.test"), 422,
         "attachments.0.content_type"),
        (attachment("big.bin", b"\0" * 1024 * 1024), 413, None),  # over MAX_BODY_BYTES
    ],
)  # fmt: skip
def test_a_hostile_attachment_is_refused_and_stores_nothing(
    service: Service, item: dict[str, str], status: int, field: str | None
) -> None:
    before = service.stored()
    answer = service.post(SEND, mail(attachments=[item]))
    assert answer.status_code == status, answer.text
    if field is not None:
        assert ".".join(str(p) for p in answer.json()["fields"][0]["loc"][1:]) == field
    assert service.stored() == before
    assert service.smtp.handler.received == []


def test_the_cli_sends_with_from_attach_tags_and_metadata(service: Service, tmp_path: Path) -> None:
    data = os.urandom(2000)
    path = tmp_path / "발송 목록.csv"
    path.write_bytes(data)
    run = service.cli("send", "--to", "user@example.com", "--subject", "Report", "--body",
                      "Attached", "--from", "Reports <reports@shop.example.com>",
                      "--attach", str(path), "--tag", "report", "--metadata", "run=42")  # fmt: skip
    assert run.returncode == 0, run.stderr
    task_id = run.stdout.strip()
    sent = service.mail_of(task_id, ADMIN_KEY)  # the operator's task: no key owns it
    assert sent.mail_from == "reports@shop.example.com"
    [item] = sent.message.iter_attachments()
    assert (item.get_filename(), item.get_payload(decode=True)) == ("발송 목록.csv", data)
    status = service.cli("status", task_id, "--json")
    assert json.loads(status.stdout)["metadata"] == {"run": "42"}
    # The operator's from is held to ALLOWED_SENDERS too: the relay's domains, not the API's.
    refused = service.cli("send", "--to", "user@example.com", "--subject", "x", "--body", "x",
                          "--from", "ceo@bank.example.net")  # fmt: skip
    assert refused.returncode == 1
    assert "allowed senders" in refused.stderr
