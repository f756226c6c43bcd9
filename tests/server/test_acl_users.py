"""Redis ACL users granted less than everything: what the README says each setting needs
(INFO for REDIS_MEMORY_HEADROOM, nothing extra otherwise) is all the API asks of them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def acl_user(store: redis.Redis, redis_url: str, without: str) -> Iterator[str]:
    """The URL of a Redis user granted every command but ``without``, for the test only."""
    user = f"no{without}-{uuid.uuid4().hex[:8]}"
    store.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", f"-{without}"])  # fmt: skip
    try:
        yield redis_url.replace("redis://", f"redis://{user}:pw@", 1)
    finally:
        store.acl_deluser(user)


def test_redis_memory_is_read_only_while_the_headroom_is_on(
    make_settings: Callable[..., Settings], store: redis.Redis, redis_url: str
) -> None:
    # The README's way for an ACL user without INFO is REDIS_MEMORY_HEADROOM=0; the memory
    # gauges read INFO in every scrape, and /metrics answered 500 for such a user.
    with acl_user(store, redis_url, "info") as limited:
        app = create_app(make_settings(redis_url=limited, redis_memory_headroom=0))
        with local_client(app) as client:
            samples = metrics(client)
    assert samples["emailq_redis_up"] == 1
    assert "emailq_redis_memory_used_bytes" not in samples
    with local_client(create_app(make_settings())) as client:
        assert metrics(client)["emailq_redis_memory_used_bytes"] > 0


def test_an_acl_user_without_ping_still_starts_the_api(
    make_settings: Callable[..., Settings], store: redis.Redis, redis_url: str
) -> None:
    # The start-up PING (it names a Redis that does not answer) stopped the start with an
    # uncaught NoPermissionError for such a user; before it, the API ran.
    with acl_user(store, redis_url, "ping") as limited:
        app = create_app(make_settings(redis_url=limited))
        with local_client(app) as client:
            assert client.post(SEND, json=mail()).status_code == 202
