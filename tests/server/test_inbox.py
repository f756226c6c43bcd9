"""The dev inbox over a real capture folder: mail sent through the real capture server with
smtplib, read back through the inbox's JSON API and pages."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from emailq.devtools.capture import BoundController, CaptureHandler
from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import ADMIN, API_KEYS, assert_error, bearer, local_client

INBOX = "/dev/inbox"
API = "/dev/inbox/api"


@pytest.fixture
def mail_dir(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def capture_port(mail_dir: Path) -> Iterator[int]:
    controller = BoundController(CaptureHandler(mail_dir), hostname="127.0.0.1", port=0)
    controller.start()
    yield controller.port
    controller.stop()


@pytest.fixture
def inbox_settings(make_settings: Callable[..., Settings], mail_dir: Path) -> Settings:
    return make_settings(dev_pages=True, dev_inbox_dir=mail_dir)


@pytest.fixture
def client(inbox_settings: Settings) -> Iterator[TestClient]:
    with local_client(create_app(inbox_settings)) as test_client:
        yield test_client


def deliver(
    port: int, subject: str, *, to: str = "user@example.com", cc: str = "",
    bcc: tuple[str, ...] = (), html: str | None = None, text: str = "hello",
) -> None:  # fmt: skip
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "emailq <noreply@example.com>", to, subject
    if cc:
        msg["Cc"] = cc
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    rcpts = [to, *([cc] if cc else []), *bcc]
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.send_message(msg, from_addr="noreply@example.com", to_addrs=rcpts)


def listing(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.get(f"{API}/messages", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_messages_are_listed_newest_first_with_bcc_from_the_envelope(
    client: TestClient, capture_port: int
) -> None:
    deliver(capture_port, "첫 번째 메일", text="one")
    deliver(capture_port, "Your code", cc="audit@example.com", bcc=("secret@example.com",),
            html="<p>Code: <b>493817</b></p>", text="Code: 493817")  # fmt: skip

    page = listing(client)

    assert page["total"] == 2
    newest, oldest = page["messages"]
    assert (newest["subject"], oldest["subject"]) == ("Your code", "첫 번째 메일")
    assert newest["from"] == "emailq <noreply@example.com>"
    assert (newest["to"], newest["cc"], newest["bcc"]) == (
        ["user@example.com"], ["audit@example.com"], ["secret@example.com"])  # fmt: skip
    assert newest["envelope_to"] == ["user@example.com", "audit@example.com", "secret@example.com"]
    assert (newest["has_html"], oldest["has_html"]) == (True, False)
    assert oldest["bcc"] == []

    full = client.get(f"{API}/messages/{newest['id']}").json()
    assert full["html"].strip() == "<p>Code: <b>493817</b></p>"
    assert full["text"].strip() == "Code: 493817"
    assert ["Subject", "Your code"] in full["headers"]
    assert client.get(f"{API}/latest").json()["id"] == newest["id"]


def test_search_matches_subject_from_and_recipients(client: TestClient, capture_port: int) -> None:
    deliver(capture_port, "Invoice 42", to="alice@example.com")
    deliver(capture_port, "Welcome", to="bob@example.org", bcc=("carol@example.net",))

    def subjects(q: str) -> list[str]:
        return [m["subject"] for m in listing(client, q=q)["messages"]]

    assert subjects("invoice") == ["Invoice 42"]
    assert subjects("BOB@") == ["Welcome"]
    assert subjects("carol") == ["Welcome"]  # a Bcc recipient, from the envelope
    assert subjects("noreply") == ["Welcome", "Invoice 42"]
    assert subjects("welcome alice") == []
    assert listing(client, q="example", limit=1)["total"] == 2


def test_the_html_part_is_served_sandboxed_and_raw_as_text(
    client: TestClient, capture_port: int
) -> None:
    html = '<p>hi</p><script>parent.document.title="owned"</script><img src="https://t.example/x">'
    deliver(capture_port, "html", html=html)
    message_id = client.get(f"{API}/latest").json()["id"]

    part = client.get(f"{API}/messages/{message_id}/html")
    assert part.status_code == 200
    assert part.text.strip() == html  # shown as sent: the browser's sandbox makes it inert
    csp = [d.strip() for d in part.headers["Content-Security-Policy"].split(";")]
    assert csp[0] == "sandbox"  # no allow-scripts, no allow-same-origin
    assert "default-src 'none'" in csp
    assert "img-src data:" in csp  # no remote image: opening a mail tells its sender nothing
    assert part.headers["X-Content-Type-Options"] == "nosniff"

    raw = client.get(f"{API}/messages/{message_id}/raw")
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.headers["Content-Security-Policy"].startswith("sandbox")
    assert "Subject: html" in raw.text


def test_the_page_has_a_strict_policy_that_allows_only_its_own_frames(client: TestClient) -> None:
    page = client.get(INBOX)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "frame-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert '<iframe id="html-frame" sandbox=""' in page.text
    assert client.get(f"{INBOX}/static/inbox.js").status_code == 200


def test_delete_one_and_all(client: TestClient, capture_port: int, mail_dir: Path) -> None:
    for n in range(3):
        deliver(capture_port, f"m{n}")
    first = listing(client)["messages"][0]["id"]

    assert client.delete(f"{API}/messages/{first}").status_code == 204
    assert [m["subject"] for m in listing(client)["messages"]] == ["m1", "m0"]
    assert not (mail_dir / f"{first}.json").exists()
    assert_error(client.delete(f"{API}/messages/{first}"), 404, "not_found")

    assert client.delete(f"{API}/messages").json() == {"deleted": 2}
    assert listing(client)["total"] == 0
    assert list(mail_dir.iterdir()) == []
    assert_error(client.get(f"{API}/latest"), 404, "not_found")


def test_mail_saved_before_sidecars_shows_no_envelope(client: TestClient, mail_dir: Path) -> None:
    mail_dir.mkdir()
    (mail_dir / "000001.eml").write_bytes(b"From: a@example.com\r\nTo: b@example.com\r\n"
                                          b"Subject: old\r\n\r\nbody\r\n")  # fmt: skip
    [old] = listing(client)["messages"]
    assert (old["id"], old["subject"], old["bcc"], old["envelope_to"]) == (
        "000001", "old", None, None)  # fmt: skip


@pytest.mark.parametrize(
    "message_id", ["..", "..%2F..%2Fetc%2Fpasswd", ".hidden", "a.b", "a" * 101, "%00"]
)
def test_ids_outside_the_folder_are_refused(client: TestClient, message_id: str) -> None:
    response = client.get(f"{API}/messages/{message_id}")
    assert response.status_code in (404, 422), response.text
    assert response.json()["error"] in ("not_found", "validation_error")


def test_a_broken_message_is_listed_not_fatal(client: TestClient, mail_dir: Path) -> None:
    mail_dir.mkdir()
    (mail_dir / "20000101T000000000000Z-0000000000000000.eml").write_bytes(
        b"Subject: =?bogus?x?zzz?=\r\nContent-Type: text/plain; charset=no-such-charset\r\n"
        b"\r\n\xff\xfe body"
    )
    [broken] = listing(client)["messages"]
    assert broken["has_text"] is False
    full = client.get(f"{API}/messages/{broken['id']}").json()
    assert full["text"] is None


def test_only_local_requests_are_served_even_with_api_keys(
    make_settings: Callable[..., Settings], mail_dir: Path
) -> None:
    settings = make_settings(dev_pages=True, dev_inbox_dir=mail_dir, api_keys=API_KEYS)
    with local_client(create_app(settings), client=("203.0.113.9", 4000)) as remote:
        for path in (INBOX, f"{API}/messages", f"{API}/latest"):
            assert_error(remote.get(path, headers=bearer(ADMIN)), 403, "forbidden")
        assert_error(remote.delete(f"{API}/messages", headers=bearer(ADMIN)), 403, "forbidden")
    with local_client(create_app(settings)) as local:
        # A page of another origin cannot delete the developer's mail (CSRF).
        answer = local.delete(f"{API}/messages", headers={"Origin": "https://evil.example"})
        assert_error(answer, 403, "forbidden")
        assert_error(local.get(INBOX, headers={"Host": "evil.example"}), 403, "forbidden")


def test_not_mounted_without_dev_pages_or_a_folder(
    make_settings: Callable[..., Settings], mail_dir: Path
) -> None:
    for settings in (make_settings(dev_pages=False, dev_inbox_dir=mail_dir),
                     make_settings(dev_pages=True)):  # fmt: skip
        with local_client(create_app(settings)) as client:
            assert_error(client.get(INBOX), 404, "not_found")
            assert_error(client.get(f"{API}/messages"), 404, "not_found")
