"""Run every entry of ``corpus.toml`` against the API and a worker as real processes.

One API process, one worker, real Redis and a real SMTP server (aiosmtpd) are started
once for the module; each entry is one test. A refused entry must answer its status and
error code and store nothing; an accepted one must put exactly the mail it asked for on
the SMTP server (see the format at the top of ``corpus.toml``).
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from emailq.devtools.redis_server import RedisServer
from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.processes import FAST, Procs
from tests.helpers.smtpd import Received, SmtpServer, start_smtp
from tests.helpers.templates import write_templates

CORPUS = tomllib.loads(Path(__file__).with_name("corpus.toml").read_text())
ENTRIES: list[dict[str, Any]] = CORPUS["attack"]
RESULT_WAIT_SECONDS = 10
# The runner's own calls (results, queue stats): zero-config loopback access, or this key
# once [settings] sets API_KEYS.
RUNNER_HEADERS = {"Authorization": f"Bearer {CORPUS['admin_key']}"} if "admin_key" in CORPUS else {}
# Every header emailq writes; anything else in a mail was planted.
OUR_HEADERS = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version",
               "content-type", "content-transfer-encoding"}  # fmt: skip
# ... and in each MIME part of a mail with attachments.
PART_HEADERS = {"content-type", "content-transfer-encoding", "content-disposition"}
# Keys the worker writes on its own (heartbeats, counters, claim fairness, its relay state
# and send rate): not "stored".
WORKER_KEYS = re.compile(r"^\{emailq\}:(workers|stats:.*|fairness|relay:.*)$")
_WORD_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Service:
    """The running processes, and what the SMTP server should have received so far."""

    base: str
    smtp: SmtpServer
    store: redis.Redis
    mail_from: str
    delivered: int = 0


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store.flushall()
    tmp = tmp_path_factory.mktemp("attacks")
    forms_file = tmp / "forms.json"
    forms_file.write_text(json.dumps({"forms": CORPUS.get("forms", [])}))
    templates_dir = write_templates(tmp / "templates", CORPUS.get("templates", {}))
    smtp = start_smtp()
    values: dict[str, Any] = {**FAST, "redis_url": redis_server.url, "smtp_host": "127.0.0.1",
                              "smtp_port": smtp.port, "forms_file": forms_file,
                              "templates_dir": templates_dir,
                              **CORPUS.get("settings", {})}  # fmt: skip
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    procs = Procs(tmp)
    try:
        base = procs.api(settings)
        procs.worker(settings)
        yield Service(base, smtp, store, settings.mail_from)
    finally:
        procs.stop_all()
        smtp.stop()
        store.close()


# -- Building the request ------------------------------------------------------------------


def made(spec: dict[str, Any]) -> str:
    """The text a ``words`` entry stands for: a repetition, or an encoded word."""
    if "times" in spec:
        return str(spec["text"]) * int(spec["times"])
    return encoded_word(spec)


def encoded_word(spec: dict[str, str]) -> str:
    """``=?charset?b|q?...?=`` of ``spec["text"]``; a ``*lang`` suffix is kept in the word."""
    charset, letter = spec["charset"], spec["encoding"]
    raw = spec["text"].encode(charset.split("*")[0])
    if letter.lower() == "b":
        payload = base64.b64encode(raw).decode()
    else:
        payload = "".join(chr(b) if chr(b).isalnum() and b < 128 else f"={b:02X}" for b in raw)
    return f"=?{charset}?{letter}?{payload}?="


def substitute(value: Any, words: dict[str, str]) -> Any:
    """``value`` with every ``${NAME}`` in its strings (keys included) replaced."""
    if isinstance(value, str):
        return _WORD_REF.sub(lambda m: words[m.group(1)], value) if words else value
    if isinstance(value, list):
        return [substitute(v, words) for v in value]
    if isinstance(value, dict):
        return {substitute(k, words): substitute(v, words) for k, v in value.items()}
    return value


def prepared(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its words made and substituted."""
    words = {name: made(spec) for name, spec in entry.get("words", {}).items()}
    return {k: substitute(v, words) for k, v in entry.items() if k != "words"}


