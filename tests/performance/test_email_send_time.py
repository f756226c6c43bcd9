"""Timing runs kept from the original service: ``pytest -m performance -s``.

They print how long sends take through the real API and worker processes; they assert
only that every mail arrived. Comparative figures with references live in bench/.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer

pytestmark = pytest.mark.performance


def _send(client: httpx.Client, n: int) -> list[str]:
    body = {"to": "user@example.com", "subject": "perf {username}", "body": "hello",
            "username": "홍길동"}  # fmt: skip
    ids = []
    for _ in range(n):
        response = client.post("/api/v1/email/received", json=body)
        assert response.status_code == 202
        ids.append(response.json()["task_id"])
    return ids


@pytest.mark.parametrize("count", [1, 500])
def test_send_time(
    count: int, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(worker_concurrency=8)
    base = procs.api(settings)
    procs.worker(settings)
    with httpx.Client(base_url=base) as client:
        started = time.perf_counter()
        ids = _send(client, count)
        accepted = time.perf_counter()
        wait_until(lambda: len(smtp.handler.received) >= count, what="all mail", timeout=120)
        done = time.perf_counter()
    assert sorted(smtp.handler.task_ids()) == sorted(ids)
    print(
        f"\n{count} mail(s): accepted in {accepted - started:.3f}s, all delivered after "
        f"{done - started:.3f}s ({count / (done - started):.0f} mails/s end to end)"
    )
