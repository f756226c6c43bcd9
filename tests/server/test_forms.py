"""Contact forms, attacked as a stranger on the internet would: through the API and Redis."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.forms import FormsConfigError, load_forms
from emailq.message import build_message
from emailq.models import Attempt, Job
from emailq.queue import Queue
from emailq.settings import Settings
from server.deps import state_of
from server.main import create_app
from tests.helpers.api import local_client
from tests.helpers.forms import (
    FORM,
    FORMS_TOML,
    SITE,
    THANKS,
    VISITOR,
    Verifier,
    captcha_config,
    tasks,
)
from tests.helpers.ports import port_of, refused_port

BROWSER = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def verify_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Verifier)  # port 0: server_port is the one it got
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/siteverify"
    server.shutdown()
    server.server_close()


@pytest.fixture
def forms_app(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., TestClient]:
    def make(extra: str = "", **overrides: Any) -> TestClient:
        path = tmp_path / "forms.toml"
        path.write_text(FORMS_TOML + extra)
        overrides.setdefault("rate_limit_per_form_address", "")
        overrides.setdefault("max_body_bytes", 2048)
        # Local, so that it may also read results, which zero-config serves locally only.
        return local_client(create_app(make_settings(forms_file=path, **overrides)))

    return make


@pytest.fixture
def client(forms_app: Callable[..., TestClient]) -> Iterator[TestClient]:
    with forms_app() as test_client:
        yield test_client


def stored_job(store: redis.Redis, task_id: str) -> Job:
    return Job.model_validate_json(str(store.hget(f"{{emailq}}:task:{task_id}", "job")))


def test_plain_form_post_redirects_to_the_thank_you_page(
    client: TestClient, store: redis.Redis
) -> None:
    response = client.post(FORM, data=VISITOR, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["Location"] == THANKS
    [key] = tasks(store)
    job = stored_job(store, key.rsplit(":", 1)[1])
    assert job.to == "owner@site.example"
    assert job.cc == ["sales@site.example"]
    assert job.reply_to == "ada@visitor.example"
    assert job.subject == "Contact from Ada"
    assert "message:" not in job.subject
    assert "Hello there" in job.text
    message = build_message("t", job, "emailq <noreply@example.com>")
    assert message["From"] == "emailq <noreply@example.com>"
    assert message["Reply-To"] == "ada@visitor.example"


def test_json_client_gets_a_task_id(client: TestClient) -> None:
    response = client.post(FORM, json=VISITOR)
    assert response.status_code == 202
    assert response.json() == {"task_id": response.json()["task_id"], "status": "queued"}
    accept_json = client.post(FORM, data={**VISITOR, "name": "B"},
                              headers={"Accept": "application/json"})  # fmt: skip
    assert accept_json.status_code == 202
    assert accept_json.json()["status"] == "queued"


def test_unknown_form_is_404_json(client: TestClient) -> None:
    response = client.post("/api/v1/forms/nope", data=VISITOR)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("field", ["name", "email", "message", "subject", "to", "x"])
def test_header_injection_through_any_field_injects_nothing(
    client: TestClient, store: redis.Redis, field: str
) -> None:
    evil = "Ada\r\nBcc: victim@evil.example\r\nX-Evil: 1"
    response = client.post(FORM, json={**VISITOR, field: evil})
    if response.status_code == 202:  # accepted: the value stayed in the body only
        job = stored_job(store, response.json()["task_id"])
        message = build_message("t", job, "emailq <noreply@example.com>")
        assert "Bcc" not in message
        assert "X-Evil" not in message
        assert job.recipients == ["owner@site.example", "sales@site.example"]
        assert "\r" not in job.subject
        assert "\n" not in job.subject
    else:  # name reaches the subject, email the Reply-To: both refused
        assert field in ("name", "email")
        assert response.status_code == 422
        assert tasks(store) == []


def test_template_injection_stays_literal(client: TestClient, store: redis.Redis) -> None:
    name = "{email.__class__} {0} {message} {__init__.__globals__}"
    response = client.post(FORM, json={**VISITOR, "name": name, "message": "{name}"})
    job = stored_job(store, response.json()["task_id"])
    # Values are substituted once into the subject and never rendered themselves.
    assert job.subject == f"Contact from {name}"
    assert "name: " + name in job.text
    assert "message: {name}" in job.text


def test_html_body_escapes_every_value(client: TestClient, store: redis.Redis) -> None:
    evil = '<script>alert(1)</script>"'
    response = client.post(FORM, json={**VISITOR, "message": evil, "<i>": "x"})
    job = stored_job(store, response.json()["task_id"])
    assert job.html is not None
    assert "<script>" not in job.html
    assert "<i>" not in job.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in job.html


def test_forged_origin_gets_no_cors_and_bypasses_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    refused = client.options(FORM, headers=preflight)
    assert "Access-Control-Allow-Origin" not in refused.headers
    allowed = client.options(FORM, headers={**preflight, "Origin": SITE})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == SITE
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]

    forged = client.post(FORM, json={**VISITOR, "to": "victim@evil.example"},
                         headers={"Origin": "https://evil.example"})  # fmt: skip
    assert forged.status_code == 202  # processed as any other: Origin is not authentication
    assert "Access-Control-Allow-Origin" not in forged.headers
    job = stored_job(store, forged.json()["task_id"])
    assert "victim@evil.example" not in job.recipients
    real = client.post(FORM, json={**VISITOR, "name": "B"}, headers={"Origin": SITE})
    assert real.headers["Access-Control-Allow-Origin"] == SITE


def test_error_answers_carry_cors_for_the_allowed_origin_only(client: TestClient) -> None:
    # The page's fetch() must be able to read why a submission was refused.
    header_split = {**VISITOR, "name": "Ada\r\nBcc: x@evil.example"}
    refused = client.post(FORM, json=header_split, headers={"Origin": SITE})
    assert refused.status_code == 422
    assert refused.headers["Access-Control-Allow-Origin"] == SITE
    assert refused.headers["Vary"] == "Origin"
    assert refused.json()["error"] == "invalid_message"
    not_an_object = client.post(FORM, content=b"[1]", headers={"Origin": SITE,
                                "Content-Type": "application/json"})  # fmt: skip
    assert not_an_object.status_code == 422
    assert not_an_object.headers["Access-Control-Allow-Origin"] == SITE
    forged = client.post(FORM, json=header_split, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 422
    assert "Access-Control-Allow-Origin" not in forged.headers
    # Other endpoints' errors are unaffected.
    other = client.post("/api/v1/email/received", json={}, headers={"Origin": SITE})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_open_redirect_attempts_get_the_configured_page(client: TestClient) -> None:
    for name, value in [("_next", "https://evil.example"), ("redirect", "//evil.example"),
                        ("_next", THANKS + ".evil.example")]:  # fmt: skip
        response = client.post(FORM, data={**VISITOR, name: value, "message": value},
                               follow_redirects=False)  # fmt: skip
        assert response.status_code == 303
        assert response.headers["Location"] == THANKS


def test_honeypot_looks_accepted_and_stores_nothing(client: TestClient, store: redis.Redis) -> None:
    bot = {**VISITOR, "_gotcha": "http://spam.example"}
    as_json = client.post(FORM, json=bot)
    assert as_json.status_code == 202
    assert set(as_json.json()) == {"task_id", "status"}
    assert as_json.json()["status"] == "queued"
    plain = client.post(FORM, data=bot, follow_redirects=False)
    assert plain.status_code == 303
    assert plain.headers["Location"] == THANKS
    assert store.keys("*") == []


def test_duplicate_submission_gets_the_same_task(client: TestClient, store: redis.Redis) -> None:
    first = client.post(FORM, json=VISITOR).json()["task_id"]
    again = client.post(FORM, json=VISITOR).json()["task_id"]
    assert again == first
    other = client.post(FORM, json={**VISITOR, "message": "Something else"}).json()["task_id"]
    assert other != first
    assert len(tasks(store)) == 2


def test_a_field_the_subject_names_but_the_page_did_not_send_is_empty_there(
    client: TestClient, store: redis.Redis
) -> None:
    # It arrived as "... from {name}": the placeholder itself, in the owner's inbox.
    without_name = {k: v for k, v in VISITOR.items() if k != "name"}
    response = client.post(FORM, json=without_name)
    assert response.status_code == 202, response.text
    subject = stored_job(store, response.json()["task_id"]).subject
    assert "{" not in subject
    assert subject == "Contact from "  # FORMS_TOML: "Contact from {name}"


def test_the_same_message_with_other_line_breaks_is_the_same_submission(
    client: TestClient, store: redis.Redis
) -> None:
    # The mail lays every line break out as LF, so these are one mail: sent again from
    # another browser or OS, it is the duplicate it reads as.
    ids = {client.post(FORM, json={**VISITOR, "message": f"dup{brk}test"}).json()["task_id"]
           for brk in ("\r\n", "\n", "\r", "\u2028")}  # fmt: skip
    assert len(ids) == 1
    assert len(tasks(store)) == 1


def test_a_lone_surrogate_in_a_field_is_422_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    for field in ("message", "name"):  # the body, and the subject through {name}
        raw = json.dumps({**VISITOR, field: "bad \udfff"}).encode()
        response = client.post(FORM, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_message"
    assert tasks(store) == []


@contextmanager
def local_operator(client: TestClient) -> Iterator[TestClient]:
    """The same API, reached from loopback: whoever may read form tasks while API_KEYS is
    unset (tests/server/test_honeypot.py checks that nobody else can)."""
    with local_client(create_app(state_of(client.app).settings)) as local:
        yield local


def test_form_task_result_hides_recipients_and_body(client: TestClient) -> None:
    task_id = client.post(FORM, json=VISITOR).json()["task_id"]
    with local_operator(client) as operator:
        result = operator.get("/api/v1/email/result", params={"task_id": task_id})
    assert result.status_code == 200
    assert result.json()["to"] == "hidden"
    text = result.text
    assert "site.example" not in text
    assert "Hello there" not in text
    assert "ada@" not in text


def test_form_task_result_hides_addresses_in_smtp_replies(
    client: TestClient, redis_url: str
) -> None:
    task_id = client.post(FORM, json=VISITOR).json()["task_id"]
    rejected = "5.1.1 <owner@site.example>: Recipient address rejected"

    async def fail_as_a_worker_would() -> None:
        queue = Queue.from_url(redis_url, timeout=2)
        try:
            [claimed] = (await queue.claim("w1", 1, 60_000)).jobs
            entry = Attempt(attempt=1, outcome="failed", code=550, reply=rejected)
            reason = f"permanent error after 1 attempt(s): {rejected}"
            await queue.finish(claimed, "failed", entry, reason=reason)
        finally:
            await queue.close()

    asyncio.run(fail_as_a_worker_would())
    with local_operator(client) as operator:
        result = operator.get("/api/v1/email/result", params={"task_id": task_id}).json()
    assert result["status"] == "failed"
    assert "@" not in json.dumps(result)
    assert result["reason"] == "permanent error after 1 attempt(s): 5.1.1 <hidden>: Recipient " \
                               "address rejected"  # fmt: skip
    [attempt] = result["attempt_log"]
    assert attempt["code"] == 550
    assert attempt["reply"] == "5.1.1 <hidden>: Recipient address rejected"


def test_captcha_is_verified_server_side(
    forms_app: Callable[..., TestClient], store: redis.Redis, verify_url: str
) -> None:
    with forms_app(captcha_config("turnstile", verify_url)) as client:
        missing = client.post(FORM, json=VISITOR)
        wrong = client.post(FORM, json={**VISITOR, "cf-turnstile-response": "forged"})
        assert (missing.status_code, wrong.status_code) == (400, 400)
        assert tasks(store) == []
        good = client.post(FORM, json={**VISITOR, "cf-turnstile-response": "good"})
        assert good.status_code == 202
        job = stored_job(store, good.json()["task_id"])
        assert "good" not in job.text  # the token is not part of the mail
    assert Verifier.seen[-1]["secret"] == ["s3cret"]


def test_captcha_verifier_down_sends_nothing(
    forms_app: Callable[..., TestClient], store: redis.Redis
) -> None:
    with refused_port() as nothing_listens:
        down = f"http://127.0.0.1:{port_of(nothing_listens)}/siteverify"
        with forms_app(captcha_config("hcaptcha", down)) as client:
            response = client.post(FORM, json={**VISITOR, "h-captcha-response": "good"})
    assert response.status_code == 400
    assert tasks(store) == []


def test_size_and_shape_limits(client: TestClient, store: redis.Redis) -> None:
    assert client.post(FORM, json={**VISITOR, "message": "x" * 5000}).status_code == 413
    assert client.post(FORM, json={**VISITOR, "tags": ["a"]}).status_code == 422
    assert client.post(FORM, json={**VISITOR, "email": "not an address"}).status_code == 422
    plain_text = {"Content-Type": "text/plain"}
    assert client.post(FORM, content=b"x", headers=plain_text).status_code == 415
    assert tasks(store) == []


def test_form_submissions_are_rate_limited(forms_app: Callable[..., TestClient]) -> None:
    with forms_app(rate_limit_per_form_address="2/minute") as client:
        answers = [client.post(FORM, json={**VISITOR, "message": str(i)},
                               headers={"Origin": SITE}) for i in range(3)]  # fmt: skip
    assert [a.status_code for a in answers] == [202, 202, 429]
    # The page's script may read why and for how long (a browser hides any header not
    # exposed: fetch() read Retry-After as null).
    for answer in answers:
        exposed = answer.headers["Access-Control-Expose-Headers"].split(", ")
        assert {"Retry-After", "RateLimit-Remaining"} <= set(exposed)
    assert int(answers[-1].headers["Retry-After"]) > 0


def test_bad_forms_file_names_the_form_and_field(tmp_path: Path) -> None:
    path = tmp_path / "forms.toml"
    path.write_text(FORMS_TOML.replace(THANKS, "javascript:alert(1)"))
    with pytest.raises(FormsConfigError, match=r"'contact', field redirect"):
        load_forms(path)
    path.write_text(FORMS_TOML.replace('"owner@site.example"', '"not-an-address"'))
    with pytest.raises(FormsConfigError, match=r"'contact', field to\.0"):
        load_forms(path)
    json_path = tmp_path / "forms.json"
    json_path.write_text(json.dumps({"forms": [{"id": "a", "to": ["o@x.example"],
                                                "subject": "s", "redirect": "/ok"}]}))  # fmt: skip
    assert load_forms(json_path)["a"].redirect == "/ok"


@pytest.mark.parametrize("char", ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028",
                                  "\u2029", "\x01", "\x7f"])  # fmt: skip
def test_a_control_character_in_the_name_is_422_naming_the_field(
    client: TestClient, store: redis.Redis, char: str
) -> None:
    # {name} feeds the subject: this was a 202 and a task the worker could never build.
    response = client.post(FORM, data={**VISITOR, "name": f"Ada{char}Bcc: x@evil.test"},
                           headers={"Accept": "application/json"})  # fmt: skip
    assert response.status_code == 422, response.text
    assert response.json()["fields"][0]["loc"] == ["body", "name"]
    # The character named is the one sent (it was U+000A for every line break: the form
    # made them LF before the check).
    assert f"(found U+{ord(char):04X})" in response.json()["detail"]
    assert tasks(store) == []


@pytest.mark.parametrize("brk", ["\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_line_breaks_in_a_value_cannot_start_a_line_of_the_body(
    client: TestClient, store: redis.Redis, brk: str
) -> None:
    forged = f"Hi{brk}email: boss@evil.test{brk}name: Boss"
    response = client.post(FORM, json={**VISITOR, "message": forged})
    assert response.status_code == 202, response.text
    text = stored_job(store, response.json()["task_id"]).text
    lines = text.split("\n")
    assert [line for line in lines if line.startswith("email:")] == ["email: ada@visitor.example"]
    assert [line for line in lines if line.startswith("name:")] == ["name: Ada"]
    assert "  email: boss@evil.test" in lines
    assert text.splitlines() == lines[:-1]  # nothing else a reader could split on


def test_an_encoded_word_in_the_name_stays_literal_text(
    client: TestClient, store: redis.Redis
) -> None:
    word = "=?utf-8?b?" + base64.b64encode(b"x\r\nBcc: v@evil.test").decode() + "?="
    response = client.post(FORM, json={**VISITOR, "name": word})
    job = stored_job(store, response.json()["task_id"])
    message = email.message_from_bytes(build_message("t", job, "e <n@example.com>").as_bytes(),
                                       policy=email.policy.default)  # fmt: skip
    assert message["Subject"] == f"Contact from {word}"
    assert "Bcc" not in message


def test_an_encoded_word_in_the_email_field_is_422(client: TestClient, store: redis.Redis) -> None:
    address = "=?us-ascii?q?v=40evil.test?=@x.example"
    response = client.post(FORM, json={**VISITOR, "email": address})
    assert response.status_code == 422
    assert response.json()["fields"][0]["loc"] == ["body", "email"]
    assert tasks(store) == []
