"""JSON bodies the decoder gives up on (nested far past its recursion limit, a number too
long to read, bytes that are not UTF-8): 422 in the one error shape, nothing stored, on
every route that takes a JSON body, in-process and in the real process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import assert_error, local_client
from tests.helpers.processes import Procs

DEPTH = 50_000
ARRAY = "[" * DEPTH + "]" * DEPTH
OBJECT = '{"a":' * DEPTH + "1" + "}" * DEPTH
MESSAGE = '"to": "user@example.com", "subject": "Hi", "body": "Hello"'
FORMS_TOML = """
[[forms]]
id = "contact"
to = ["owner@site.example"]
subject = "Contact from {name}"
redirect = "https://site.example/thanks"
"""

# (name, path, body): the whole body deep, or one field of an otherwise valid body.
CASES = [
    ("form array", "/api/v1/forms/contact", ARRAY),
    ("form object", "/api/v1/forms/contact", OBJECT),
    ("form field", "/api/v1/forms/contact", '{"name": "Ada", "message": ' + ARRAY + "}"),
    ("send", "/api/v1/email/received", OBJECT),
    ("send field", "/api/v1/email/received", "{" + MESSAGE + ', "variables": ' + OBJECT + "}"),
    ("batch", "/api/v1/emails/batch", '{"messages": [' + ARRAY + "]}"),
    (
        "batch field",
        "/api/v1/emails/batch",
        '{"messages": [{' + MESSAGE + ', "x": ' + OBJECT + "}]}",
    ),
    ("requeue", "/api/v1/admin/failed/requeue", '{"task_ids": ' + ARRAY + "}"),
]


@pytest.fixture
def settings_with_form(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    forms_file = tmp_path / "forms.toml"
    forms_file.write_text(FORMS_TOML)
    return make_settings(forms_file=forms_file, rate_limit_per_form_address="")


@pytest.fixture
def app_client(settings_with_form: Settings) -> Iterator[TestClient]:
    # Loopback, so the admin route is reached as its operator would reach it.
    app = create_app(settings_with_form)
    with local_client(app) as test_client:
        yield test_client


def assert_too_deep(response: httpx.Response) -> None:
    body = assert_error(response, 422, "validation_error")
    assert body["detail"] == "the JSON body is nested too deeply"
    assert body["fields"] == [{"loc": ["body"], "msg": body["detail"], "type": "json_too_deep"}]


@pytest.mark.parametrize(("name", "path", "body"), CASES, ids=[c[0] for c in CASES])
def test_deeply_nested_json_is_422_and_stores_nothing(
    app_client: TestClient, store: redis.Redis, name: str, path: str, body: str
) -> None:
    before = set(store.keys("*"))
    response = app_client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_too_deep(response)
    assert set(store.keys("*")) == before


UNDECODABLE = [
    ("send", "/api/v1/email/received", b'{"to": ' + b"1" * 5000 + b"}", "could not be decoded"),
    ("batch", "/api/v1/emails/batch", b'{"messages": [' + b"9" * 5000 + b"]}", "could not be"),
    ("send", "/api/v1/email/received", b'{"to": "\xff\xfe@example.com"}', "not valid UTF-8"),
    ("batch", "/api/v1/emails/batch", b'{"messages": ["\xc3"]}', "not valid UTF-8"),
    # A syntax error: it read "35: JSON decode error", as if a field named 35 were wrong.
    ("send", "/api/v1/email/received", b'{"to": "a@example.com", "subject": }',
     "the body is not valid JSON (at character 35)"),
    ("batch", "/api/v1/emails/batch", b'{"messages": [', "the body is not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body", "detail"), UNDECODABLE,
                         ids=[f"{c[0]}-{c[3]}" for c in UNDECODABLE])  # fmt: skip
def test_a_json_body_the_decoder_refuses_is_422_and_stores_nothing(
    app_client: TestClient, store: redis.Redis, name: str, path: str, body: bytes, detail: str
) -> None:
    before = set(store.keys("*"))
    response = app_client.post(path, content=body, headers={"Content-Type": "application/json"})
    answer = assert_error(response, 422, "validation_error")
    assert detail in answer["detail"]
    assert answer["fields"][0]["type"] == "json_invalid"
    assert set(store.keys("*")) == before


def test_deeply_nested_urlencoded_field_name_is_refused(
    app_client: TestClient, store: redis.Redis
) -> None:
    # Urlencoded bodies do not nest: a bracketed name is one long name, refused as such.
    body = "a" + "[b]" * DEPTH + "=1&name=Ada&message=Hi"
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    response = app_client.post("/api/v1/forms/contact", content=body, headers=urlencoded)
    assert_error(response, 422, "invalid_message")
    assert store.dbsize() == 0


def test_deeply_nested_json_against_the_real_api_process(
    procs: Procs, settings_with_form: Settings, store: redis.Redis
) -> None:
    # The real process has its own stack depth (uvicorn, asyncio): it must answer the same.
    base = procs.api(settings_with_form)
    before = set(store.keys("*"))
    with httpx.Client(base_url=base, timeout=30) as http:
        for _name, path, body in CASES:
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert_too_deep(response)
        # Still serving, and still accepting a normal submission afterwards.
        ok = http.post("/api/v1/forms/contact", json={"name": "Ada", "message": "Hi"})
        assert ok.status_code == 202, ok.text
    assert len(set(store.keys("*")) - before) > 0  # the normal one was stored