def send(service: Service, entry: dict[str, Any]) -> httpx.Response:
    method, path = entry["where"].split(" ", 1)
    kwargs: dict[str, Any] = {"headers": entry.get("headers", {})}
    if "json" in entry:
        kwargs["json"] = entry["json"]
    elif "form" in entry:
        kwargs["data"] = entry["form"]
    elif "body" in entry:
        kwargs["content"] = entry["body"].encode()
        kwargs["headers"] = {"Content-Type": entry["content_type"], **kwargs["headers"]}
    transport = httpx.HTTPTransport(local_address=entry["client"]) if "client" in entry else None
    with httpx.Client(base_url=service.base, transport=transport, timeout=30) as client:
        return client.request(method, path, **kwargs)


# -- Checking the answer and Redis ---------------------------------------------------------


def stored_keys(store: redis.Redis) -> set[str]:
    return {k for k in store.scan_iter("*", count=1000) if not WORKER_KEYS.match(k)}


def field_of(item: dict[str, Any]) -> str:
    return ".".join(str(p) for p in item["loc"] if p != "body")


def check_answer(response: httpx.Response, expect: dict[str, Any]) -> None:
    assert response.status_code == expect["status"], response.text
    if response.status_code >= 400:
        body = response.json()
        assert {"error", "detail", "request_id"} <= set(body), body
        if "error" in expect:
            assert body["error"] == expect["error"], body
        if "field" in expect:
            assert field_of(body["fields"][0]) == expect["field"], body
    if "results" in expect:
        results = response.json()["results"]
        assert len(results) == len(expect["results"])
        for got, want in zip(results, expect["results"], strict=True):
            for key, value in want.items():
                actual = field_of({"loc": got["fields"][0]["loc"]}) if key == "field" else got[key]
                assert actual == value, results


def task_ids(response: httpx.Response) -> list[str] | None:
    """The tasks the answer names; None for a plain form post (303), which names none."""
    if response.status_code == 303:
        return None
    body = response.json()
    if "results" in body:
        return [r["task_id"] for r in body["results"] if r.get("task_id")]
    return [body["task_id"]]


# -- Checking the mail ---------------------------------------------------------------------


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii(), head
    return [line.split(b":", 1)[0].decode().lower() for line in head.split(b"\r\n")
            if line[:1] not in (b" ", b"\t")]  # fmt: skip


def decoded(raw: bytes, name: str) -> str:
    """A header's text decoded by RFC 2047 alone (no address parsing)."""
    lines = (b"\r\n" + raw.split(b"\r\n\r\n", 1)[0]).split(b"\r\n" + name.encode() + b": ", 1)
    value = re.split(rb"\r\n(?![ \t])", lines[1], maxsplit=1)[0].replace(b"\r\n", b"")
    return str(make_header(decode_header(value.decode())))


def plain_text(msg: EmailMessage) -> str:
    if msg.get_content_type() == "multipart/mixed":  # the text, then the attachments
        msg = next(iter(msg.iter_parts()))  # type: ignore[arg-type]  # parts of an EmailMessage are EmailMessages
    kinds = [p.get_content_type() for p in msg.iter_parts()] if msg.is_multipart() else []
    assert msg.get_content_type() == "text/plain" or kinds == ["text/plain", "text/html"]
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def addresses(msg: EmailMessage, name: str) -> list[str]:
    header = msg[name]
    return [] if header is None else [a.addr_spec for a in header.addresses]


def part_header_names(msg: EmailMessage) -> list[list[str]]:
    """The header names of each part of a multipart/mixed mail (the attachments' and the
    text's own), as they arrived."""
    if msg.get_content_type() != "multipart/mixed":
        return []
    return [[name.lower() for name in part] for part in msg.walk() if part is not msg]


def check_mail(mail: Received, want: dict[str, Any], mail_from: str) -> None:
    names = header_names(mail.raw)
    assert names.count("from") == 1, names
    assert len(names) == len(set(names)), names
    assert set(names) <= OUR_HEADERS, names
    for part in part_header_names(mail.message):
        assert set(part) <= PART_HEADERS, part
        assert len(part) == len(set(part)), part
    assert parseaddr(decoded(mail.raw, "From")) == parseaddr(want.get("from", mail_from))
    assert mail.mail_from == parseaddr(want.get("from", mail_from))[1]  # the envelope follows
    check_wanted(mail, want)
    check_attachments(mail.message, want)


