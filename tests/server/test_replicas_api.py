"""REDIS_WAIT_REPLICAS at the API: too few replicas is 503 store_outcome_unknown."""

from __future__ import annotations

from collections.abc import Callable

import redis

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import local_client


def test_the_api_answers_outcome_unknown_when_replicas_do_not_confirm(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    # The session Redis has no replica: the send and the batch are stored on the master
    # and will be sent, but the 202 would promise what a failover could take back.
    settings = make_settings(redis_wait_replicas=1, redis_wait_timeout_seconds=0.05)
    mail = {"to": "a@example.com", "subject": "s", "body": "b"}
    with local_client(create_app(settings)) as client:
        single = client.post("/api/v1/email/received", json=mail)
        batch = client.post("/api/v1/emails/batch", json={"messages": [mail, mail]})
    for answer in (single, batch):
        assert answer.status_code == 503
        assert answer.json()["error"] == "store_outcome_unknown"
    assert len(store.keys("{emailq}:task:*")) == 3
