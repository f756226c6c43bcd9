"""The API's answers when mail would not fit: a sender's byte quota, the total, a full Redis.

Tried as an attacker would, and what each attempt got (real Redis, nothing mocked):

* one client address (no API_KEYS) sending until its quota is full: 429 ``quota_exceeded``
  naming MAX_STORED_BYTES_PER_KEY; nothing stored; another key, or a contact form, still
  sends (each has its own budget).
* a batch whose messages fit one by one but not together: 429, and none of them stored.
* one request larger than the whole quota: 413 ``payload_too_large`` (waiting cannot help).
* every sender together over MAX_STORED_BYTES: 507 ``storage_full``.
* Redis at maxmemory (filled by another client): 507 ``storage_full`` JSON, never 500;
  results and /ready still answer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.devtools.redis_server import RedisServer
from emailq.queue import Keys
from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import assert_error, local_client
from tests.helpers.queues import fill_until_full

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
KEYS = Keys()
BODY = "x" * 1_900  # a job of about 2 KB; MAX_BODY_BYTES is 2048 in these tests
QUOTA = 5_000  # two such mails fit, a third does not

ALICE = "eq_alice-test-key-0123456789"  # test keys, not credentials
BOB = "eq_bob-test-key-0123456789"
API_KEYS = f"alice:send:{hash_key(ALICE)} bob:send:{hash_key(BOB)}"


def mail(n: int = 0, **fields: Any) -> dict[str, Any]:
    return {"to": f"user{n}@example.com", "subject": f"mail {n}", "body": BODY, **fields}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tasks(store: redis.Redis) -> set[str]:
    return {str(k) for k in store.keys(KEYS.task_prefix + "*")}


def stored(store: redis.Redis) -> dict[str, str]:
    return {str(k): str(v) for k, v in store.hgetall(KEYS.stored).items()}


def app(make_settings: Callable[..., Settings], **overrides: Any) -> TestClient:
    overrides.setdefault("max_body_bytes", 2048)
    return local_client(create_app(make_settings(**overrides)))


def test_a_client_over_its_quota_gets_429_and_stores_nothing(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with app(make_settings, max_stored_bytes_per_key=QUOTA) as client:
        for n in range(2):
            assert client.post(SEND, json=mail(n)).status_code == 202
        before, counters = tasks(store), stored(store)
        body = assert_error(client.post(SEND, json=mail(2)), 429, "quota_exceeded")
        assert "MAX_STORED_BYTES_PER_KEY" in body["detail"]
        assert (tasks(store), stored(store)) == (before, counters)
        assert set(counters) == {"total", "address:127.0.0.1"}


def test_each_key_has_its_own_quota(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with app(make_settings, max_stored_bytes_per_key=QUOTA, api_keys=API_KEYS) as client:
        for n in range(2):
            assert client.post(SEND, json=mail(n), headers=bearer(ALICE)).status_code == 202
        assert_error(client.post(SEND, json=mail(2), headers=bearer(ALICE)), 429,
                     "quota_exceeded")  # fmt: skip
        assert client.post(SEND, json=mail(3), headers=bearer(BOB)).status_code == 202
        assert set(stored(store)) == {"total", "key:alice", "key:bob"}


def test_a_batch_that_would_cross_the_quota_stores_none_of_it(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with app(make_settings, max_stored_bytes_per_key=QUOTA) as client:
        assert client.post(SEND, json=mail(0)).status_code == 202
        before, counters = tasks(store), stored(store)
        batch = {"messages": [mail(1), mail(2)]}  # each fits alone; together they do not
        response = client.post(BATCH, json=batch, headers={"Idempotency-Key": "b-1"})
        assert_error(response, 429, "quota_exceeded")
        assert (tasks(store), stored(store)) == (before, counters)
        assert not store.keys(KEYS.base + ":idem:*#*")  # no message's key is used up


def test_a_request_larger_than_the_whole_quota_is_413(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with app(make_settings, max_stored_bytes_per_key=1_500) as client:
        body = assert_error(client.post(SEND, json=mail()), 413, "payload_too_large")
        assert "MAX_STORED_BYTES_PER_KEY" in body["detail"]
        assert not tasks(store)


def test_the_total_budget_is_507_for_everyone(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with app(make_settings, max_stored_bytes=QUOTA, api_keys=API_KEYS) as client:
        for n, key in enumerate((ALICE, BOB)):
            assert client.post(SEND, json=mail(n), headers=bearer(key)).status_code == 202
        before = tasks(store)
        for key in (ALICE, BOB):
            body = assert_error(client.post(SEND, json=mail(), headers=bearer(key)), 507,
                                "storage_full")  # fmt: skip
            assert "MAX_STORED_BYTES" in body["detail"]
        assert tasks(store) == before


def test_a_contact_form_has_its_own_quota(
    make_settings: Callable[..., Settings], store: redis.Redis, tmp_path: Path
) -> None:
    forms = tmp_path / "forms.toml"
    forms.write_text('[[forms]]\nid = "contact"\nto = ["owner@site.example"]\n'
                     'subject = "Contact"\nredirect = "/thanks"\n')  # fmt: skip
    with app(make_settings, max_stored_bytes_per_key=QUOTA, forms_file=forms,
             rate_limit_per_form_address="") as client:  # fmt: skip
        answers = [client.post("/api/v1/forms/contact", headers={"Accept": "application/json"},
                               json={"name": f"visitor {n}", "message": "y" * 700}).status_code
                   for n in range(3)]  # fmt: skip
        assert answers == [202, 202, 429]
        # The form's budget is not the caller's: the same address still sends.
        assert client.post(SEND, json=mail()).status_code == 202
        assert set(stored(store)) == {"total", "form:contact", "address:127.0.0.1"}


@pytest.mark.parametrize("rate_limit", ["", "1000/minute"], ids=["enqueue", "rate-limiter"])
def test_a_full_redis_is_507_json_and_reads_still_work(
    make_settings: Callable[..., Settings], redis_factory: Callable[..., RedisServer],
    rate_limit: str,
) -> None:  # fmt: skip
    server = redis_factory(maxmemory=8 * 1024 * 1024)
    # No headroom: Redis itself must refuse, and its OOM error must not become a 500,
    # whichever write meets it first (the rate limiter's, when it is on, or the enqueue).
    with app(make_settings, redis_url=server.url, redis_memory_headroom=0,
             rate_limit_per_key=rate_limit) as client:  # fmt: skip
        accepted = client.post(SEND, json=mail())
        assert accepted.status_code == 202
        fill_until_full(server.url)
        body = assert_error(client.post(SEND, json=mail(1)), 507, "storage_full")
        assert "maxmemory" in body["detail"]
        batch = client.post(BATCH, json={"messages": [mail(2)]})
        assert_error(batch, 507, "storage_full")
        task_id = accepted.json()["task_id"]
        result = client.get("/api/v1/email/result", params={"task_id": task_id})
        assert result.status_code == 200
        assert client.get("/ready").status_code == 200