def check_attachments(msg: EmailMessage, want: dict[str, Any]) -> None:
    if "attachments" in want:
        got = [(a.get_filename(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
        assert got == [(w["filename"], base64.b64decode(w["content"]))
                       for w in want["attachments"]]  # fmt: skip


def check_wanted(mail: Received, want: dict[str, Any]) -> None:
    msg = mail.message
    text = plain_text(msg)
    if "rcpt" in want:
        assert mail.rcpt_tos == want["rcpt"]
    if "subject" in want:
        assert decoded(mail.raw, "Subject") == want["subject"]
        assert msg["Subject"] == want["subject"]
    for key, header in (("to", "To"), ("cc", "Cc")):
        if key in want:
            assert addresses(msg, header) == want[key]
    if "reply_to" in want:
        assert addresses(msg, "Reply-To") == [want["reply_to"]]
    check_body(text, want)
    check_html(msg, want)


def check_body(text: str, want: dict[str, Any]) -> None:
    if "text" in want:
        assert text.rstrip("\n") == want["text"]
    for part in want.get("body_contains", []):
        assert part in text, text
    for start in want.get("no_line_starts", []):
        assert not [line for line in text.splitlines() if line.startswith(start)], text


def check_html(msg: EmailMessage, want: dict[str, Any]) -> None:
    if "html_contains" in want:
        part = msg.get_body(("html",))
        assert part is not None
        html = str(part.get_content())
        for fragment in want["html_contains"]:
            assert fragment in html, html


def settled(service: Service) -> bool:
    """Nothing waits in a lane, under a lease or on a schedule."""
    url = f"{service.base}/api/v1/admin/stats"
    stats = httpx.get(url, headers=RUNNER_HEADERS, timeout=10).json()
    busy = sum(lane["depth"] for lane in stats["lanes"]) + stats["in_flight"] + stats["scheduled"]
    return busy == 0


def final_status(service: Service, task_id: str) -> str:
    params = {"task_id": task_id, "wait": RESULT_WAIT_SECONDS}
    url = f"{service.base}/api/v1/email/result"
    result = httpx.get(url, params=params, headers=RUNNER_HEADERS, timeout=30)
    status: str = result.json()["status"]
    return status


def received(service: Service, tasks: list[str] | None) -> list[Received]:
    """The mails of ``tasks`` (or, for a 303, the next new mail) once all have arrived."""
    handler = service.smtp.handler
    if tasks is None:
        wait_until(lambda: len(handler.received) > service.delivered, what="the form's mail")
        return handler.received[service.delivered :]
    # A task is "success" only after the server accepted its mail: it is there already, and
    # missing only if the Message-ID that names it did not arrive as a header.
    missing = set(tasks) - set(handler.task_ids())
    assert not missing, f"no mail with the Message-ID of {missing}"
    earlier = set(handler.task_ids()[: service.delivered]) & set(tasks)
    assert not earlier, f"{earlier} belong to an earlier entry: a duplicate submission?"
    return [m for m in handler.received if m.task_id in tasks]


def check_delivered(service: Service, response: httpx.Response, want: dict[str, Any]) -> None:
    tasks = task_ids(response)
    for task_id in tasks or []:
        assert final_status(service, task_id) == "success"
    mails = received(service, tasks)
    # Each mail once, and nothing else: no duplicate, and no mail of a refused entry.
    assert len(service.smtp.handler.received) == service.delivered + len(mails)
    for mail in mails:
        check_mail(mail, want, service.mail_from)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_attack(service: Service, entry: dict[str, Any]) -> None:
    entry = prepared(entry)
    before = stored_keys(service.store)
    try:
        response = send(service, entry)
        check_answer(response, entry["expect"])
        if response.status_code >= 400:
            assert stored_keys(service.store) - before == set()
            assert len(service.smtp.handler.received) == service.delivered
        else:
            check_delivered(service, response, entry.get("mail", {}))
    finally:
        # Whatever this entry queued is sent or failed before the next one starts, and
        # counts as seen: a failure here does not fail the next entry.
        wait_until(lambda: settled(service), what="an empty queue")
        service.delivered = len(service.smtp.handler.received)


def test_the_corpus_is_well_formed() -> None:
    ids = [e["id"] for e in ENTRIES]
    assert len(ids) == len(set(ids))
    for entry in ENTRIES:
        assert sum(k in entry for k in ("json", "form", "body")) <= 1, entry["id"]
        assert entry["where"].split(" ", 1)[0] in {"GET", "POST", "PUT", "DELETE", "OPTIONS"}
        accepted = entry["expect"]["status"] < 400
        assert accepted or "mail" not in entry, entry["id"]
        parts = [entry.get(k) for k in ("json", "form", "body", "headers", "mail")]
        refs = set(_WORD_REF.findall(json.dumps(parts)))
        assert refs <= set(entry.get("words", {})), entry["id"]
