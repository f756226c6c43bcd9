"""The webhook admin API: bad input is a 4xx in the one error shape with nothing stored,
file endpoints stay the file's, and only admins reach it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.queue import Keys, Queue
from emailq.settings import Settings
from emailq.webhooks.config import WebhooksConfigError, load_webhooks
from emailq.webhooks.signing import new_secret
from emailq.webhooks.store import WebhookStore
from server.main import create_app
from tests.helpers.api import ADMIN, ALICE, API_KEYS, assert_error, bearer, local_client

URL = "/api/v1/admin/webhooks"


def stored(store: redis.Redis) -> list[str]:
    """Every webhook key in Redis."""
    return [str(k) for k in store.scan_iter(f"{Keys().base}:webhooks:*")]


@pytest.mark.parametrize(
    ("body", "where"),
    [({"url": "http://10.0.0.1/h"}, "url"), ({"url": "http://169.254.169.254/"}, "url"),
     ({"url": "http://localhost:9/h"}, "url"), ({"url": "ftp://x.example/"}, "url"),
     ({"url": "https://x.example/", "events": ["email.opened"]}, "events"),
     ({"url": "https://x.example/", "secrets": ["nope"]}, "secrets"),
     ({"url": "https://x.example/", "secrets": ["whsec_c2hvcnQ="]}, "secrets"),
     ({"url": "https://x.example/", "events": []}, "events"),
     ({"url": "https://x.example/", "description": "a\r\nb"}, "description"),
     ({"url": "https://x.example/" + "a" * 3000}, "url"),
     ({"url": "https://x.example/", "extra": 1}, "extra"), ({}, "url")],
)  # fmt: skip
def test_bad_endpoints_are_refused_and_nothing_is_stored(
    client: TestClient, store: redis.Redis, body: dict[str, Any], where: str
) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert where in json.dumps(error["fields"]) or where in error["detail"]
    assert "nope" not in response.text  # a bad secret is not echoed
    assert stored(store) == []


def test_unknown_ids_are_404_and_malformed_ids_422(client: TestClient) -> None:
    assert_error(client.get(f"{URL}/nope"), 404, "not_found")
    assert_error(client.delete(f"{URL}/nope"), 404, "not_found")
    assert_error(client.get(f"{URL}/nope/deliveries"), 404, "not_found")
    assert_error(client.patch(f"{URL}/nope", json={"events": ["email.sent"]}), 404, "not_found")
    assert_error(client.post(f"{URL}/nope/secrets/rotate"), 404, "not_found")
    assert_error(client.post(f"{URL}/nope/deliveries/msg_{'a' * 32}/replay"), 404, "not_found")
    assert_error(client.post(f"{URL}/a/deliveries/not-an-id/replay"), 422, "validation_error")
    assert_error(client.get(f"{URL}/a.b"), 422, "validation_error")


def test_only_admin_keys_reach_it(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(api_keys=API_KEYS))
    with TestClient(app) as keyed:
        assert_error(keyed.get(URL), 401, "unauthorized")
        assert_error(keyed.get(URL, headers=bearer(ALICE)), 403, "forbidden")
        assert keyed.get(URL, headers=bearer(ADMIN)).json() == {"endpoints": []}


async def test_file_endpoints_are_listed_once_synced_and_cannot_be_changed_here(
    make_settings: Callable[..., Settings], tmp_path: Path, store: redis.Redis
) -> None:
    path = tmp_path / "webhooks.toml"
    secret = new_secret()
    path.write_text(f'[[webhooks]]\nid = "ops"\nurl = "https://hooks.example.com/in"\n'
                    f'secrets = ["{secret}"]\n')  # fmt: skip
    settings = make_settings(webhooks_file=path)
    queue = Queue.from_settings(settings)
    try:  # what the dispatcher does at startup
        assert await WebhookStore(queue).sync_file(load_webhooks(path, allow_private=False)) == []
    finally:
        await queue.close()
    with local_client(create_app(settings)) as client:
        (listed,) = client.get(URL).json()["endpoints"]
        assert listed["id"] == "ops"
        assert listed["source"] == "file"
        assert listed["events"] == ["email.sent", "email.failed", "email.cancelled"]
        assert secret not in json.dumps(listed)
        assert client.get(f"{URL}/ops").json()["secrets"] == [secret]
        assert_error(client.delete(f"{URL}/ops"), 409, "conflict")
        assert_error(client.patch(f"{URL}/ops", json={"events": ["email.failed"]}), 409, "conflict")
        assert_error(client.post(f"{URL}/ops/secrets/rotate"), 409, "conflict")
        (unchanged,) = client.get(URL).json()["endpoints"]
        assert unchanged == listed  # the file's, as it was


@pytest.mark.parametrize(
    ("text", "message"),
    [('[[webhooks]]\nid = "a"\nurl = "https://x.example/"\n', "field secrets"),
     ('[[webhooks]]\nid = "ep_a"\nurl = "https://x.example/"\nsecrets = ["SECRET"]\n',
      "field id"),
     ('[[webhooks]]\nid = "a"\nurl = "http://127.0.0.1/"\nsecrets = ["SECRET"]\n',
      "field url: 127.0.0.1 is a loopback"),
     ('[[webhooks]]\nid = "a"\nurl = "https://x.example/"\nsecrets = ["whsec_bad"]\n',
      "field secrets: a secret is"),
     ("webhooks = 3", "expected a list"), ("[[webhooks", "WEBHOOKS_FILE")],
)  # fmt: skip
def test_a_bad_webhooks_file_stops_the_api_with_one_line(
    make_settings: Callable[..., Settings], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "webhooks.toml"
    path.write_text(text.replace("SECRET", new_secret()))
    with pytest.raises(WebhooksConfigError, match=message) as caught:
        create_app(make_settings(webhooks_file=path))
    assert "\n" not in str(caught.value)
    assert "whsec_bad" not in str(caught.value)


def _registered(client: TestClient, **extra: Any) -> dict[str, Any]:
    """A new API endpoint, as its registration answers."""
    created = client.post(URL, json={"url": "https://hooks.example.com/in", **extra})
    assert created.status_code == 201, created.text
    endpoint: dict[str, Any] = created.json()
    return endpoint


def test_a_change_replaces_the_fields_given_and_keeps_the_rest(client: TestClient) -> None:
    endpoint = _registered(client, description="orders")
    url = f"{URL}/{endpoint['id']}"
    fresh = new_secret()
    changed = client.patch(url, json={"events": ["email.failed", "email.failed"],
                                      "secrets": [fresh], "description": None})  # fmt: skip
    assert changed.status_code == 200, changed.text
    assert endpoint["updated_at"] is None
    assert changed.json()["updated_at"] >= endpoint["created_at"]  # both RFC 3339 UTC
    expected = {**endpoint, "events": ["email.failed"], "secrets": [fresh],
                "updated_at": changed.json()["updated_at"]}  # fmt: skip
    assert changed.json() == expected  # null left the description as it was
    assert client.get(url).json() == expected
    moved = client.patch(url, json={"url": "https://elsewhere.example.com/h", "description": ""})
    stamp = moved.json()["updated_at"]
    assert moved.json() == {**expected, "url": "https://elsewhere.example.com/h",
                            "description": "", "updated_at": stamp}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "where"),
    [({"url": "http://10.0.0.1/h"}, "url"), ({"url": "http://[::ffff:169.254.169.254]/"}, "url"),
     ({"url": "ftp://x.example/"}, "url"), ({"events": []}, "events"),
     ({"events": ["email.opened"]}, "events"), ({"secrets": []}, "secrets"),
     ({"secrets": ["nope"]}, "secrets"), ({"secrets": ["whsec_c2hvcnQ="]}, "secrets"),
     ({"description": "a\nb"}, "description"), ({"id": "other"}, "id"),
     ({"source": "file"}, "source"), ({}, "at least one"), ({"url": None}, "at least one")],
)  # fmt: skip
def test_a_bad_change_is_refused_and_the_endpoint_is_left_as_it_was(
    client: TestClient, body: dict[str, Any], where: str
) -> None:
    endpoint = _registered(client)
    url = f"{URL}/{endpoint['id']}"
    response = client.patch(url, json=body)
    assert response.status_code == 422, response.text
    assert where in json.dumps(response.json()["fields"]) or where in response.json()["detail"]
    assert "nope" not in response.text
    assert client.get(url).json() == endpoint


def test_rotating_signs_with_a_new_secret_beside_the_newest_old_one(client: TestClient) -> None:
    endpoint = _registered(client)
    url = f"{URL}/{endpoint['id']}"
    (first,) = endpoint["secrets"]
    once = client.post(f"{url}/secrets/rotate")
    assert once.status_code == 200, once.text
    second, kept = once.json()["secrets"]
    assert kept == first
    assert second != first
    assert second.startswith("whsec_")
    third, kept = client.post(f"{url}/secrets/rotate").json()["secrets"]
    assert (kept, len({first, second, third})) == (second, 3)  # the oldest is dropped
    assert client.get(url).json()["secrets"] == [third, second]
    # From the most secrets an endpoint may have, too: the newest old one stays.
    three = [new_secret() for _ in range(3)]
    client.patch(url, json={"secrets": three})
    fourth, kept = client.post(f"{url}/secrets/rotate").json()["secrets"]
    assert (kept, fourth in three) == (three[0], False)
    client.patch(url, json={"secrets": [third]})
    # The rotation done: the old one dropped by naming the new one alone.
    assert client.patch(url, json={"secrets": [third]}).json()["secrets"] == [third]
    masked = client.get(URL).json()["endpoints"][0]["secrets"]
    assert masked == [f"whsec_...{third[-4:]}"]


def test_only_admin_keys_change_or_rotate(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(api_keys=API_KEYS))
    with TestClient(app) as keyed:
        keyed.headers.update(bearer(ADMIN))
        endpoint = _registered(keyed)
        del keyed.headers["Authorization"]
        url = f"{URL}/{endpoint['id']}"
        for headers, status in (({}, 401), (bearer(ALICE), 403)):
            change = keyed.patch(url, json={"events": ["email.sent"]}, headers=headers)
            assert change.status_code == status
            assert keyed.post(f"{url}/secrets/rotate", headers=headers).status_code == status
        assert keyed.get(url, headers=bearer(ADMIN)).json() == endpoint
