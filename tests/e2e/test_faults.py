"""Fault injection across real processes: kill -9, SIGTERM (once, and repeatedly under fast
sends), a Redis outage, a crash during backoff and an SMTP outage.

Every test enqueues through the API process, causes the fault, waits until every task is
terminal, then counts from the recording SMTP server: *lost* are accepted task ids never
received, *duplicated* are task ids received more than once. The counts are printed
(``pytest -s``) so they can be quoted. Waits are bounded; no duration is asserted (the time
the API takes to answer 503 during the Redis outage is printed, not asserted).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from emailq.devtools.redis_server import RedisServer
from emailq.settings import Settings
from tests.helpers.api import Api, all_succeeded, outcomes
from tests.helpers.polling import read_log, wait_for_log, wait_until
from tests.helpers.ports import port_of, refused_port
from tests.helpers.processes import Procs, sigkill
from tests.helpers.smtpd import Counts, Received, RecordingHandler, SmtpServer, delayed_smtp

pytestmark = pytest.mark.slow


@dataclass
class CommitFirstHandler(RecordingHandler):
    """Records a message as soon as its data has arrived, then is slow to answer: an MTA that
    has committed the mail. A client killed in that window never learns it was accepted, the
    case at-least-once delivery repeats. (RecordingHandler records after its delay, and
    aiosmtpd cancels the handler when the connection drops, so it never sees that case.)"""

    answered: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            self.data_calls += 1
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content or envelope.content,
                                          session.peer))  # fmt: skip
        await asyncio.sleep(self.delay)
        with self.lock:
            self.answered += 1
        return "250 2.0.0 OK queued"

    def unanswered(self) -> int:
        with self.lock:
            return self.data_calls - self.answered


def in_flight(handler: RecordingHandler) -> int:
    """DATA commands the server has begun but not yet answered."""
    with handler.lock:
        return handler.data_calls - len(handler.received)


def wait_received(handler: RecordingHandler, count: int, proc: subprocess.Popen[bytes]) -> None:
    wait_until(lambda: len(handler.received) >= count, what=f"{count} mails received", proc=proc)


# -- 1. kill -9 while sends are in flight --------------------------------------------------


def test_kill_9_mid_send_loses_nothing_and_repeats_only_in_flight(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    run = killed_mid_send(procs, make_settings, smtp_factory, "kill -9")
    assert 0 < len(run.interrupted) <= run.concurrency
    for task_id in run.interrupted:
        assert run.results[task_id]["attempts"] >= 2, run.results[task_id]
        assert "lease_expired" in outcomes(run.results[task_id]), run.results[task_id]
    assert run.repeated <= run.interrupted


def test_kill_9_with_jobs_held_ahead_repeats_only_what_was_sending(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    # WORKER_PREFETCH: a killed worker also held jobs it had not begun. Their leases lapse
    # like the sends', which costs each an attempt (the price the setting names), but none
    # of them reached the relay, so only what was sending can arrive twice.
    prefetch = 4
    run = killed_mid_send(procs, make_settings, smtp_factory, "kill -9, jobs held ahead",
                          worker_prefetch=prefetch)  # fmt: skip
    assert run.concurrency < len(run.interrupted) <= run.concurrency + prefetch  # held too
    assert run.repeated <= run.interrupted & run.reached_relay


@dataclass
class KilledMidSend:
    concurrency: int
    interrupted: set[str]  # claimed by the killed worker and not finished
    reached_relay: set[str]  # at the SMTP server when it was killed
    results: dict[str, dict[str, Any]]
    repeated: set[str]  # arrived more than once


def killed_mid_send(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer],
    label: str, **extra: Any,
) -> KilledMidSend:  # fmt: skip
    """kill -9 a worker with sends in flight, let a second one finish; every mail arrives,
    at most the killed worker's concurrency twice, and exactly the mails it had claimed
    record a lapsed lease."""
    handler = CommitFirstHandler(delay=0.5)
    smtp = smtp_factory(handler=handler)
    concurrency = 4
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=concurrency,
                             job_lease_seconds=1, **extra)  # fmt: skip
    api = Api(procs.api(settings))
    ids = api.enqueue(20)
    worker_a = procs.worker(settings)

    wait_until(lambda: handler.answered >= concurrency and handler.unanswered() > 0,
               what="some mails delivered and more in flight", proc=worker_a)  # fmt: skip
    sigkill(worker_a)
    # Claimed by A and never finished: what the kill interrupted (B is not running yet).
    interrupted = {t for t, r in api.results(ids).items()
                   if r["status"] == "pending" and r["attempts"] >= 1}  # fmt: skip
    reached_relay = set(handler.task_ids())
    worker_b = procs.worker(settings)

    results = api.wait_terminal(ids)
    counts = Counts.of(ids, smtp.handler).report(label)
    all_succeeded(results)
    assert counts.lost == 0
    assert counts.duplicated <= concurrency
    expired = {t for t, r in results.items() if "lease_expired" in outcomes(r)}
    assert expired == interrupted
    # The survivor says whose leases it found lapsed, and how many: the operator's sign.
    dead_id = read_log(worker_a).split("worker ", 1)[1].split(" started", 1)[0]
    said = re.findall(rf"put back (\d+) job\(s\) whose lease worker {re.escape(dead_id)} "
                      "stopped renewing", read_log(worker_b))  # fmt: skip
    assert sum(int(n) for n in said) == len(interrupted)
    repeated = {t for t, n in Counter(smtp.handler.task_ids()).items() if n > 1}
    return KilledMidSend(concurrency, interrupted, reached_relay, results, repeated)


# -- 2. SIGTERM drains: in-flight sends finish, unstarted jobs go back -------------------------


def test_sigterm_drains_without_loss_or_duplicates(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    sigterm_drains(procs, make_settings, smtp_factory)


def test_sigterm_gives_back_the_jobs_held_ahead_uncounted(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    # WORKER_PREFETCH: the jobs waiting for a send slot are unstarted, so they go back.
    sigterm_drains(procs, make_settings, smtp_factory, worker_prefetch=4)


def sigterm_drains(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer],
    **extra: Any,
) -> None:  # fmt: skip
    smtp = delayed_smtp(smtp_factory, 0.5)
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=4, job_lease_seconds=2,
                             worker_shutdown_grace_seconds=10, **extra)  # fmt: skip
    api = Api(procs.api(settings))
    ids = api.enqueue(20)
    worker_a = procs.worker(settings)

    wait_until(lambda: len(smtp.handler.received) >= 1 and in_flight(smtp.handler) > 0,
               what="sends in flight", proc=worker_a)  # fmt: skip
    worker_a.send_signal(signal.SIGTERM)
    assert worker_a.wait(timeout=20) == 0, read_log(worker_a)[-3000:]

    # Every DATA the worker began was answered before it exited, and recorded.
    assert in_flight(smtp.handler) == 0
    after_a = api.results(ids)
    sent_by_a = {t for t, r in after_a.items() if r["status"] == "success"}
    assert sent_by_a == set(smtp.handler.task_ids())
    # Unstarted jobs went back uncounted.
    for task_id in set(ids) - sent_by_a:
        assert (after_a[task_id]["status"], after_a[task_id]["attempts"]) == ("pending", 0)

    procs.worker(settings)
    results = delivered_once_cleanly(api, ids, smtp.handler, "SIGTERM")
    assert all(r["attempts"] == 1 for r in results.values()), results


def test_repeated_sigterm_under_fast_sends_exits_and_leaks_no_lease(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    # Fast sends keep the claimer busy talking to Redis, so a stop often lands mid-claim:
    # the case where cancelling it lost claimed jobs or was swallowed (the worker hung).
    smtp = delayed_smtp(smtp_factory, 0.01)
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=4, job_lease_seconds=1)
    api = Api(procs.api(settings))
    ids = api.enqueue(80)
    for _ in range(5):
        worker = procs.worker(settings)
        wait_received(smtp.handler, len(smtp.handler.received) + 5, worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0, read_log(worker)[-3000:]
    procs.worker(settings)
    delivered_once_cleanly(api, ids, smtp.handler, "5x SIGTERM, fast sends")


def delivered_once_cleanly(
    api: Api, ids: list[str], handler: RecordingHandler, label: str
) -> dict[str, dict[str, Any]]:
    """Wait for every task; all succeeded, none lost or sent twice, no lease lapsed."""
    results = api.wait_terminal(ids)
    counts = Counts.of(ids, handler).report(label)
    all_succeeded(results)
    assert counts.lost == 0
    assert counts.duplicated == 0
    assert not [t for t, r in results.items() if "lease_expired" in outcomes(r)]
    return results


# -- 3. Redis stops and comes back on the same port and data dir ----------------------------


def assert_503(api: Api) -> None:
    """Both answer 503 while Redis is down, and a send says it stored nothing.

    A send may first find the API's pooled connection still open: the close of a stopped
    Redis can reach the API after the request does (seen under CI's load: the API logged
    that send's 503 before its result subscription saw the close). That send was written,
    and read no reply, so it answers
    ``store_outcome_unknown``, which is the truth from where the API stands. Its connection
    is then dropped, and a send after it must say ``service_unavailable``."""
    unknown = {"task_id": str(uuid.uuid4())}
    started = time.monotonic()
    codes: list[str] = []

    def send_refused() -> bool:
        response = api.post()
        assert response.status_code == 503, response.text
        codes.append(response.json()["error"])
        return codes[-1] == "service_unavailable"

    wait_until(send_refused, what="a send answered service_unavailable")
    print(f"503 after {time.monotonic() - started:.2f}s: {codes}")  # a figure, not a bound
    assert set(codes) <= {"service_unavailable", "store_outcome_unknown"}, codes
    response = api.client.get("/api/v1/email/result", params=unknown)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "service_unavailable", response.text


def test_redis_outage_recovers_without_restarts(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    redis_factory: Callable[..., RedisServer],
) -> None:
    redis = redis_factory()
    smtp = delayed_smtp(smtp_factory, 0.5)
    lease = 1.0
    settings = make_settings(redis_url=redis.url, smtp_port=smtp.port, worker_concurrency=4,
                             job_lease_seconds=lease)  # fmt: skip
    api = Api(procs.api(settings))
    worker = procs.worker(settings)
    ids = api.enqueue(10)
    wait_until(lambda: in_flight(smtp.handler) > 0, what="sends in flight", proc=worker)

    redis.stop()
    assert_503(api)
    wait_for_log(worker, "Redis unavailable")
    # The sends in flight complete during the outage; their outcome waits for Redis.
    wait_until(lambda: in_flight(smtp.handler) == 0, what="in-flight sends answered",
               proc=worker)  # fmt: skip
    # Outlast the leases, so recovery must renew before any claim sees them as lapsed. Here
    # the passing of time is the fault itself, not a stand-in for a condition to poll.
    time.sleep(lease * 1.5)
    assert worker.poll() is None

    redis_factory(port=redis.port, data_dir=redis.data_dir)
    ids += api.enqueue(10)  # the first POST after the restart must already be a 202

    results = api.wait_terminal(ids)
    counts = Counts.of(ids, smtp.handler).report("Redis outage")
    all_succeeded(results)
    assert counts.lost == 0
    assert counts.duplicated == 0
    assert worker.poll() is None, "the worker must ride out the outage in the same process"
    assert not [t for t, r in results.items() if "lease_expired" in outcomes(r)]


def test_api_and_worker_started_before_redis_say_so_then_run_when_it_comes(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp: SmtpServer,
    redis_factory: Callable[..., RedisServer],
) -> None:
    # Containers start in any order, and a new user's REDIS_URL may be wrong: each program
    # names the Redis that does not answer at start (the worker used to say only "could not
    # renew leases", the API "API ready"), and runs without a restart once it answers.
    with refused_port() as sock:
        port = port_of(sock)
    settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0")
    api = Api(procs.api(settings))
    api_proc = procs.started[-1]
    worker = procs.worker(settings)
    wait_for_log(api_proc, "not ready: Redis is unavailable")
    assert "every send answers 503" in read_log(api_proc)
    wait_for_log(worker, "this worker claims nothing until Redis answers")
    assert api.client.get("/ready").status_code == 503
    assert api.post().status_code == 503  # and nothing is stored: there is nowhere to store

    redis_factory(port=port)
    ids = api.enqueue(3)
    results = api.wait_terminal(ids)
    all_succeeded(results)
    counts = Counts.of(ids, smtp.handler).report("started before Redis")
    assert (counts.lost, counts.duplicated) == (0, 0)


# -- 4. kill -9 while a retry waits for its backoff ---------------------------------------


def test_crash_during_backoff_keeps_the_retry_and_its_count(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    smtp = smtp_factory(handler=RecordingHandler(replies=["450 4.2.1 mailbox busy"]))
    settings = make_settings(smtp_port=smtp.port, retry_backoff_seconds=2,
                             retry_backoff_max_seconds=2)  # fmt: skip
    api = Api(procs.api(settings))
    worker_a = procs.worker(settings)
    [task_id] = api.enqueue(1)

    def waiting_for_retry() -> bool:
        r = api.result(task_id)
        return r["status"] == "pending" and r["attempts"] == 1 and bool(r.get("next_attempt_at"))

    wait_until(waiting_for_retry, what="first attempt failed, retry scheduled", proc=worker_a)
    sigkill(worker_a)
    procs.worker(settings)

    results = api.wait_terminal([task_id])
    counts = Counts.of([task_id], smtp.handler).report("crash during backoff")
    assert results[task_id]["status"] == "success"
    assert results[task_id]["attempts"] == 2
    assert outcomes(results[task_id]) == ["retry", "success"]
    assert counts.lost == 0
    assert counts.duplicated == 0


# -- 5. SMTP server down, then up -----------------------------------------------------------


def test_smtp_outage_waits_until_the_server_returns(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer]
) -> None:
    with refused_port() as down:  # bound, not listening: connections are refused
        settings = make_settings(smtp_port=port_of(down), max_attempts=5,
                                 smtp_probe_max_seconds=0.5)  # fmt: skip
        api = Api(procs.api(settings))
        worker = procs.worker(settings)
        ids = api.enqueue(5)
        # The relay's outage is not the mails' fault: they wait, using up no attempt (more
        # in tests/e2e/test_relay_faults.py).
        wait_for_log(worker, "connection refused")
        smtp = smtp_factory(sock=down)  # the server comes up on that very socket

    results = api.wait_terminal(ids)
    counts = Counts.of(ids, smtp.handler).report("SMTP outage")
    all_succeeded(results)
    assert all(r["attempts"] == 1 for r in results.values()), results
    assert counts.lost == 0
    assert counts.duplicated == 0
