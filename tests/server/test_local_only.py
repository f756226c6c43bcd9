"""Zero configuration (no API_KEYS) serves local requests only, in-process.

Local means: a loopback client (as TRUSTED_PROXIES decides it), a ``Host`` naming this
machine, and no page of another origin behind it. The real-process side is
tests/e2e/test_zero_config.py. Tried as an attacker would: a remote peer; a DNS-rebinding
page (its own name in Host, or its Origin); look-alike hosts (``localhost.evil.example``,
``127.0.0.1.evil.example``); ``Origin: null``; a cross-site ``Sec-Fetch-Site`` without an
Origin; a local reverse proxy that is not in TRUSTED_PROXIES; guessing another caller's
Idempotency-Key to learn its task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.queue import Keys
from emailq.settings import Settings
from server.auth import is_local_host
from server.main import create_app
from tests.helpers.api import assert_error, local_client, mail

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
STATS = "/api/v1/admin/stats"
KEYS = Keys()


def stored(store: redis.Redis) -> list[str]:
    return [str(k) for k in store.scan_iter(KEYS.task("*"))]


def calls(client: TestClient, **headers: str) -> list[Any]:
    """A send, a batch and an admin call, with ``headers``."""
    return [client.post(SEND, json=mail(), headers=headers),
            client.post(BATCH, json={"messages": [mail()]}, headers=headers),
            client.get(STATS, headers=headers)]  # fmt: skip


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST", "localhost:8000", "localhost.:8000", "127.0.0.1:8000",
     "127.0.0.2", "[::1]", "[::1]:8000", "app.localhost:3000"],
)  # fmt: skip
def test_local_host_names(host: str) -> None:
    assert is_local_host(host)


@pytest.mark.parametrize(
    "host",
    ["", "evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.evil.example",
     "0.0.0.0:8000", "[::1", "::1", "localhost:8000:9", "10.0.0.1", "localhost:99999x",
     "local host", "evil.example/.localhost", "evil.example@localhost", "localhost\tx"],
)  # fmt: skip
def test_other_host_names(host: str) -> None:
    assert not is_local_host(host)


@pytest.mark.parametrize("peer", ["203.0.113.9", "10.0.0.7", "::ffff:192.168.1.2", "testclient"])
def test_a_remote_client_may_neither_send_nor_administer(
    make_settings: Callable[..., Settings], store: redis.Redis, peer: str
) -> None:
    with local_client(create_app(make_settings()), client=(peer, 1)) as client:
        for answer in calls(client):
            assert "API_KEYS" in assert_error(answer, 403, "forbidden")["detail"]
    assert stored(store) == []


@pytest.mark.parametrize("host", ["evil.example:8000", "localhost.evil.example", "0.0.0.0:8000"])
def test_a_rebinding_host_is_refused(
    make_settings: Callable[..., Settings], store: redis.Redis, host: str
) -> None:
    with local_client(create_app(make_settings())) as client:
        for answer in calls(client, Host=host):
            assert "Host" in assert_error(answer, 403, "forbidden")["detail"]
    assert stored(store) == []


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"},
     {"Origin": "http://localhost:3000"},  # another local port is another origin
     {"Origin": "https://localhost"},  # another scheme too
     {"Origin": "http://localhost:8000@evil.example"},
     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}],
)  # fmt: skip
def test_cross_origin_requests_are_refused(
    make_settings: Callable[..., Settings], store: redis.Redis, headers: dict[str, str]
) -> None:
    with local_client(create_app(make_settings())) as client:
        for answer in calls(client, **headers):
            assert "cross-origin" in assert_error(answer, 403, "forbidden")["detail"]
    assert stored(store) == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "http://localhost"}, {"Origin": "http://localhost:80"},
     {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
     {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},
     {"Origin": "http://app.example"}],  # listed in CORS_ORIGINS by the operator
)  # fmt: skip
def test_local_requests_are_served(
    make_settings: Callable[..., Settings], headers: dict[str, str]
) -> None:
    app = create_app(make_settings(cors_origins="http://app.example"))
    with local_client(app) as client:
        assert [a.status_code for a in calls(client, **headers)] == [202, 202, 200]


def test_a_local_proxy_not_in_trusted_proxies_makes_nobody_local(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with local_client(create_app(make_settings())) as client:
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            for answer in calls(client, **{header: "for=198.51.100.1"}):
                detail = assert_error(answer, 403, "forbidden")["detail"]
                assert detail == ("the request came through a proxy that is not in "
                                  "TRUSTED_PROXIES (list it there); configure API_KEYS to "
                                  "call it from elsewhere")  # said once, not twice  # fmt: skip
    assert stored(store) == []


@pytest.mark.parametrize(
    "extra", [{"allow_open_relay": True}, {"allowed_recipients": "@example.com"}]
)
def test_an_allow_list_or_the_opt_out_lets_anyone_send_but_not_administer(
    make_settings: Callable[..., Settings], extra: dict[str, Any]
) -> None:
    with TestClient(create_app(make_settings(**extra)), client=("203.0.113.9", 1)) as remote:
        send, batch, admin = calls(remote)
        assert (send.status_code, batch.status_code) == (202, 202)
        assert_error(admin, 403, "forbidden")


def test_idempotency_keys_are_per_client_and_a_conflict_names_no_task(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    app = create_app(make_settings(allow_open_relay=True))
    key = {"Idempotency-Key": "order-1"}
    with TestClient(app, client=("203.0.113.1", 1)) as alice:
        mine = alice.post(SEND, json=mail(to="alice@example.com"), headers=key).json()["task_id"]
        batch = alice.post(BATCH, json={"messages": [mail()]}, headers=key).json()
    with TestClient(app, client=("203.0.113.2", 1)) as mallory:
        # The same key from someone else is their own key: a new task, not alice's.
        theirs = mallory.post(SEND, json=mail(to="m@example.com"), headers=key)
        assert theirs.status_code == 202
        assert theirs.json()["task_id"] != mine
        assert "Idempotent-Replayed" not in theirs.headers
        other_batch = mallory.post(BATCH, json={"messages": [mail(to="m@example.com")]},
                                   headers=key)  # fmt: skip
        assert other_batch.json()["results"][0]["task_id"] != batch["results"][0]["task_id"]
    with TestClient(app, client=("203.0.113.1", 1)) as alice:
        conflict = alice.post(SEND, json=mail(to="x@example.com"), headers=key)
        assert_error(conflict, 409, "idempotency_conflict")
        assert mine not in conflict.text
        batch_conflict = alice.post(BATCH, json={"messages": [mail(to="x@example.com")]},
                                    headers=key)  # fmt: skip
        assert_error(batch_conflict, 409, "idempotency_conflict")
        assert batch["results"][0]["task_id"] not in batch_conflict.text
    assert len(stored(store)) == 4  # alice's two and mallory's two; no conflict stored any
