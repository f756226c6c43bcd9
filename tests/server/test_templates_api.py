"""Stored templates through the API: sending with ``template`` (single and batch), the
preview and list endpoints, their authentication, and refusals that store nothing.

Tried as an attacker would, and what each attempt got:

* a template name that is a path (``../../etc/passwd``, ``otp/../x``, ``otp%2F..``): 422
  (the name's pattern) or 404, never a file read; names are looked up among the templates
  loaded at startup.
* Jinja in a value (``{{ 7*7 }}``, ``{{ self }}``): sent as the literal text, since values
  are data, never templates.
* a CR/LF header in a value used by the subject: 422 naming ``variables.code``, nothing
  stored; HTML in a value: escaped in the HTML part.
* ``template`` together with ``subject``/``body``/``html``: 422, nothing stored.
* every sandbox escape on record as a stored template: 422 on send and preview, nothing
  stored, nothing rendered (see tests/emailq/test_templates.py for the whole list).
* preview and list without a key when API_KEYS is set: 401; from another machine without
  API_KEYS: 403, as a send.
* previews as fast as one can, to render without end: over RATE_LIMIT_PER_KEY, 429 in the
  one error shape, nothing rendered or stored; a failed render counts too. A 10 MB variable:
  413 before it is read (not counted); one that renders past MAX_BODY_BYTES: 422, counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.models import Job
from emailq.queue import Keys
from emailq.settings import Settings
from server.main import create_app
from tests.emailq.test_templates import ESCAPES
from tests.helpers.api import ALICE, API_KEYS, BOB, MAX_BODY, assert_error, bearer, local_client
from tests.helpers.templates import EXAMPLES, OTP_SUBJECT, otp_text, write_templates

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
LIST = "/api/v1/templates"
KEYS = Keys()


def preview_url(name: str) -> str:
    return f"/api/v1/templates/{name}/preview"


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    """The shipped OTP example, plus one template per sandbox escape and a greeting."""
    root = tmp_path / "templates"
    for part in ("subject.txt", "body.txt", "body.html"):
        (root / "otp").mkdir(parents=True, exist_ok=True)
        (root / "otp" / part).write_bytes((EXAMPLES / "otp" / part).read_bytes())
    escapes = {
        f"escape-{i}": {"subject": "s", "body": src} for i, src in enumerate(ESCAPES.values())
    }
    return write_templates(root, {
        **escapes,
        "greet": {"subject": "Hi {{ name }}", "body": "Hello {{ name }}",
                  "html": "<p>Hello {{ name }}</p>"},
    })  # fmt: skip


@pytest.fixture
def client(make_settings: Callable[..., Settings], templates_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(max_body_bytes=64 * 1024, templates_dir=templates_dir)
    with local_client(create_app(settings)) as test_client:
        yield test_client


def stored_job(store: redis.Redis, task_id: str) -> Job:
    return Job.model_validate_json(store.hget(KEYS.task(task_id), "job") or "")


def keys(store: redis.Redis) -> set[str]:
    return set(store.scan_iter("*"))


def otp(**fields: Any) -> dict[str, Any]:
    return {"to": "user@example.com", "template": "otp", "variables": {"code": "493817"},
            **fields}  # fmt: skip


# -- Sending -------------------------------------------------------------------------------


def test_a_send_with_a_template_stores_the_rendered_mail(
    client: TestClient, store: redis.Redis
) -> None:
    response = client.post(SEND, json=otp())
    assert response.status_code == 202, response.text
    job = stored_job(store, response.json()["task_id"])
    assert (job.subject, job.text) == (OTP_SUBJECT, otp_text("493817"))
    assert job.html is not None
    assert ">493817</span>" in job.html


def test_each_message_of_a_batch_may_name_a_template(
    client: TestClient, store: redis.Redis
) -> None:
    greet = {"to": "c@example.com", "template": "greet", "variables": {"name": "<Kim>"}}
    messages = [otp(), otp(variables={}), {"to": "b@example.com", "subject": "s", "body": "b"},
                greet]  # fmt: skip
    response = client.post(BATCH, json={"messages": messages})
    assert response.status_code == 202, response.text
    results = response.json()["results"]
    assert [r.get("status") for r in results] == ["queued", None, "queued", "queued"]
    assert results[1]["error"] == "invalid_message"
    assert results[1]["fields"][0]["loc"] == ["variables.code"]
    job = stored_job(store, results[3]["task_id"])
    assert (job.subject, job.text, job.html) == ("Hi <Kim>", "Hello <Kim>",
                                                 "<p>Hello &lt;Kim&gt;</p>")  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"variables": {}}, "variables.code"),
        ({"template": "nope"}, "template"),
        ({"subject": "Hello"}, "subject"),
        ({"body": "Hello"}, "body"),
        ({"html": "<p>"}, "html"),
        ({"template": "greet", "variables": {"name": "Kim\r\nBcc: x@evil.test"}}, "variables.name"),
    ],
    ids=["missing-variable", "unknown", "with-subject", "with-body", "with-html", "crlf-value"],
)
def test_a_refused_template_send_is_422_and_stores_nothing(
    client: TestClient, store: redis.Redis, fields: dict[str, Any], field: str
) -> None:
    before = keys(store)
    body = assert_error(client.post(SEND, json=otp(**fields)), 422, "invalid_message")
    assert body["fields"][0]["loc"] == ["body", field]
    assert keys(store) == before


@pytest.mark.parametrize("name", ["../../etc/passwd", "otp/../otp", "otp.txt", "", "a" * 65])
def test_a_template_name_is_never_a_path(client: TestClient, store: redis.Redis, name: str) -> None:
    before = keys(store)
    body = assert_error(client.post(SEND, json=otp(template=name)), 422, "validation_error")
    assert body["fields"][0]["loc"] == ["body", "template"]
    assert keys(store) == before
    assert client.post(preview_url(name), json={}).status_code in (404, 405, 422)


def test_jinja_in_a_value_is_sent_as_written(client: TestClient, store: redis.Redis) -> None:
    value = "{{ 7*7 }} {{ self }} {% for i in range(9) %}x{% endfor %}"
    response = client.post(SEND, json=otp(template="greet", variables={"name": value}))
    assert response.status_code == 202, response.text
    assert stored_job(store, response.json()["task_id"]).text == f"Hello {value}"


@pytest.mark.parametrize("index", range(len(ESCAPES)), ids=list(ESCAPES))
def test_every_sandbox_escape_is_422_on_send_and_stores_nothing(
    client: TestClient, store: redis.Redis, index: int
) -> None:
    before = keys(store)
    body = assert_error(client.post(SEND, json=otp(template=f"escape-{index}")), 422,
                        "invalid_message")  # fmt: skip
    assert body["detail"].startswith(f"template escape-{index}/body.txt")
    assert keys(store) == before


def test_no_templates_dir_refuses_a_template_send(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with local_client(create_app(make_settings(max_body_bytes=MAX_BODY))) as client:
        body = assert_error(client.post(SEND, json=otp()), 422, "invalid_message")
        assert "TEMPLATES_DIR is not set" in body["detail"]
        assert client.get(LIST).json() == {"templates": []}


# -- Preview and list ----------------------------------------------------------------------


def test_list_names_each_template_with_its_parts_and_variables(client: TestClient) -> None:
    listed = {t["name"]: t for t in client.get(LIST).json()["templates"]}
    assert listed["otp"] == {"name": "otp", "parts": ["subject", "body", "html"],
                             "variables": ["code"]}  # fmt: skip
    assert listed["greet"]["variables"] == ["name"]


def test_preview_renders_every_part_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    before = keys(store)
    response = client.post(preview_url("otp"), json={"variables": {"code": "1234"}})
    assert response.status_code == 200, response.text
    parts = response.json()["parts"]
    assert parts["subject"] == {"content": OTP_SUBJECT}
    assert parts["body"] == {"content": otp_text("1234")}
    assert ">1234</span>" in parts["html"]["content"]
    assert keys(store) == before


def test_preview_reports_each_part_error(client: TestClient) -> None:
    response = client.post(preview_url("otp"), json={"variables": {}})
    assert response.status_code == 422, response.text
    answer = response.json()
    assert {"error", "detail", "request_id", "fields", "template", "parts"} == set(answer)
    assert answer["parts"]["subject"] == {"content": OTP_SUBJECT}  # needs no variable
    body = answer["parts"]["body"]
    assert (body["field"], body["line"]) == ("variables.code", 5)
    assert "content" not in body
    assert answer["parts"]["html"]["field"] == "variables.code"
    assert answer["fields"][0]["loc"] == ["body", "variables.code"]


def test_preview_of_an_escape_renders_nothing(client: TestClient) -> None:
    response = client.post(preview_url("escape-0"), json={"variables": {"code": "1"}})
    assert response.status_code == 422
    assert "content" not in response.json()["parts"]["body"]


def test_preview_of_an_unknown_template_is_404(client: TestClient) -> None:
    assert_error(client.post(preview_url("nope"), json={}), 404, "not_found")


def test_preview_and_list_need_what_a_send_needs(
    make_settings: Callable[..., Settings], templates_dir: Path
) -> None:
    settings = make_settings(templates_dir=templates_dir, api_keys=API_KEYS)
    with local_client(create_app(settings)) as client:
        assert_error(client.get(LIST), 401, "unauthorized")
        assert_error(client.post(preview_url("otp"), json={}), 401, "unauthorized")
        assert client.get(LIST, headers=bearer(ALICE)).status_code == 200
        preview = client.post(preview_url("otp"), json={"variables": {"code": "1"}},
                              headers=bearer(ALICE))  # fmt: skip
        assert preview.status_code == 200
    # No API_KEYS: only this machine, as for sends.
    app = create_app(make_settings(templates_dir=templates_dir))
    with TestClient(app, base_url="http://localhost", client=("203.0.113.9", 5000)) as remote:
        assert_error(remote.get(LIST), 403, "forbidden")
        assert_error(remote.post(preview_url("otp"), json={}), 403, "forbidden")


def test_previews_are_rate_limited_in_a_budget_of_their_own(
    make_settings: Callable[..., Settings], templates_dir: Path, store: redis.Redis
) -> None:
    settings = make_settings(templates_dir=templates_dir, api_keys=API_KEYS,
                             rate_limit_per_key="3/minute", max_body_bytes=MAX_BODY)  # fmt: skip
    otp_code = {"variables": {"code": "1"}}
    with local_client(create_app(settings)) as client:

        def preview(key: str = ALICE, body: dict[str, Any] = otp_code) -> httpx.Response:
            return client.post(preview_url("otp"), json=body, headers=bearer(key))

        answers = [preview(), preview(body={"variables": {}}), preview()]  # 200, 422, 200
        refused = preview()
        stored = keys(store)
        others = [preview(BOB), client.post(SEND, json=otp(), headers=bearer(ALICE))]

    assert [a.status_code for a in answers] == [200, 422, 200]  # a failed render counts too
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
    body = assert_error(refused, 429, "too_many_requests")
    assert body["detail"].startswith(
        "over RATE_LIMIT_PER_KEY (3/minute) for key 'alice''s template previews; retry in "
    )
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "parts" not in body  # refused before anything was rendered
    # The previews stored nothing but their own count.
    assert stored
    assert all(k.startswith(KEYS.rate_limit_prefix) for k in stored), stored
    # Bob's previews and Alice's mail have budgets of their own.
    assert [o.status_code for o in others] == [200, 202]


def test_a_huge_preview_is_refused_before_it_is_read_or_counted(
    make_settings: Callable[..., Settings], templates_dir: Path, store: redis.Redis
) -> None:
    settings = make_settings(templates_dir=templates_dir, api_keys=API_KEYS,
                             rate_limit_per_key="1/minute", max_body_bytes=MAX_BODY)  # fmt: skip
    with local_client(create_app(settings)) as client:
        url = preview_url("greet")
        huge = client.post(url, json={"variables": {"name": "x" * 10_000_000}},
                           headers=bearer(ALICE))  # fmt: skip
        # Under the request limit, over MAX_BODY_BYTES once rendered: 422, and it counted.
        big = client.post(url, json={"variables": {"name": "x" * (2 * MAX_BODY)}},
                          headers=bearer(ALICE))  # fmt: skip
        then = client.post(url, json={"variables": {"name": "Kim"}}, headers=bearer(ALICE))

    assert_error(huge, 413, "payload_too_large")
    assert big.status_code == 422, big.text
    assert_error(then, 429, "too_many_requests")
    assert not [k for k in keys(store) if ":task:" in k]


def test_the_api_serves_the_example_as_make_dev_does(
    make_settings: Callable[..., Settings],
) -> None:
    with local_client(create_app(make_settings(templates_dir=EXAMPLES))) as client:
        response = client.post(preview_url("otp"), json={"variables": {"code": "5198"}})
    assert response.status_code == 200
    assert response.json()["parts"]["body"]["content"] == otp_text("5198")


def test_the_openapi_names_the_template_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/templates", "/api/v1/templates/{name}/preview"} <= set(paths)
