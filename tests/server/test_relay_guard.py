"""The open-relay guard at startup, and ALLOWED_RECIPIENTS on every send.

Tried as an attacker (or a careless deployer) would, and what each attempt got:

* starting the API with a real SMTP host and no keys or allow-list: refused, naming
  API_KEYS, ALLOWED_RECIPIENTS and ALLOW_OPEN_RELAY; ``127.0.0.2``, ``::1`` and
  ``LOCALHOST`` count as loopback, ``127.example.com`` and ``0.0.0.0`` do not.
* with ``ALLOWED_RECIPIENTS``: mailing an unlisted address in To, Cc or Bcc, a listed
  domain's subdomain, or a look-alike domain: 403 ``forbidden``, nothing stored; even an
  admin key cannot send outside the list. In a batch only those messages are rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.queue import Keys
from emailq.settings import Settings
from server.auth import OpenRelayRefused, is_loopback
from server.main import create_app
from tests.helpers.api import assert_error, mail

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
KEYS = Keys()
ADMIN = "eq_admin-relay-test-key"  # a test key, not a credential


def task_keys(store: redis.Redis) -> list[str]:
    return [str(k) for k in store.scan_iter(KEYS.task("*"))]


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.5", "0.0.0.0", "127.example.com"])
def test_refuses_to_start_as_an_open_relay(
    make_settings: Callable[..., Settings], host: str
) -> None:
    with pytest.raises(OpenRelayRefused) as refused:
        create_app(make_settings(smtp_host=host))
    message = str(refused.value)
    for name in ("API_KEYS", "ALLOWED_RECIPIENTS", "ALLOW_OPEN_RELAY=true", host):
        assert name in message


@pytest.mark.parametrize(
    "extra",
    [
        {"api_keys": f"app:send:{hash_key('k')}"},
        {"allowed_recipients": "@example.com"},
        {"allow_open_relay": True},
    ],
)
def test_starts_with_keys_an_allow_list_or_the_opt_out(
    make_settings: Callable[..., Settings], extra: dict[str, Any]
) -> None:
    with TestClient(create_app(make_settings(smtp_host="smtp.example.com", **extra))) as client:
        assert client.get("/ready").status_code == 200


def test_the_opt_out_is_logged(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    create_app(make_settings(smtp_host="smtp.example.com", allow_open_relay=True))
    assert "ALLOW_OPEN_RELAY=true" in caplog.text


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "127.0.0.2", "::1"])
def test_loopback_smtp_starts_without_configuration(
    make_settings: Callable[..., Settings], host: str
) -> None:
    assert is_loopback(host)
    create_app(make_settings(smtp_host=host))


# -- ALLOWED_RECIPIENTS ------------------------------------------------------------------


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(smtp_host="smtp.example.com", api_keys=f"ops:admin:{hash_key(ADMIN)}",
                         allowed_recipients="@example.com, Boss@Partner.org")  # fmt: skip


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c


@pytest.mark.parametrize(
    "fields",
    [
        {"to": "someone@evil.com"},
        {"cc": ["someone@evil.com"]},
        {"bcc": ["someone@evil.com"]},
        {"to": "other@partner.org"},  # only boss@partner.org is listed
        {"to": "user@mail.example.com"},
        {"to": "user@example.com.evil.com"},
    ],
)
def test_recipients_outside_the_allow_list_are_refused(
    client: TestClient, store: redis.Redis, fields: dict[str, Any]
) -> None:
    body = assert_error(client.post(SEND, json=mail(**fields)), 403, "forbidden")
    assert "ALLOWED_RECIPIENTS" in body["detail"]
    assert task_keys(store) == []


def test_recipients_inside_the_allow_list_are_sent(client: TestClient) -> None:
    fields = {"to": "a@EXAMPLE.com", "cc": ["boss@partner.org"], "bcc": ["BOSS@partner.org"]}
    assert client.post(SEND, json=mail(**fields)).status_code == 202


def test_the_allow_list_applies_to_each_message_of_a_batch(
    client: TestClient, store: redis.Redis
) -> None:
    messages = [mail(to="a@example.com"), mail(to="a@evil.com"), mail(cc=["x@evil.com"])]
    response = client.post(BATCH, json={"messages": messages})
    assert response.status_code == 202, response.text
    answer = response.json()
    assert (answer["queued"], answer["rejected"]) == (1, 2)
    assert [r.get("error") for r in answer["results"]] == [None, "forbidden", "forbidden"]
    assert len(task_keys(store)) == 1


def test_the_allow_list_without_keys(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(smtp_host="smtp.example.com", allowed_recipients="team@example.com")
    with TestClient(create_app(settings)) as client:
        assert client.post(SEND, json=mail(to="team@example.com")).status_code == 202
        assert_error(client.post(SEND, json=mail(to="user@example.com")), 403, "forbidden")


@pytest.mark.parametrize("value", ["not-an-address", "@", "@bad_domain", "a@b@c.com"])
def test_malformed_allow_lists_are_refused(
    make_settings: Callable[..., Settings], value: str
) -> None:
    with pytest.raises(ValueError, match="ALLOWED_RECIPIENTS"):
        make_settings(allowed_recipients=value)
