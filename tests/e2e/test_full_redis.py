"""Redis at maxmemory under load, across real processes (issue 10's "full Redis" row).

A real redis-server with a small ``maxmemory`` and ``noeviction``, the API and two workers
as processes, an aiosmtpd server slow enough that mail piles up. Clients keep sending large
mails until the API refuses them (``REDIS_MEMORY_HEADROOM``). Then Redis's limit drops
below what it held empty, so that even sending the whole backlog cannot bring it back under
(as when other data fills it): the backlog is sent and recorded in a Redis past maxmemory,
the clients keep sending, and the idle workers' claims meet Redis's own OOM error. Then
Redis is given room again. Counted at the SMTP server: nothing accepted is lost, nothing is
delivered twice; the API answered only 202, 503 or 507, always with a response.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from emailq.devtools.redis_server import RedisServer
from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import Api, all_succeeded
from tests.helpers.polling import wait_for_log, wait_until
from tests.helpers.processes import Procs
from tests.helpers.queues import memory
from tests.helpers.smtpd import Counts, SmtpServer, delayed_smtp

pytestmark = pytest.mark.slow

MAXMEMORY = 12 * 1024 * 1024
BODY = "x" * 100_000  # about 100 KB of Redis per queued mail
CLIENTS = 6
ALLOWED = {202, 503, 507}


class Load:
    """Client threads posting mail; every answer (or dropped request) is kept."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.statuses: Counter[int | str] = Counter()
        self.accepted: list[str] = []
        # A store whose reply Redis did not give in time (503 store_outcome_unknown, under
        # a loaded machine) may have been stored: its mail may arrive, unnamed to anyone.
        self.unknown_outcomes = 0

    def post(self, client: httpx.Client, n: int) -> int | str:
        body = {"to": f"user{n}@example.com", "subject": f"full {n}", "body": BODY}
        error = ""
        try:
            response = client.post("/api/v1/email/received", json=body)
        except httpx.HTTPError as exc:  # a dropped connection, a timeout: no answer at all
            answer: int | str = type(exc).__name__
        else:
            answer = response.status_code
            if answer != 202:
                error = response.json()["error"]
                assert error, response.text  # the JSON error shape
        with self.lock:
            self.unknown_outcomes += error == "store_outcome_unknown"
            self.statuses[answer] += 1
            if answer == 202:
                self.accepted.append(response.json()["task_id"])
        return answer

    def run(self, until: Callable[[int, int | str], bool]) -> None:
        """Each client posts until ``until(its refusals so far, last answer)`` is true."""

        def client_loop(index: int) -> None:
            with httpx.Client(base_url=self.base, timeout=10.0) as client:
                refused, n = 0, 0
                while True:
                    answer = self.post(client, index * 100_000 + n)
                    n += 1
                    refused += answer != 202
                    if until(refused, answer):
                        return

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def set_maxmemory(url: str, limit: int) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.config_set("maxmemory", limit)
    finally:
        client.close()


def test_a_full_redis_answers_507_loses_nothing_and_sends_nothing_twice(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(maxmemory=MAXMEMORY)
    empty, _ = memory(server.url)
    smtp = delayed_smtp(smtp_factory, 0.2)  # drains ~20 mails/s: the API fills faster
    settings = make_settings(redis_url=server.url, smtp_port=smtp.port, worker_concurrency=2,
                             job_lease_seconds=2.0, redis_memory_headroom=0.1)  # fmt: skip
    load = Load(procs.api(settings))
    workers = [procs.worker(settings), procs.worker(settings)]

    # 1. Fill through the API until every client has been refused a few times.
    load.run(until=lambda refused, _: refused >= 3)
    used, maxmemory = memory(server.url)
    refused_at_headroom = load.statuses[507]
    print(f"headroom: accepted={len(load.accepted)} refused(507)={refused_at_headroom} "
          f"used_memory={used} maxmemory={maxmemory}")  # fmt: skip
    assert refused_at_headroom > 0
    assert len(load.accepted) > 0

    # 2. Redis past maxmemory, by more than the backlog will free: its mail is still sent
    # and recorded (outcomes fit: see finish.lua), clients keep sending, and the workers'
    # own claims then meet the OOM error.
    set_maxmemory(server.url, empty // 2)
    load.run(until=lambda refused, _: refused >= 5)
    for worker in workers:
        wait_for_log(worker, "Redis is full", timeout=90)  # and it waited, as for an outage
    assert all(worker.poll() is None for worker in workers)

    # 3. Room again: everything accepted is delivered once, and new mail is accepted.
    set_maxmemory(server.url, MAXMEMORY)
    api = Api(load.base)
    results = api.wait_terminal(load.accepted)
    wait_until(lambda: len(set(smtp.handler.task_ids())) >= len(load.accepted),
               what="every accepted mail received")  # fmt: skip
    load.accepted.extend(api.enqueue(1))
    results |= api.wait_terminal(load.accepted[-1:])

    counts = Counts.of(load.accepted, smtp.handler,
                       unknown_outcomes=load.unknown_outcomes).report("full Redis")  # fmt: skip
    print(f"answers: {dict(load.statuses)}")
    assert set(load.statuses) <= ALLOWED, load.statuses  # never a 500, never no answer
    all_succeeded(results)
    assert counts.lost == 0
    assert counts.duplicated == 0
    assert all(worker.poll() is None for worker in workers), "no worker may exit"
    stored = redis.Redis.from_url(server.url).hgetall(Keys().stored)
    assert stored == {}  # every byte charged was refunded
