"""Redis ACL users granted less than everything: what the README says each setting needs
(INFO for REDIS_MEMORY_HEADROOM, nothing extra otherwise) is all the API asks of them."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import local_client, mail
from tests.helpers.metrics import Samples, parse

SEND = "/api/v1/email/received"


def metrics(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


def test_redis_memory_is_read_only_while_the_headroom_is_on(
    make_settings: Callable[..., Settings], store: redis.Redis, redis_url: str
) -> None:
    # The README's way for an ACL user without INFO is REDIS_MEMORY_HEADROOM=0; the memory
    # gauges read INFO in every scrape, and /metrics answered 500 for such a user.
    user = f"noinfo-{uuid.uuid4().hex[:8]}"
    store.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-info"])  # fmt: skip
    try:
        limited = redis_url.replace("redis://", f"redis://{user}:pw@", 1)
        with local_client(
            create_app(make_settings(redis_url=limited, redis_memory_headroom=0))
        ) as client:
            samples = metrics(client)
        assert samples["emailq_redis_up"] == 1
        assert "emailq_redis_memory_used_bytes" not in samples
        with local_client(create_app(make_settings())) as client:
            memory = metrics(client)["emailq_redis_memory_used_bytes"]
        assert memory > 0
    finally:
        store.acl_deluser(user)


def test_an_acl_user_without_ping_still_starts_the_api(
    make_settings: Callable[..., Settings], store: redis.Redis, redis_url: str
) -> None:
    # The start-up PING (it names a Redis that does not answer) stopped the start with an
    # uncaught NoPermissionError for such a user; before it, the API ran.
    user = f"noping-{uuid.uuid4().hex[:8]}"
    store.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-ping"])  # fmt: skip
    try:
        limited = redis_url.replace("redis://", f"redis://{user}:pw@", 1)
        with local_client(create_app(make_settings(redis_url=limited))) as client:
            assert client.post(SEND, json=mail()).status_code == 202
    finally:
        store.acl_deluser(user)
