"""Slow relays, paused workers and a stalled Redis, across real processes.

Each test counts at the recording SMTP server what the API accepted, and what was delivered,
lost and duplicated: a relay that answers the end of DATA late, one that never answers it,
a worker stopped with SIGSTOP past its leases while another delivers its mail, and a
redis-server stopped with SIGSTOP under the API. No duration is asserted; waits are bounded
only so that a failing test ends.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from emailq.devtools.redis_server import RedisServer
from emailq.settings import Settings
from tests.helpers.api import Api, all_succeeded, outcomes
from tests.helpers.polling import read_log, wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import Counts, SlowReplyHandler, SmtpServer

pytestmark = pytest.mark.slow


# -- the reply to the end of DATA comes late ------------------------------------------------


def test_a_late_final_reply_is_waited_for_and_each_mail_is_sent_once(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    # Each reply comes after 2.5 s: longer than a command may take (1 s) and than a lease
    # (1 s, so only renewals keep the mail this worker's), shorter than the DATA timeout.
    handler = SlowReplyHandler(reply_after=2.5)
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, smtp_timeout_seconds=1.0,
                             smtp_data_timeout_seconds=30, worker_concurrency=4,
                             job_lease_seconds=1)  # fmt: skip
    api = Api(procs.api(settings))
    ids = api.enqueue(6)
    procs.worker(settings)

    results = api.wait_terminal(ids)
    counts = Counts.of(ids, handler).report("late final reply")
    all_succeeded(results)
    assert (counts.lost, counts.duplicated) == (0, 0)
    assert [outcomes(r) for r in results.values()] == [["success"]] * len(ids)


# -- the reply to the end of DATA never comes ---------------------------------------------


@pytest.mark.parametrize(
    ("policy", "status", "log", "copies"),
    [("fail", "failed", ["outcome_unknown"], 1),
     ("retry", "success", ["outcome_unknown", "success"], 2)],
)  # fmt: skip
def test_a_final_reply_that_never_comes_is_outcome_unknown_then_as_configured(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    policy: str,
    status: str,
    log: list[str],
    copies: int,
) -> None:
    handler = SlowReplyHandler(silent=1)  # the first message is never answered
    smtp = smtp_factory(handler=handler)
    settings = make_settings(smtp_port=smtp.port, smtp_timeout_seconds=0.5,
                             smtp_data_timeout_seconds=1.5, on_unknown_outcome=policy,
                             job_lease_seconds=1)  # fmt: skip
    api = Api(procs.api(settings))
    [task_id] = api.enqueue(1)
    procs.worker(settings)

    result = api.wait_terminal([task_id])[task_id]
    counts = Counts.of([task_id], handler).report(f"final reply never came, {policy}")
    assert (result["status"], outcomes(result)) == (status, log)
    assert counts.lost == 0
    # The relay committed the first copy: "fail" leaves it at one (the mail went out, the
    # status says failed, the reason says why); "retry" sends a second, as configured.
    assert Counter(handler.task_ids())[task_id] == copies
    assert "may have delivered" in result["attempt_log"][0]["reply"]
    if policy == "fail":
        assert "outcome unknown" in result["reason"]


# -- a worker paused past its leases --------------------------------------------------------


def test_a_paused_worker_sends_nothing_it_no_longer_owns(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    # Slow RCPT and DATA replies: when A is stopped, some of its sends are before DATA (they
    # must not go on) and some have their message at the relay already (those may repeat).
    handler = SlowReplyHandler(reply_after=0.3, rcpt_delay=0.3)
    smtp = smtp_factory(handler=handler)
    common = {"smtp_port": smtp.port, "worker_concurrency": 4, "job_lease_seconds": 1}
    settings_a = make_settings(mail_from="A <a@example.com>", **common)
    settings_b = make_settings(mail_from="B <b@example.com>", **common)
    api = Api(procs.api(settings_a))
    ids = api.enqueue(24)
    worker_a = procs.worker(settings_a)
    wait_until(lambda: handler.answered >= 4, what="A under way", proc=worker_a)

    with stopped(worker_a.pid):
        # B takes over each lease of A's as it lapses, and delivers everything.
        procs.worker(settings_b)
        results = api.wait_terminal(ids)
        resumed_at = len(handler.received)
    # A goes on where it stopped; its drain on SIGTERM waits for each send it still held.
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(timeout=30) == 0, read_log(worker_a)[-3000:]

    counts = Counts.of(ids, handler).report("paused worker")
    all_succeeded(results)
    assert counts.lost == 0
    senders = handler.senders()
    from_a_before = {task for sender, task in senders[:resumed_at] if sender == "a@example.com"}
    from_a_after = [task for sender, task in senders[resumed_at:] if sender == "a@example.com"]
    assert from_a_after == [], "A sent mail after SIGCONT that B had taken over"
    # The only repeats: messages A had already handed to the relay when it was stopped.
    repeated = {task for task, n in Counter(handler.task_ids()).items() if n > 1}
    assert repeated <= from_a_before


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT at the end, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- a stalled Redis under the API ----------------------------------------------------------


def test_a_stalled_redis_answers_503_and_a_not_stored_mail_is_never_delivered(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    redis_factory: Callable[..., RedisServer],
) -> None:
    redis = redis_factory()
    smtp = smtp_factory()
    timeout = 0.5
    settings = make_settings(redis_url=redis.url, smtp_port=smtp.port,
                             redis_timeout_seconds=timeout)  # fmt: skip
    api = Api(procs.api(settings))
    worker = procs.worker(settings)
    [warm] = api.enqueue(1)  # pooled connections exist: the stall hits sent commands
    api.wait_terminal([warm])
    assert redis.process is not None

    with stopped(redis.process.pid):
        answers = post_concurrently(api, 12, hang_after=20 * 2 * timeout)

    assert {a.status_code for a in answers.values()} == {503}, answers
    codes = {n: a.json()["error"] for n, a in answers.items()}
    assert set(codes.values()) <= {"service_unavailable", "store_outcome_unknown"}
    assert "store_outcome_unknown" in codes.values()  # a stalled Redis holds what was sent
    for answer in answers.values():
        # A generous multiple of the documented 2 x REDIS_TIMEOUT_SECONDS, measured by the
        # API itself: catches a path that waits on, not a slow machine.
        assert float(answer.headers["X-Process-Time"]) < 4 * 2 * timeout, answer.headers

    # Redis resumes and runs what it was sent; the worker sends what that stored. A mail
    # queued after the stall is delivered after all of it (one lane, oldest first).
    [last] = api.enqueue(1)
    api.wait_terminal([last])
    wait_until(lambda: queue_idle(api), what="queue drained after the stall", proc=worker)
    delivered = Counter(m.message["Subject"] for m in smtp.handler.received)
    not_stored = [n for n, code in codes.items() if code == "service_unavailable"]
    unknown = [n for n, code in codes.items() if code == "store_outcome_unknown"]
    print(f"stalled Redis: {len(not_stored)} not stored, {len(unknown)} unknown, "
          f"{sum(delivered[f'stall {n}'] for n in unknown)} of those delivered; slowest "
          f"503 {max(float(a.headers['X-Process-Time']) for a in answers.values()):.2f}s "
          f"(REDIS_TIMEOUT_SECONDS={timeout})")  # fmt: skip
    assert [n for n in not_stored if delivered[f"stall {n}"]] == []
    # Nothing stored twice by a command sent again.
    assert max(delivered[f"stall {n}"] for n in answers) <= 1


def post_concurrently(api: Api, count: int, *, hang_after: float) -> dict[int, httpx.Response]:
    """POST ``count`` mails at once (subject "stall <n>"); ``hang_after`` bounds each wait."""

    def post(n: int) -> httpx.Response:
        body = {"to": f"user{n}@example.com", "subject": f"stall {n}", "body": "hello"}
        return api.client.post("/api/v1/email/received", json=body, timeout=hang_after)

    with ThreadPoolExecutor(count) as pool:
        return dict(zip(range(count), pool.map(post, range(count)), strict=True))


def queue_idle(api: Api) -> bool:
    stats: dict[str, Any] = api.client.get("/api/v1/admin/stats").json()
    waiting = sum(lane["depth"] for lane in stats["lanes"])
    return waiting == 0 and stats["in_flight"] == 0 and stats["scheduled"] == 0
