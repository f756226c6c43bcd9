"""A bot that fills the honeypot must not be able to tell: its answers, and what it sees when
it polls the task id it was given, are those of a real submission. Against a real Redis;
the polling over time against the real API and worker processes, the mail counted at the
SMTP server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.settings import Settings
from server.main import create_app
from tests.helpers.forms import FORM, FORMS_TOML, VISITOR, Verifier, captcha_config, tasks
from tests.helpers.polling import wait_until
from tests.helpers.processes import PATIENT_REDIS_SECONDS, Procs
from tests.helpers.smtpd import SmtpServer

RESULT = "/api/v1/email/result"
BOT = {**VISITOR, "_gotcha": "http://spam.example"}
STRANGER = ("203.0.113.9", 4000)  # a visitor on the internet, not the operator
SEND_KEY = "eq_honeypot-test-send-key"
ADMIN_KEY = "eq_honeypot-test-admin-key"


@pytest.fixture
def forms_settings(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> Callable[..., Settings]:
    def make(extra: str = "", **overrides: Any) -> Settings:
        path = tmp_path / "forms.toml"
        path.write_text(FORMS_TOML + extra)
        overrides.setdefault("rate_limit_per_form_address", "")
        # Nothing here is about the 503 bound: a loaded machine must not turn a slow Redis
        # answer into a 503 that one side of a comparison gets and the other does not.
        overrides.setdefault("redis_timeout_seconds", PATIENT_REDIS_SECONDS)
        return make_settings(forms_file=path, **overrides)

    return make


def same_shape(response: httpx.Response, task_id: str) -> tuple[int, dict[str, Any]]:
    """Status and body with what differs between any two requests (ids) blanked."""
    body = dict(response.json())
    body.pop("request_id", None)
    for name, value in body.items():
        if isinstance(value, str):
            body[name] = value.replace(task_id, "<task>")
    return response.status_code, body


def poll_both(
    http: httpx.Client | TestClient, real: str, fake: str, refused: int = 404, **params: Any
) -> None:
    """The real and the made-up id answer alike: ``refused`` (404 to a key that may not read
    the task; 403 to a remote caller while API_KEYS is unset), the same body."""
    answers = [http.get(RESULT, params={"task_id": t, **params}) for t in (real, fake)]
    assert same_shape(answers[0], real) == same_shape(answers[1], fake)
    assert answers[0].status_code == refused, answers[0].text


@pytest.mark.parametrize("wait", [0, 0.5])
def test_a_stranger_polls_a_real_and_a_honeypot_task_alike(
    forms_settings: Callable[..., Settings], store: redis.Redis, wait: float
) -> None:
    with TestClient(create_app(forms_settings()), client=STRANGER) as stranger:
        real = stranger.post(FORM, json=VISITOR)
        fake = stranger.post(FORM, json=BOT)
        assert same_shape(real, real.json()["task_id"]) == same_shape(fake, fake.json()["task_id"])
        assert real.status_code == 202
        poll_both(stranger, real.json()["task_id"], fake.json()["task_id"], 403, wait=wait)
    assert len(tasks(store)) == 1  # the bot's stored nothing


def test_a_send_key_polls_both_alike_and_an_admin_key_reads_the_real_one(
    forms_settings: Callable[..., Settings],
) -> None:
    keys = f"app:send:{hash_key(SEND_KEY)} ops:admin:{hash_key(ADMIN_KEY)}"
    with TestClient(create_app(forms_settings(api_keys=keys)), client=STRANGER) as http:
        real, fake = (http.post(FORM, json=body).json()["task_id"] for body in (VISITOR, BOT))
        http.headers["Authorization"] = f"Bearer {SEND_KEY}"
        poll_both(http, real, fake)
        http.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        assert http.get(RESULT, params={"task_id": real}).json()["to"] == "hidden"
        assert http.get(RESULT, params={"task_id": fake}).status_code == 404


@pytest.mark.parametrize(
    "headers",
    [{"Host": "rebind.evil.example"}, {"X-Forwarded-For": STRANGER[0]},
     {"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}],
    ids=["dns-rebinding-host", "untrusted-local-proxy", "cross-origin", "cross-site-fetch"],
)  # fmt: skip
@pytest.mark.parametrize("opened", [{"allowed_recipients": "@site.example"},
                                    {"allow_open_relay": True}])  # fmt: skip
def test_without_keys_only_a_local_request_reads_a_form_task(
    forms_settings: Callable[..., Settings], headers: dict[str, str], opened: dict[str, Any]
) -> None:
    # With sending opened to everyone, authentication checks nothing local; reading a form
    # task must still take the admin endpoints' whole rule, not just a loopback peer.
    app = create_app(forms_settings(**opened))
    with TestClient(app, base_url="http://localhost", client=("127.0.0.1", 4000)) as http:
        real, fake = (http.post(FORM, json=body).json()["task_id"] for body in (VISITOR, BOT))
        assert http.get(RESULT, params={"task_id": real}).status_code == 200  # the operator
        http.headers.update(headers)
        assert http.get("/api/v1/admin/stats").status_code == 403
        poll_both(http, real, fake)


@pytest.mark.parametrize(
    "bad",
    [{"email": "not an address"}, {"name": "Ada\r\nBcc: victim@evil.example"},
     {"message": "x" * 5000}, {"tags": ["a"]}, {"x" * 65: "long name"}],
    ids=["address", "crlf-subject", "too-large", "not-a-string", "long-field-name"],
)  # fmt: skip
def test_a_bad_submission_is_refused_alike_with_the_honeypot_filled(
    forms_settings: Callable[..., Settings], store: redis.Redis, bad: dict[str, Any]
) -> None:
    with TestClient(create_app(forms_settings(max_body_bytes=2048)), client=STRANGER) as http:
        real = http.post(FORM, json={**VISITOR, **bad})
        fake = http.post(FORM, json={**BOT, **bad})
    assert real.status_code in (413, 422), real.text
    assert same_shape(real, "") == same_shape(fake, "")
    assert tasks(store) == []


@pytest.fixture
def verify_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Verifier)  # port 0: server_port is the one it got
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/siteverify"
    server.shutdown()
    server.server_close()


def test_the_captcha_is_required_alike_with_the_honeypot_filled(
    forms_settings: Callable[..., Settings], store: redis.Redis, verify_url: str
) -> None:
    settings = forms_settings(captcha_config("turnstile", verify_url))
    with TestClient(create_app(settings), client=STRANGER) as http:
        for token in ({}, {"cf-turnstile-response": "forged"}):
            real = http.post(FORM, json={**VISITOR, **token})
            fake = http.post(FORM, json={**BOT, **token})
            assert real.status_code == 400, real.text
            assert same_shape(real, "") == same_shape(fake, "")
        solved = {"cf-turnstile-response": "good"}
        real = http.post(FORM, json={**VISITOR, **solved})
        fake = http.post(FORM, json={**BOT, **solved})
        assert (real.status_code, fake.status_code) == (202, 202)
    assert tasks(store) == [f"{{emailq}}:task:{real.json()['task_id']}"]


def test_polling_from_pending_to_sent_against_the_real_processes(
    procs: Procs, forms_settings: Callable[..., Settings], smtp: SmtpServer, store: redis.Redis
) -> None:
    # Behind a trusted proxy on loopback, the bot is the address the proxy names.
    settings = forms_settings(trusted_proxies="127.0.0.1")
    base = procs.api(settings)
    bot_headers = {"X-Forwarded-For": STRANGER[0]}
    with httpx.Client(base_url=base, headers=bot_headers, timeout=10) as bot:
        real = bot.post(FORM, json=VISITOR).json()["task_id"]
        fake = bot.post(FORM, json=BOT).json()["task_id"]
        poll_both(bot, real, fake, 403)  # pending: no worker yet
        poll_both(bot, real, fake, 403, wait=0.5)
        procs.worker(settings)
        wait_until(lambda: len(smtp.handler.received) == 1, what="the real mail at SMTP")
        poll_both(bot, real, fake, 403)  # sent
    with httpx.Client(base_url=base, timeout=10) as operator:  # loopback, no key: the operator
        wait_until(lambda: operator.get(RESULT, params={"task_id": real}).json()["status"]
                   == "success", what="the real task's success")  # fmt: skip
        assert operator.get(RESULT, params={"task_id": fake}).status_code == 404
    [mail] = smtp.handler.received
    assert mail.rcpt_tos == ["owner@site.example", "sales@site.example"]
    assert len(tasks(store)) == 1
