"""The HTTP API against a real Redis: what it answers, and what it stores (or refuses to)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.devtools.redis_server import RedisServer
from emailq.queue import Keys
from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import MAX_BODY, assert_error, local_client, mail
from tests.helpers.ports import port_of, refused_port

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
KEYS = Keys()
LANE = KEYS.lane("default")


def send(client: TestClient, **fields: Any) -> httpx.Response:
    return client.post(SEND, json=mail(**fields))


def stored_job(store: redis.Redis, task_id: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(store.hget(KEYS.task(task_id), "job") or "{}")
    return job


def assert_refused(response: httpx.Response, store: redis.Redis, status: int = 422) -> None:
    """Refused in the error shape, with nothing written to Redis."""
    code = {413: "payload_too_large"}.get(status)
    body = assert_error(response, status, code or response.json()["error"])
    if status == 422:
        assert body["error"] in ("validation_error", "invalid_message")
        assert isinstance(body["fields"], list)
    assert store.dbsize() == 0


# -- accepting ---------------------------------------------------------------------------


def test_send_answers_202_after_the_task_is_stored(client: TestClient, store: redis.Redis) -> None:
    response = send(client, username="Kim")

    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert response.json() == {"task_id": task_id, "status": "queued"}
    assert uuid.UUID(task_id).version == 4
    assert "X-Process-Time" in response.headers
    task = store.hgetall(KEYS.task(task_id))
    assert task["status"] == "pending"
    assert task["to"] == "user@example.com"
    assert task["request_id"] == response.headers["X-Request-ID"]
    assert store.lrange(LANE, 0, -1) == [task_id]
    assert stored_job(store, task_id)["text"] == "Hi Kim"


def test_korean_subject_and_body_are_accepted(client: TestClient, store: redis.Redis) -> None:
    response = send(client, subject="{username}님께", body="{username}님 안녕하세요!",
                    username="홍길동")  # fmt: skip

    assert response.status_code == 202
    job = stored_job(store, response.json()["task_id"])
    assert (job["subject"], job["text"]) == ("홍길동님께", "홍길동님 안녕하세요!")


@pytest.mark.parametrize("subject", ["{username.__class__}", "{0}", "{username!r:>10}"])
def test_placeholders_beyond_plain_names_stay_literal(
    client: TestClient, store: redis.Redis, subject: str
) -> None:
    response = send(client, subject=subject, body=f"body {subject}", username="Kim")

    assert response.status_code == 202
    job = stored_job(store, response.json()["task_id"])
    assert (job["subject"], job["text"]) == (subject, f"body {subject}")


# -- polling -----------------------------------------------------------------------------


def test_result_of_a_queued_task(client: TestClient) -> None:
    sent = send(client, to="Someone@Example.com")
    task_id = sent.json()["task_id"]

    response = client.get(RESULT, params={"task_id": task_id})

    assert response.status_code == 200
    result = response.json()
    assert result["task_id"] == task_id
    assert (result["status"], result["to"], result["attempts"]) == (
        "pending", "Someone@example.com", 0,
    )  # fmt: skip
    assert datetime.fromisoformat(result["created_at"]) <= datetime.fromisoformat(
        result["updated_at"]
    )
    assert result["attempt_log"] == []
    assert result["request_id"] == sent.headers["X-Request-ID"]
    assert "X-Process-Time" in response.headers


def test_result_of_an_unknown_task_is_404(client: TestClient) -> None:
    response = client.get(RESULT, params={"task_id": str(uuid.uuid4())})
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize("params", [{"task_id": "not-a-uuid"}, {"task_id": ""}, {}])
def test_result_with_a_malformed_id_is_422(client: TestClient, params: dict[str, str]) -> None:
    body = assert_error(client.get(RESULT, params=params), 422, "validation_error")
    assert body["fields"][0]["loc"] == ["query", "task_id"]


# -- request ids -------------------------------------------------------------------------


def test_a_safe_client_request_id_is_echoed_and_stored(
    client: TestClient, store: redis.Redis
) -> None:
    response = client.post(SEND, json=mail(), headers={"X-Request-ID": "web-1:a.b_c"})

    assert response.headers["X-Request-ID"] == "web-1:a.b_c"
    assert store.hget(KEYS.task(response.json()["task_id"]), "request_id") == "web-1:a.b_c"
    error = client.get(RESULT, params={"task_id": "x"}, headers={"X-Request-ID": "web-2"})
    assert assert_error(error, 422, "validation_error")["request_id"] == "web-2"


@pytest.mark.parametrize(
    "unsafe",
    [b"has space", b"a\tb", b"x" * 129, b"<script>", b"a%0d%0aSet-Cookie:x", b"caf\xc3\xa9", b""],
)
def test_an_unsafe_client_request_id_is_replaced(client: TestClient, unsafe: bytes) -> None:
    response = client.get(RESULT, params={"task_id": "x"}, headers={"X-Request-ID": unsafe})

    body = assert_error(response, 422, "validation_error")
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])


# -- refusing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"to": "not-an-address"},
        {"to": "user@example.com\r\nBcc: evil@example.com"},
        {"cc": ["ok@example.com", "bad@@example.com"]},
        {"bcc": ["evil@example.com>, <x@example.com"]},
        {"reply_to": "nobody"},
        {"subject": "Hi\r\nBcc: evil@example.com"},
        {"subject": "Hi\nthere"},
        {"subject": "Hi\rthere"},
        {"subject": "Hi\0there"},
        {"subject": "{username}", "username": "x\r\nBcc: evil@example.com"},
        {"subject": "{name}", "variables": {"name": "x\nBcc: evil@example.com"}},
        {"body": "NUL\0inside"},
        {"cc": [f"c{i}@example.com" for i in range(51)]},
        {"cc": [f"c{i}@example.com" for i in range(25)],
         "bcc": [f"b{i}@example.com" for i in range(25)]},  # 51 with `to`
        {"priority": "urgent"},
        {"variables": {"not a name": "x"}},
    ],
)  # fmt: skip
def test_invalid_requests_are_422_and_store_nothing(
    client: TestClient, store: redis.Redis, fields: dict[str, Any]
) -> None:
    assert_refused(send(client, **fields), store)


@pytest.mark.parametrize(
    "fields",
    [
        {"body": "bad \ud800 text"},
        {"subject": "Hi \udfff"},
        {"html": "<p>\ud800</p>"},
        {"subject": "{username}", "username": "\ud83d"},
        {"to": "u\ud800@example.com"},
    ],
)
def test_lone_surrogates_are_422_and_store_nothing(
    client: TestClient, store: redis.Redis, fields: dict[str, Any]
) -> None:
    # JSON can carry a lone surrogate as an escape; Python decodes it, no mail can carry it.
    # It was a 500 from the first encode(). (httpx would refuse to encode it: send raw.)
    raw = json.dumps(mail(**fields)).encode()  # ensure_ascii: "\\ud800" on the wire
    response = client.post(SEND, content=raw, headers={"Content-Type": "application/json"})
    assert_refused(response, store)


def test_a_validation_error_names_the_field_without_echoing_input(
    client: TestClient, store: redis.Redis
) -> None:
    body = assert_error(send(client, to="secret-not-an-address"), 422, "validation_error")

    assert body["fields"][0]["loc"] == ["body", "to"]
    assert "secret-not-an-address" not in json.dumps(body)
    # Worded as the README shows it, without pydantic's "Value error, " before the reason.
    assert body["detail"] == ("to: value is not a valid email address: An email address "
                              "must have an @-sign.")  # fmt: skip
    assert body["fields"][0]["msg"] == body["detail"].removeprefix("to: ")


@pytest.mark.parametrize(
    "fields",
    [
        {"body": "x" * (MAX_BODY + 1)},
        {"body": "가" * (MAX_BODY // 3 + 1)},  # few characters, but over the limit in bytes
        {"body": "{username}" * 12, "username": "x" * 200},  # small request, large mail
        {"body": "x" * 1500, "html": "<p>" + "x" * 1500 + "</p>"},
    ],
)
def test_content_over_max_body_bytes_is_413_and_stores_nothing(
    client: TestClient, store: redis.Redis, fields: dict[str, Any]
) -> None:
    assert_refused(send(client, **fields), store, 413)


def test_a_raw_body_over_the_request_limit_is_413_and_stores_nothing(
    client: TestClient, store: redis.Redis, settings: Settings
) -> None:
    payload = json.dumps(mail(body="x" * settings.max_request_bytes)).encode()
    assert len(payload) > settings.max_request_bytes

    response = client.post(SEND, content=payload, headers={"Content-Type": "application/json"})

    assert_refused(response, store, 413)


def test_a_chunked_body_over_the_request_limit_is_413(
    client: TestClient, store: redis.Redis, settings: Settings
) -> None:
    chunks = [b'{"to": "user@example.com", "subject": "Hi", "body": "']
    chunks += [b"x" * 8192] * (settings.max_request_bytes // 8192 + 1) + [b'"}']

    response = client.post(SEND, content=iter(chunks), headers={"Content-Type": "application/json"})

    assert_refused(response, store, 413)


# -- probes and outages ------------------------------------------------------------------


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_redis_down_is_a_503_and_recovery_needs_no_restart(
    make_settings: Callable[..., Settings], redis_factory: Callable[..., RedisServer]
) -> None:
    # How quickly the 503 comes is not asserted here (a busy machine is slow at everything);
    # that it comes, in the error shape, is.
    with refused_port() as down:
        port = port_of(down)
        settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0")
        with local_client(create_app(settings)) as client:
            unknown = {"task_id": str(uuid.uuid4())}
            calls = [lambda: send(client), lambda: client.get("/ready"),
                     lambda: client.get(RESULT, params=unknown)]  # fmt: skip
            for call in calls:
                response = call()
                assert_error(response, 503, "service_unavailable")
                assert response.headers["Retry-After"] == "1"
            down.close()  # held until now, so nobody else could take the port meanwhile
            redis_factory(port=port)

            response = send(client)
            assert response.status_code == 202, response.text
            assert client.get("/ready").status_code == 200
            result = client.get(RESULT, params={"task_id": response.json()["task_id"]})
            assert result.json()["status"] == "pending"
