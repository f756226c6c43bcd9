"""The worker in-process against a real Redis and real aiosmtpd servers."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from emailq.models import ClaimedJob, EventType, Job, RelayState, Status, TaskRecord
from emailq.queue import EnqueueItem, Keys
from emailq.settings import Settings
from tests.helpers.polling import wait_for
from tests.helpers.ports import port_of, refused_port
from tests.helpers.queues import preload
from tests.helpers.smtpd import Authenticator, EnvelopeHandler, SmtpServer
from tests.helpers.workers import Factory, TrackingHandler, deliver, running, scripted, tracked
from worker.__main__ import build_worker
from worker.loop import _cancel_all

# A relay outage fails waiting mail after 1 s, probed every half second.
SHORT_OUTAGE = {"smtp_outage_max_seconds": 1, "smtp_probe_max_seconds": 0.5}

LogCapture = pytest.LogCaptureFixture

# Another worker's lease on attempt 2 (tokens are worker:attempt:claim).
OTHER_LEASE = "other-worker:2:1764763200000000"


@pytest.fixture
def worker_log(caplog: LogCapture) -> LogCapture:
    caplog.set_level(logging.INFO, logger="emailq.worker")
    return caplog


def codes(record: TaskRecord) -> list[int | None]:
    return [entry.code for entry in record.log]


# -- delivery ----------------------------------------------------------------------------


async def test_plain_smtp_delivers(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    [record] = await deliver(make_settings(), to="user@example.com", cc=["cc@example.com"],
                             bcc=["hidden@example.com"], subject="안녕 {0}")  # fmt: skip

    assert (record.status, record.attempts, codes(record)) == (Status.SUCCESS, 1, [250])
    assert record.sent_at is not None
    [mail] = smtp.handler.received
    assert mail.mail_from == "noreply@example.com"
    assert mail.rcpt_tos == ["user@example.com", "cc@example.com", "hidden@example.com"]
    assert mail.message["Subject"] == "안녕 {0}"
    assert "Bcc" not in mail.message


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls_modes_deliver(
    make_settings: Callable[..., Settings], smtp_factory: Factory,
    server_tls: ssl.SSLContext, ca_file: Path, security: str,
) -> None:  # fmt: skip
    mode = "starttls" if security == "starttls" else "implicit_tls"
    server = smtp_factory(**{mode: server_tls})
    settings = make_settings(smtp_port=server.port, smtp_security=security, smtp_ca_file=ca_file)

    [record] = await deliver(settings)

    assert record.status is Status.SUCCESS
    assert len(server.handler.received) == 1


async def test_tls_with_an_untrusted_certificate_does_not_deliver(
    make_settings: Callable[..., Settings], smtp_factory: Factory, server_tls: ssl.SSLContext
) -> None:
    server = smtp_factory(implicit_tls=server_tls)
    settings = make_settings(smtp_port=server.port, smtp_security="tls", **SHORT_OUTAGE)

    [record] = await deliver(settings)

    # The relay is unusable, not the mail: no attempt used, failed at the outage ceiling.
    assert (record.status, record.attempts) == (Status.FAILED, 0)
    assert (record.reason or "").startswith("relay unreachable for 1s: ")
    assert "CERTIFICATE_VERIFY_FAILED" in (record.reason or "")
    assert server.handler.received == []


@pytest.mark.parametrize(("password", "status"), [("s3cret", "success"), ("wrong", "failed")])
async def test_auth(
    make_settings: Callable[..., Settings], smtp_factory: Factory, password: str, status: str
) -> None:
    server = smtp_factory(auth=Authenticator("mailer", "s3cret"))
    settings = make_settings(smtp_port=server.port, smtp_user="mailer", smtp_pass=password,
                             **SHORT_OUTAGE)  # fmt: skip

    [record] = await deliver(settings)

    assert record.status == status
    if status == "failed":
        # A refused login is the relay's (or our settings') problem, not the mail's: no
        # attempt used; it waited for the outage ceiling. (`python -m worker` exits at
        # startup on a 535 instead; see tests/e2e/test_relay_faults.py.)
        assert record.attempts == 0
        assert (record.reason or "").startswith("relay unreachable for 1s: 535")
        assert codes(record)[0] == 535
    assert len(server.handler.received) == (status == "success")


# -- retries -----------------------------------------------------------------------------


async def test_4xx_is_retried_until_it_succeeds(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server = scripted(smtp_factory, ["450 4.2.1 mailbox busy", "450 4.2.1 mailbox busy"])

    [record] = await deliver(make_settings(smtp_port=server.port, max_attempts=3))

    assert (record.status, record.attempts, codes(record)) == (Status.SUCCESS, 3, [450, 450, 250])
    assert [e.outcome for e in record.log] == ["retry", "retry", "success"]
    assert len(server.handler.received) == 1


async def test_4xx_until_out_of_attempts_fails(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server = scripted(smtp_factory, ["450 4.2.1 mailbox busy"] * 3)

    [record] = await deliver(make_settings(smtp_port=server.port, max_attempts=2))

    assert (record.status, record.attempts, codes(record)) == (Status.FAILED, 2, [450, 450])
    assert "450" in (record.reason or "")
    assert server.handler.data_calls == 2


async def test_5xx_fails_at_once(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server = scripted(smtp_factory, ["550 5.1.1 no such user"])

    [record] = await deliver(make_settings(smtp_port=server.port))

    assert (record.status, record.attempts, codes(record)) == (Status.FAILED, 1, [550])
    assert "550" in (record.reason or "")
    assert server.handler.data_calls == 1


async def test_a_non_ascii_address_the_relay_cannot_take_fails_alone_and_pauses_nothing(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    # Without SMTPUTF8 such a mail can never be sent through this relay: it is the mail's
    # problem, not the relay's. Taken for an outage, it paused every send each time it was
    # claimed and waited out SMTP_OUTAGE_MAX_SECONDS.
    server = smtp_factory(handler=TrackingHandler(), smtputf8=False)
    settings = make_settings(smtp_port=server.port, **SHORT_OUTAGE)
    async with running(settings) as run:
        [poison] = await run.submit(to="用户@example.com")
        [plain] = await run.submit(to="user@example.com")
        records = {t: await run.settled(t) for t in (poison, plain)}
        breaker = run.worker.relay.breaker

    assert (records[poison].status, records[poison].attempts) == (Status.FAILED, 1)
    assert records[poison].reason is not None
    assert records[poison].reason.startswith("permanent error after 1 attempt(s): ")
    assert "SMTPUTF8" in records[poison].reason
    assert [e.outcome for e in records[poison].log] == ["failed"]  # never "deferred"
    assert records[plain].status is Status.SUCCESS
    assert breaker.state is RelayState.CLOSED
    assert breaker.error is None
    assert server.handler.task_ids() == [plain]


@pytest.mark.parametrize(("reply", "outcomes"), [
    ("450 4.1.8 Sender domain has no MX", ["retry", "retry", "failed"]),
    ("451 4.7.1 Slow down", ["deferred"]),  # throttling: the relay's, no attempt used
])  # fmt: skip
async def test_a_4xx_to_mail_from_is_retried_naming_the_sender_unless_it_is_throttling(
    make_settings: Callable[..., Settings], smtp_factory: Factory, reply: str,
    outcomes: list[str],
) -> None:  # fmt: skip
    server = smtp_factory(handler=EnvelopeHandler(refuse_sender=reply))
    settings = make_settings(smtp_port=server.port, max_attempts=3, **SHORT_OUTAGE)

    [record] = await deliver(settings)

    assert record.status is Status.FAILED
    assert [e.outcome for e in record.log][: len(outcomes)] == outcomes
    named = "sender noreply@example.com refused at MAIL FROM: "
    assert (named in (record.reason or "")) is (outcomes[0] == "retry"), record.reason
    assert server.handler.received == []


async def test_refused_connection_uses_no_attempt_and_fails_at_the_outage_ceiling(
    make_settings: Callable[..., Settings],
) -> None:
    with refused_port() as nothing_listens:
        settings = make_settings(smtp_port=port_of(nothing_listens), max_attempts=3,
                                 **SHORT_OUTAGE)  # fmt: skip
        [record] = await deliver(settings)

    assert (record.status, record.attempts) == (Status.FAILED, 0)
    assert record.log[0].outcome == "deferred"
    assert (record.reason or "").startswith("relay unreachable for 1s: ")
    assert "Connect" in (record.reason or "")


# -- connections and concurrency ---------------------------------------------------------


async def test_connections_are_reused(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server = scripted(smtp_factory)

    records = await deliver(make_settings(smtp_port=server.port, worker_concurrency=2), 20)

    assert {r.status for r in records} == {Status.SUCCESS}
    assert len(server.handler.received) == 20
    assert server.handler.connections() <= 2


async def test_a_connection_survives_a_4xx_reply(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server, handler = tracked(smtp_factory, ["450 4.2.1 mailbox busy"])

    records = await deliver(make_settings(smtp_port=server.port, worker_concurrency=1), 5)

    assert {r.status for r in records} == {Status.SUCCESS}
    assert handler.data_calls == 6
    assert len(handler.peers) == 1  # the refused transaction's connection, RSET and reused


async def test_sends_run_concurrently_up_to_the_limit(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server, handler = tracked(smtp_factory, delay=0.3)

    records = await deliver(make_settings(smtp_port=server.port, worker_concurrency=4), 10)

    assert {r.status for r in records} == {Status.SUCCESS}
    assert handler.max_in_flight == 4


async def test_jobs_held_ahead_wait_for_a_send_slot_and_cannot_be_cancelled(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    # WORKER_PREFETCH: the worker holds more jobs than it sends at once. The extra ones wait,
    # leased, for a send slot; being leased, they answer a cancel as 'sending' (the price
    # the setting's documentation names) and are sent, once.
    server, handler = tracked(smtp_factory, delay=0.3)
    settings = make_settings(smtp_port=server.port, worker_concurrency=2, worker_prefetch=3)
    ids = await preload(settings, ["Hi"] * 12)
    client = redis.Redis.from_url(settings.redis_url)
    leases = Keys(settings.redis_key_prefix).leases
    async with running(settings) as run:
        await wait_for(lambda: client.zcard(leases) == 5, "the worker to hold 2 + 3 jobs")
        answer = await run.queue.cancel(ids[4])  # leased: held ahead, or sending
        records = [await run.settled(task_id) for task_id in ids]
    client.close()

    assert answer == "sending"
    assert {r.status for r in records} == {Status.SUCCESS}
    assert sorted(m.task_id for m in handler.received) == sorted(ids)
    assert handler.max_in_flight == 2


async def test_an_idle_burst_goes_to_every_idle_worker_even_with_jobs_held_ahead(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    # WORKER_PREFETCH builds its hold on a busy worker only: an idle worker claims for its
    # free send slots. A burst (one-time codes after a quiet spell) then goes out through
    # every idle worker, not into the hold of the first one to wake while the other idles.
    server, handler = tracked(smtp_factory, delay=0.5)
    settings = make_settings(smtp_port=server.port, worker_concurrency=2, worker_prefetch=8)
    client = redis.Redis.from_url(settings.redis_url)

    def blocked() -> int:
        return sum(c["cmd"] == "blpop" for c in client.client_list())

    async with running(settings) as one, running(settings) as two:
        await wait_for(lambda: blocked() == 2, "both workers to wait for work")
        burst = [EnqueueItem(str(uuid.uuid4()), Job(to="user@example.com", subject="code",
                                                    text="123456"), "req")
                 for _ in range(4)]  # fmt: skip
        await one.queue.enqueue_many(burst)  # one call: all four ready at once
        ids = [item.task_id for item in burst]
        records = [await one.settled(task_id) for task_id in ids]
        claimed = [e for e in await one.queue.events(count=1000) if e.type == EventType.CLAIMED]
    client.close()

    assert {r.status for r in records} == {Status.SUCCESS}
    by_worker = collections.Counter(e.worker for e in claimed)
    assert by_worker == {one.worker.worker_id: 2, two.worker.worker_id: 2}
    assert len(handler.received) == 4


@pytest.mark.parametrize(("held", "asked", "ahead"), [
    (2, 0, 0),  # a send slot is free: the claim loop fills it
    (2, 1, 0),  # the same with a job asked ahead on the way (counting it let the hold pass
                # its limit: 5 held at a limit of 4 with a slow Redis and a deferral)
    (3, 0, 1),  # every send slot holds a job and the hold is empty: one more
    (3, 1, 0),  # the hold's one place is already asked for
    (4, 0, 0),  # the hold is full
])  # fmt: skip
async def test_a_refill_asks_ahead_only_while_every_send_slot_holds_a_job(
    make_settings: Callable[..., Settings], held: int, asked: int, ahead: int
) -> None:
    # The rule that keeps the hold within WORKER_CONCURRENCY + WORKER_PREFETCH (here 3 + 1),
    # read at the moment a finish asks for its refill; the finishing job still counts.
    worker = build_worker(make_settings(worker_concurrency=3, worker_prefetch=1))
    try:
        job = Job(to="user@example.com", subject="s", text="t")
        worker._inflight = {f"t{i}": ClaimedJob(task_id=f"t{i}", token=f"w:1:{i}", attempt=1,
                                                request_id=None, job=job)
                            for i in range(held)}  # fmt: skip
        worker._asked_ahead = asked
        assert worker._claim_ahead() == ahead
        assert worker._asked_ahead == asked + ahead  # counted until its claim comes back
    finally:
        await worker.queue.close()


def eval_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


async def test_an_idle_worker_blocks_instead_of_polling(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings()
    client = redis.Redis.from_url(settings.redis_url)
    before = eval_calls(client)
    async with running(settings) as run:
        await asyncio.sleep(1.5)
        idle_calls = eval_calls(client) - before

        [record] = await run.send()
    client.close()

    assert idle_calls <= 4
    assert record.status is Status.SUCCESS
    assert len(smtp.handler.received) == 1


async def test_a_busy_worker_needs_about_one_script_call_per_mail(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    # Each finish claims the job that takes over its slot in the same script, so a backlog
    # drains with one call per mail, not a finish and a claim.
    settings = make_settings(worker_concurrency=4)
    ids = await preload(settings, ["Hi"] * 40)
    client = redis.Redis.from_url(settings.redis_url)
    before = eval_calls(client)
    async with running(settings) as run:
        records = [await run.settled(task_id) for task_id in ids]
        calls = eval_calls(client) - before
    client.close()

    assert {r.status for r in records} == {Status.SUCCESS}
    assert sorted(m.task_id for m in smtp.handler.received) == sorted(ids)
    assert calls <= 40 + 10  # 40 finishes; first claim, renewals and the last empty claims


async def test_result_ttl_success_seconds_shortens_what_the_worker_records(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    # The worker records every success, so it is the one that must apply the shorter TTL.
    server = scripted(smtp_factory, ["550 5.1.1 no such user"])
    settings = make_settings(smtp_port=server.port, result_ttl_seconds=3600,
                             result_ttl_success_seconds=60)  # fmt: skip
    async with running(settings) as run:
        records = [await run.settled(t) for t in await run.submit(2)]  # one gets the 550
        ttl = {r.status: await run.queue.redis.ttl(run.queue.keys.task(r.task_id))
               for r in records}  # fmt: skip

    assert set(ttl) == {Status.FAILED, Status.SUCCESS}
    assert 60 < ttl[Status.FAILED] <= 3600  # a dead letter is kept for requeue
    assert 0 < ttl[Status.SUCCESS] <= 60


# -- identity, duplicates, logs ----------------------------------------------------------


async def test_message_id_is_the_task_id_and_done_tasks_are_not_resent(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings()
    keys = Keys(settings.redis_key_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    async with running(settings) as run:
        [first] = await run.submit()
        await run.settled(first)
        client.rpush(keys.lane("default"), first)  # a stale duplicate of a sent task
        client.lpush(keys.wake, "1")
        [second] = await run.send()
        state = await run.state(first)
    client.close()

    assert second.status is Status.SUCCESS
    assert smtp.handler.task_ids() == [first, second.task_id]
    assert smtp.handler.received[0].message_id == f"<{first}@example.com>"
    assert state == (Status.SUCCESS, 1)


async def test_the_worker_keeps_a_success_for_result_ttl_success_seconds(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    # The worker writes the final status, so it is the one that must know this setting.
    settings = make_settings(result_ttl_seconds=3600, result_ttl_success_seconds=60)
    async with running(settings) as run:
        [record] = await run.send()
        ttl = await run.queue.redis.ttl(run.queue.keys.task(record.task_id))

    assert record.status is Status.SUCCESS
    assert 0 < ttl <= 60


async def test_log_lines_of_a_task_carry_its_request_id(
    make_settings: Callable[..., Settings], smtp_factory: Factory, worker_log: LogCapture
) -> None:
    server = scripted(smtp_factory, ["450 4.2.1 mailbox busy"])

    [record] = await deliver(make_settings(smtp_port=server.port))

    lines = [r for r in worker_log.records if getattr(r, "task_id", None) == record.task_id]
    assert len(lines) >= 2  # the retry and the success
    assert {getattr(r, "request_id", None) for r in lines} == {record.request_id}
    assert record.request_id == f"req-{record.task_id[:8]}"


# -- shutdown ----------------------------------------------------------------------------


async def test_stop_lets_sends_in_flight_finish(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    server = scripted(smtp_factory, delay=0.5)
    handler = server.handler
    async with running(make_settings(smtp_port=server.port, worker_concurrency=4)) as run:
        in_flight = await run.submit(4)
        waiting = await run.submit(2)
        await wait_for(lambda: handler.data_calls == 4, "4 sends in flight")

        await run.stop()  # what SIGTERM does

        assert run.task.done()
        assert sorted(handler.task_ids()) == sorted(in_flight)
        assert [await run.state(t) for t in in_flight] == [(Status.SUCCESS, 1)] * 4
        assert [await run.state(t) for t in waiting] == [(Status.PENDING, 0)] * 2  # never claimed


async def test_a_lease_lost_mid_data_lets_the_late_success_count_without_a_warning(
    make_settings: Callable[..., Settings], smtp_factory: Factory, worker_log: LogCapture
) -> None:
    # The message was already sent when the lease went: its success is recorded (so the new
    # owner does not send it again), and since no outcome was lost, nothing is warned.
    server = scripted(smtp_factory, delay=1.0)
    settings = make_settings(smtp_port=server.port, job_lease_seconds=1)
    keys = Keys(settings.redis_key_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    async with running(settings) as run:
        [task_id] = await run.submit()
        await wait_for(lambda: server.handler.data_calls == 1, "the send to start")
        # Another worker took the task over, with a lease of its own.
        client.hset(keys.task(task_id), "lease", OTHER_LEASE)
        client.zadd(keys.leases, {task_id: int(time.time() * 1000) + 60_000})
        record = await run.settled(task_id)
    client.close()

    assert record.status is Status.SUCCESS
    assert [r.getMessage() for r in worker_log.records if r.levelno >= logging.WARNING] == []


async def test_a_send_whose_task_another_worker_finished_warns_once_of_a_duplicate(
    make_settings: Callable[..., Settings], smtp_factory: Factory, worker_log: LogCapture
) -> None:
    server = scripted(smtp_factory, delay=1.0)
    settings = make_settings(smtp_port=server.port, job_lease_seconds=1)
    keys = Keys(settings.redis_key_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    async with running(settings) as run:
        [task_id] = await run.submit()
        await wait_for(lambda: server.handler.data_calls == 1, "the send to start")
        # Its new owner already delivered it: this worker's copy is a second one.
        client.hset(keys.task(task_id), mapping={"lease": OTHER_LEASE, "status": "success"})
        await wait_for(lambda: len(server.handler.received) == 1, "the first copy answered")
        await run.stop()
    client.close()

    warned = [r for r in worker_log.records if r.levelno >= logging.WARNING]
    assert [getattr(r, "task_id", None) for r in warned] == [task_id]
    assert "duplicate" in warned[0].getMessage()


async def test_a_send_whose_task_redis_lost_says_so_and_not_that_it_may_be_a_duplicate(
    make_settings: Callable[..., Settings], smtp_factory: Factory, worker_log: LogCapture
) -> None:
    # Redis restarted without its data while the mail was out (an operator saw "this copy
    # may be a duplicate" for 7 mails of which none was sent twice).
    server = scripted(smtp_factory, delay=1.0)
    settings = make_settings(smtp_port=server.port)
    keys = Keys(settings.redis_key_prefix)
    client = redis.Redis.from_url(settings.redis_url)
    async with running(settings) as run:
        [task_id] = await run.submit()
        await wait_for(lambda: server.handler.data_calls == 1, "the send to start")
        client.delete(keys.task(task_id))
        await wait_for(lambda: len(server.handler.received) == 1, "the copy answered")
        await run.stop()
    client.close()

    warned = [r for r in worker_log.records if r.levelno >= logging.WARNING]
    assert [getattr(r, "task_id", None) for r in warned] == [task_id]
    assert warned[0].getMessage() == ("outcome success not recorded: the task is no longer in "
                                      "Redis (did Redis lose its data?)")  # fmt: skip


# Keeps Redis busy for ARGV[1] microseconds: every other client's command waits behind it,
# as behind a stalled or overloaded Redis.
_STALL = """local t = redis.call('TIME'); local start = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > tonumber(ARGV[1])"""


async def test_a_finish_whose_reply_came_too_late_is_retried_without_a_duplicate_warning(
    make_settings: Callable[..., Settings],
    smtp_factory: Factory,
    worker_log: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis stalls while the worker records a send: the call times out and is retried, but
    # Redis runs the first call once the stall ends, and the retry finds the success
    # recorded. It must not warn that "this copy may be a duplicate": one copy was sent.
    # The worker's reads may take as long as its longest blocking wait (5 s, then 6.5 s to
    # time out); a shorter wait brings that under the stall without a stall of seconds more.
    import worker.__main__
    import worker.loop

    for module in (worker.loop, worker.__main__):
        monkeypatch.setattr(module, "MAX_BLOCK_SECONDS", 0.2)  # reads time out at 1.7 s
    server = scripted(smtp_factory, delay=1.0)
    settings = make_settings(smtp_port=server.port, redis_timeout_seconds=0.5)
    client = redis.Redis.from_url(settings.redis_url)
    async with running(settings) as run:
        # A first mail opens the connections the second one's calls will use: a call that
        # times out opening its connection never reached Redis, and is no test of this.
        await run.settled((await run.submit())[0])
        [task_id] = await run.submit()
        await wait_for(lambda: server.handler.data_calls == 2, "the send to start")
        # Redis busy from 0 to 3.5 s: the relay answers at about 1 s, and that finish call
        # times out at about 2.7 s, then its retries until Redis answers again.
        stall = asyncio.get_running_loop().run_in_executor(
            None, lambda: client.eval(_STALL, 0, 3_500_000)
        )
        await stall
        record = await run.settled(task_id)
    client.close()

    assert record.status is Status.SUCCESS
    assert [(e.attempt, e.outcome) for e in record.log] == [(1, "success")]
    assert len(server.handler.received) == 2
    warned = [r.getMessage() for r in worker_log.records if r.levelno >= logging.WARNING]
    assert any("Redis unavailable during finish" in m for m in warned)  # it was retried
    assert [m for m in warned if "Redis unavailable" not in m] == []  # and nothing else


# -- robustness --------------------------------------------------------------------------


async def test_an_unexpected_error_fails_the_task_at_once_and_the_worker_goes_on(
    make_settings: Callable[..., Settings], smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.loop

    real_build = worker.loop.render

    def build(task_id: str, job: Any, mail_from: str) -> Any:
        if job.subject == "boom":
            raise RuntimeError("cannot build")
        return real_build(task_id, job, mail_from)

    monkeypatch.setattr(worker.loop, "render", build)
    async with running(make_settings()) as run:
        [broken] = await run.send(subject="boom")
        [fine] = await run.send(subject="fine")

    assert (broken.status, broken.attempts) == (Status.FAILED, 1)
    assert "internal error: RuntimeError" in (broken.reason or "")
    assert fine.status == Status.SUCCESS
    assert [m.message["Subject"] for m in smtp.handler.received] == ["fine"]


async def test_an_unreadable_stored_job_is_failed_and_the_others_are_sent(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(worker_concurrency=2)
    ids = await preload(settings, [f"n{n}" for n in range(6)])
    # Task 3 is reached by a finish's refill claim, not the first claim of two.
    store = redis.Redis.from_url(settings.redis_url)
    store.hset(Keys().task(ids[3]), "job", "not json")
    store.close()
    async with running(settings) as run:
        records = [await run.settled(task_id) for task_id in ids]
        assert not run.task.done()  # the worker is still running

    assert [r.status for r in records] == [Status.SUCCESS] * 3 + [Status.FAILED] + [
        Status.SUCCESS
    ] * 2
    assert "unreadable" in (records[3].reason or "")
    assert sorted(m.message["Subject"] for m in smtp.handler.received) == [
        "n0", "n1", "n2", "n4", "n5"
    ]  # fmt: skip


async def test_a_crashed_claim_loop_ends_run_with_the_error(
    make_settings: Callable[..., Settings], smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_claim(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in claim")

    worker = build_worker(make_settings(worker_concurrency=1))
    monkeypatch.setattr(worker.queue, "claim", broken_claim)
    try:
        # run() drains and re-raises, so `python -m worker` exits non-zero and is restarted.
        with pytest.raises(RuntimeError, match="bug in claim"):
            await asyncio.wait_for(worker.run(), 30)
    finally:
        await worker.queue.close()


async def test_stopping_ends_a_loop_whose_cancel_was_lost() -> None:
    # On Python 3.11 a cancel that races a timeout inside redis-py or asyncio.wait_for can
    # come out as a TimeoutError; the renewer and relay loops take that for an outage and
    # go on. Cancelled once, such a loop kept Worker.run() from returning: after SIGSTOP and
    # SIGCONT (every timer due at once) `python -m worker` then ignored SIGTERM for good.
    cancels = 0

    async def loop_that_loses_one_cancel() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise
                # taken for a timeout, as the race does

    task = asyncio.create_task(loop_that_loses_one_cancel())
    await asyncio.sleep(0)  # let it start waiting

    await asyncio.wait_for(_cancel_all([task]), 30)  # bounds a failure only

    assert task.cancelled()
    assert cancels == 2
