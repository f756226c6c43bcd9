"""The worker's metrics observer (worker.metrics) on a real worker sending to a real SMTP
server: every attempt is counted once, under the outcome that ended it, and the gauges
read the loop's and the pool's state. The port it is served on: tests/e2e."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from prometheus_client.exposition import generate_latest

from emailq.models import Job
from emailq.queue import Queue
from emailq.settings import Settings
from tests.helpers.metrics import Samples, family, parse
from tests.helpers.polling import read_log, wait_for
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SlowReplyHandler, SmtpServer
from tests.helpers.workers import running, scripted
from worker.metrics import WorkerMetrics, code_class

Factory = Callable[..., SmtpServer]


def read(metrics: WorkerMetrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def sends(samples: Samples) -> dict[tuple[str, str], float]:
    """emailq_worker_sends_total as (outcome, code_class) -> count."""
    found = family(samples, "emailq_worker_sends_total")
    return {(k.split('outcome="')[1].split('"')[0], k.split('code_class="')[1].split('"')[0]): v
            for k, v in found.items()}  # fmt: skip


@pytest.mark.parametrize(
    ("code", "label"),
    [(250, "2xx"), (450, "4xx"), (550, "5xx"), (None, "none"), (-1, "none"), (999, "none")],
)
def test_code_class(code: int | None, label: str) -> None:
    assert code_class(code) == label


async def test_each_attempt_is_counted_once_under_its_outcome(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    smtp = scripted(smtp_factory, ["450 4.2.1 mailbox busy"])
    metrics = WorkerMetrics()
    settings = make_settings(smtp_port=smtp.port, worker_concurrency=1)
    async with running(settings, metrics) as run:
        metrics.watch(run.worker)
        await run.send()  # 450 (retry), then 250
        smtp.handler.replies.append("550 5.1.1 no such user")
        await run.send()  # failed for good
        smtp.handler.replies.append("451 4.3.0 slow down")  # the relay's, not the mail's
        await run.send()  # deferred, then 250
        await run.stop()
        samples = read(metrics)
    assert sends(samples) == {("retry", "4xx"): 1, ("success", "2xx"): 2, ("failed", "5xx"): 1,
                              ("deferred", "4xx"): 1}  # fmt: skip
    durations = family(samples, "emailq_worker_send_duration_seconds_count")
    assert sorted(durations.values()) == [1, 1, 1, 2]
    assert samples["emailq_worker_claimed_jobs_total"] == 5  # one claim per attempt
    assert samples["emailq_worker_claim_duration_seconds_count"] == \
        samples["emailq_worker_claims_total"]  # fmt: skip
    assert samples["emailq_worker_inflight_sends"] == 0
    assert samples['emailq_worker_smtp_connections{state="busy"}'] == 0
    assert len(smtp.handler.received) == 2  # counted at the relay: the two sent, once each


async def test_jobs_whose_worker_died_are_counted_when_put_back(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    smtp = scripted(smtp_factory)
    settings = make_settings(smtp_port=smtp.port)
    queue = Queue.from_settings(settings)
    try:  # a worker that claims two jobs and dies: its 50 ms leases lapse
        for n in range(2):
            await queue.enqueue(f"held-{n}", Job(to="user@example.com", subject="Hi",
                                                 text="Hello"), request_id="r")  # fmt: skip
        assert len((await queue.claim("host:1:dead00", 2, 50)).jobs) == 2
    finally:
        await queue.close()
    await asyncio.sleep(0.2)
    metrics = WorkerMetrics()
    async with running(settings, metrics) as run:
        records = [await run.settled(f"held-{n}") for n in range(2)]
    assert [(r.status, r.attempts) for r in records] == [("success", 2)] * 2
    assert read(metrics)["emailq_worker_leases_reclaimed_total"] == 2
    assert len(smtp.handler.received) == 2


@pytest.mark.parametrize(("policy", "after"), [("retry", ("success", "2xx")), ("fail", None)])
async def test_an_unknown_outcome_is_counted_as_unknown_not_also_as_retry_or_failed(
    make_settings: Callable[..., Settings],
    smtp_factory: Factory,
    policy: str,
    after: tuple[str, str] | None,
) -> None:
    # The loop reports an unknown outcome, then the retry or failure it leads to, for the
    # same attempt: one attempt, one count.
    smtp = smtp_factory(handler=SlowReplyHandler(silent=1))
    metrics = WorkerMetrics()
    settings = make_settings(smtp_port=smtp.port, smtp_timeout_seconds=0.5,
                             smtp_data_timeout_seconds=1.0, on_unknown_outcome=policy,
                             worker_concurrency=1)  # fmt: skip
    async with running(settings, metrics) as run:
        await run.send()
    expected = {("unknown", "none"): 1} | ({after: 1} if after else {})
    assert sends(read(metrics)) == expected


async def test_the_gauges_read_the_loop_and_the_pool_while_a_send_is_in_flight(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    smtp = smtp_factory(handler=SlowReplyHandler(reply_after=1.0))
    metrics = WorkerMetrics()
    async with running(make_settings(smtp_port=smtp.port, worker_concurrency=2), metrics) as run:
        metrics.watch(run.worker)
        [task_id] = await run.submit()
        # The relay holds its reply to the end of DATA for a second: the send is under way.
        await wait_for(lambda: smtp.handler.data_calls == 1, "the message to reach the relay")
        during = read(metrics)
        await run.settled(task_id)
    assert during["emailq_worker_inflight_sends"] == 1
    assert during['emailq_worker_smtp_connections{state="busy"}'] == 1
    assert during['emailq_worker_smtp_connections{state="idle"}'] == 0


def test_a_taken_metrics_port_is_one_line_and_exit_2(
    procs: Procs, make_settings: Callable[..., Settings]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AssertionError, match="process exited"):
            procs.worker(make_settings(worker_metrics_port=port))
        worker = procs.started[-1]
        assert worker.wait(timeout=10) == 2
    log = read_log(worker)
    assert f"WORKER_METRICS_PORT={port}: cannot listen on 127.0.0.1" in log
    assert "Traceback" not in log
