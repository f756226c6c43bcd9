"""Racing duplicates across real processes: one Idempotency-Key, 20 POSTs, one mail."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
RACERS = 20


def test_concurrent_duplicates_create_one_task_and_send_one_mail(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, redis_url: str
) -> None:
    settings = make_settings()
    base = procs.api(settings)
    procs.worker(settings)
    body = {"to": "user@example.com", "subject": "Order 42", "body": "Thanks!"}
    start = threading.Barrier(RACERS)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=10) as client:
            start.wait()  # all 20 requests leave together
            return client.post(SEND, json=body, headers={"Idempotency-Key": "order-42"})

    with ThreadPoolExecutor(RACERS) as pool:
        answers = list(pool.map(post, range(RACERS)))

    assert [a.status_code for a in answers] == [202] * RACERS
    [task_id] = {a.json()["task_id"] for a in answers}
    fresh = [a for a in answers if "Idempotent-Replayed" not in a.headers]
    assert len(fresh) == 1
    assert all(a.headers.get("Idempotent-Replayed") == "true" for a in answers if a not in fresh)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    assert list(store.scan_iter(match=Keys().task_prefix + "*")) == [Keys().task(task_id)]
    store.close()

    result = httpx.get(f"{base}{RESULT}", params={"task_id": task_id, "wait": 20}, timeout=30)
    assert result.json()["status"] == "success", result.text
    # Final, and the only task there was: nothing else can still be sent.
    assert smtp.handler.task_ids() == [task_id]
