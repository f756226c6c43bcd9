"""The relay's side: error kinds, the circuit breaker, the shared send rate and deferrals
(real Redis for the scripts; the breaker's clock is a plain counter)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import aiosmtplib
import pytest
from redis.exceptions import OutOfMemoryError

from emailq.devtools.redis_server import RedisServer
from emailq.errors import RelayThrottled, RelayUnavailable, SendError
from emailq.models import Attempt, Job, RelayState, Status
from emailq.queue import Queue
from emailq.relay import Deferral, RelayStore
from worker.breaker import CircuitBreaker
from worker.relay import duration
from worker.sender import convert_error

# -- which failures are the relay's -----------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPDataError(421, "4.7.0 Try again later"),
        aiosmtplib.SMTPSenderRefused(451, "4.7.500 Server busy", "me@example.com"),
        aiosmtplib.SMTPDataError(454, "Throttling failure: Maximum sending rate exceeded"),
        aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(421, "slow down", "a@example.com")]
        ),
    ],
)
def test_throttling_replies_are_throttled_not_attempts(exc: Exception) -> None:
    err = convert_error(exc)
    assert isinstance(err, RelayThrottled)
    assert not err.permanent


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPDataError(450, "4.2.1 mailbox busy"),
        aiosmtplib.SMTPRecipientsRefused(
            [
                aiosmtplib.SMTPRecipientRefused(451, "later", "a@example.com"),
                aiosmtplib.SMTPRecipientRefused(550, "no such user", "b@example.com"),
            ]
        ),
    ],
)
def test_answers_about_the_mail_stay_plain_send_errors(exc: Exception) -> None:
    assert type(convert_error(exc)) is SendError


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPReadTimeoutError("read timed out"),
        aiosmtplib.SMTPServerDisconnected("server closed the connection"),
        ConnectionResetError("reset by peer"),
    ],
)
def test_a_drop_before_data_is_the_relays_and_after_it_is_not(exc: Exception) -> None:
    assert isinstance(convert_error(exc, before_data=True), RelayUnavailable)
    after = convert_error(exc, before_data=False)
    assert type(after) is SendError
    assert not after.permanent


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPAuthenticationError(535, "bad credentials"),
        aiosmtplib.SMTPConnectResponseError(554, "no service for you"),
        aiosmtplib.SMTPConnectError("Error connecting to x on port 1: refused"),
    ],
)
def test_anything_while_connecting_is_the_relays_even_a_5xx(exc: Exception) -> None:
    err = convert_error(exc, connecting=True)
    assert isinstance(err, RelayUnavailable)
    assert not err.permanent  # a 5xx greeting or login says nothing about the mail
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        assert str(err) == f"{exc.code} {exc.message}"


# -- the breaker ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_once_probes_with_doubling_delays_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(first_delay=1, max_delay=4, clock=clock, wall_clock=clock)
    assert breaker.closed.is_set()

    clock.now += 5
    assert breaker.failure("ConnectionRefusedError") is True
    assert breaker.changed_at == 105  # the outage's start, which the stats call "since"
    assert breaker.failure("ConnectionRefusedError again") is False  # one change, one log
    assert (breaker.state, breaker.closed.is_set()) == (RelayState.OPEN, False)
    assert 0.8 <= breaker.seconds_to_probe() <= 1.2
    assert not breaker.probe_due()

    delays = []
    for _ in range(4):
        clock.now += breaker.seconds_to_probe()
        assert breaker.probe_due()
        breaker.probing()
        assert breaker.state is RelayState.HALF_OPEN
        breaker.probe_failed("still refused")
        delays.append(breaker.seconds_to_probe())
    for delay, expected in zip(delays, [2, 4, 4, 4], strict=True):  # doubling, capped
        assert 0.8 * expected <= delay <= 1.2 * expected, delays
    assert breaker.outage_seconds() == clock.now - 105.0
    # Failed probes are the same outage: "since" stayed at its start (it moved every probe).
    assert breaker.changed_at == 105

    breaker.probing()
    clock.now += 1
    breaker.probe_succeeded()
    assert (breaker.state, breaker.closed.is_set(), breaker.error) == (RelayState.CLOSED, True,
                                                                       None)  # fmt: skip
    assert breaker.outage_seconds() == 0
    assert breaker.changed_at == clock.now  # back: "since" is when it closed


def test_only_a_delivered_mail_makes_the_next_outage_probe_quickly() -> None:
    clock = Clock()
    breaker = CircuitBreaker(first_delay=1, max_delay=8, clock=clock)
    for _ in range(2):  # the relay lets probes in but fails every send
        breaker.failure("timeout before DATA")
        clock.now += breaker.seconds_to_probe()
        breaker.probing()
        breaker.probe_failed("refused")
        clock.now += breaker.seconds_to_probe()
        breaker.probing()
        breaker.probe_succeeded()
    breaker.failure("timeout before DATA")
    assert breaker.seconds_to_probe() > 2 * 1.2  # still backed off
    clock.now += breaker.seconds_to_probe()
    breaker.probing()
    breaker.probe_succeeded()
    breaker.delivered()
    breaker.failure("refused")
    assert breaker.seconds_to_probe() <= 1.2


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (2, "2s"), (90, "1m30s"), (3600, "1h"), (14400, "4h")]
)
def test_durations_read_short(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# -- the breaker state workers publish (relay_state.lua) --------------------------------------


async def test_the_breaker_state_is_published_even_in_a_redis_at_maxmemory(
    redis_factory: Callable[..., RedisServer],
) -> None:
    # A full Redis refused the plain SET, and the stats read "no worker reports" for workers
    # that were sending (an operator's walkthrough with maxmemory below used_memory).
    server = redis_factory()
    queue = Queue.from_url(server.url, timeout=5)
    try:
        store = RelayStore(queue)
        await store.publish("w1", {"state": "closed"}, 60_000)
        used = int((await queue.redis.info("memory"))["used_memory"])
        await queue.redis.config_set("maxmemory", used // 2)  # at maxmemory: writes refused
        with pytest.raises(OutOfMemoryError):  # as the plain SET it was made with is
            await queue.redis.set(queue.keys.relay_state("w1"), "{}", px=60_000)
        await store.publish("w1", {"state": "open", "error": "refused"}, 60_000)
        raw = await queue.redis.get(queue.keys.relay_state("w1"))
        assert json.loads(raw) == {"state": "open", "error": "refused"}
        assert 0 < await queue.redis.pttl(queue.keys.relay_state("w1")) <= 60_000
    finally:
        await queue.close()


# -- the shared send rate (send_rate.lua) ---------------------------------------------------


async def redis_seconds(queue: Queue) -> float:
    seconds, micros = await queue.redis.time()
    return float(seconds) + float(micros) / 1e6


async def test_slots_are_spaced_one_over_the_rate_apart(queue: Queue) -> None:
    store = RelayStore(queue)
    started = await redis_seconds(queue)
    waits = [(await store.take_send_slot(10))[0] for _ in range(6)]
    elapsed = await redis_seconds(queue) - started
    # Slot k is k x 100 ms after slot 0; by the k-th call at most `elapsed` has passed, and
    # each wait is rounded up to the ms.
    assert waits[-1] >= waits[0] + 0.5 - elapsed - 0.002, (waits, elapsed)


async def test_throttling_halves_the_rate_once_a_second_down_to_a_sixteenth(queue: Queue) -> None:
    store = RelayStore(queue)
    # Between calls the rate grows back a little (1.6/s per second), hence the ranges.
    assert 8 <= await store.throttled(16) < 8.5
    assert 8 <= await store.throttled(16) < 8.5  # a burst of 421s is one signal
    for _ in range(6):
        # Pretend the last cut was long ago; the script's clock is Redis's.
        await queue.redis.hset(queue.keys.relay_rate, "cut", 0)
        rate = await store.throttled(16)
    assert rate == 1  # the floor, a sixteenth


async def test_the_rate_grows_back_to_the_maximum(queue: Queue) -> None:
    store = RelayStore(queue)
    await store.throttled(16)
    # As if the cut happened 20 s ago: a tenth of the maximum per second restores it.
    now_ms = float((await queue.redis.time())[0]) * 1000
    await queue.redis.hset(queue.keys.relay_rate, mapping={"at": now_ms - 20_000})
    _, rate = await store.take_send_slot(16)
    assert rate == 16


# -- deferral (defer.lua) ------------------------------------------------------------------


async def claim_one(queue: Queue) -> tuple[str, object]:
    task_id = str(uuid.uuid4())
    await queue.enqueue(task_id, Job(to="a@example.com", subject="s", text="t"), request_id="r")
    claim = await queue.claim("w1", 1, 60_000)
    [claimed] = claim.jobs
    return task_id, claimed


async def test_a_deferral_gives_the_attempt_back_and_the_ceiling_fails_it(queue: Queue) -> None:
    store = RelayStore(queue)
    task_id, claimed = await claim_one(queue)
    entry = Attempt(attempt=1, outcome="deferred", reply="ConnectionRefusedError")
    assert await store.defer(claimed, entry, Deferral("too long", 60_000)) == "deferred"  # type: ignore[arg-type]
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.attempts) == (Status.PENDING, 0)

    claim = await queue.claim("w1", 1, 60_000)  # back at the front of its lane
    [again] = claim.jobs
    assert again.task_id == task_id
    assert again.attempt == 1  # the deferred try did not count
    # Ceiling 0: the outage clock (started at the first deferral) has run out.
    assert await store.defer(again, entry, Deferral("relay unreachable for 0s: x", 0)) == "failed"
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.attempts, record.reason) == (
        Status.FAILED, 0, "relay unreachable for 0s: x"
    )  # fmt: skip
    assert [e.outcome for e in record.log] == ["deferred", "failed"]


async def test_a_deferral_with_a_lost_lease_changes_nothing(queue: Queue) -> None:
    store = RelayStore(queue)
    task_id, claimed = await claim_one(queue)
    stale = claimed.model_copy(update={"token": "someone-else"})  # type: ignore[attr-defined]
    entry = Attempt(attempt=1, outcome="deferred")
    assert await store.defer(stale, entry, Deferral("x", 60_000)) == "stale"
    record = await queue.get(task_id)
    assert record is not None
    assert record.attempts == 1


@pytest.mark.parametrize(("ceiling_ms", "applied"), [(60_000, "deferred"), (0, "failed")])
async def test_a_deferral_run_again_after_its_reply_was_lost_answers_as_its_first_run(
    queue: Queue, ceiling_ms: int, applied: str
) -> None:
    # The worker retries a defer whose reply it never got; Redis had run it. The second run
    # finds the lease gone (or the task failed at the ceiling) and must not say "stale":
    # the worker would warn that the deferral was lost when it was recorded.
    store = RelayStore(queue)
    task_id, claimed = await claim_one(queue)
    entry = Attempt(attempt=1, outcome="deferred", reply="ConnectionRefusedError",
                    duration_ms=4.56)  # fmt: skip
    how = Deferral("relay down too long", ceiling_ms)
    assert await store.defer(claimed, entry, how) == applied  # type: ignore[arg-type]
    before = await queue.redis.hgetall(queue.keys.task(task_id))
    assert await store.defer(claimed, entry, how) == applied  # type: ignore[arg-type]
    assert await queue.redis.hgetall(queue.keys.task(task_id)) == before
    if applied == "deferred":  # claimed again (attempt 1 again: uncounted): still a replay
        [again] = (await queue.claim("w2", 1, 60_000)).jobs
        assert await store.defer(claimed, entry, how) == "deferred"  # type: ignore[arg-type]
        assert (await queue.redis.hget(queue.keys.task(task_id), "lease")) == again.token
        other = entry.model_copy(update={"duration_ms": 7.0})  # not the run recorded
        assert await store.defer(claimed, other, how) == "stale"  # type: ignore[arg-type]


async def test_a_deferral_retried_after_its_worker_claimed_the_task_again_changes_nothing(
    queue: Queue,
) -> None:
    # A deferral gives the attempt back, so the same worker's next claim of the task has
    # the same worker and attempt: only the claim's own id tells the two leases apart. The
    # first claim's defer, retried after its reply was lost, must not put the task back in
    # its lane while the second claim is sending it (another worker would send it too).
    store = RelayStore(queue)
    task_id, first = await claim_one(queue)
    entry = Attempt(attempt=1, outcome="deferred", reply="ConnectionRefusedError",
                    duration_ms=1.25)  # fmt: skip
    how = Deferral("relay down too long", 60_000)
    assert await store.defer(first, entry, how) == "deferred"  # type: ignore[arg-type]
    [second] = (await queue.claim("w1", 1, 60_000)).jobs
    assert (second.attempt, second.token != first.token) == (1, True)  # type: ignore[attr-defined]
    assert await store.defer(first, entry, how) == "deferred"  # type: ignore[arg-type]
    assert await queue.redis.hget(queue.keys.task(task_id), "lease") == second.token
    assert await queue.redis.lrange(queue.keys.lane("default"), 0, -1) == []


async def test_the_sweep_fails_only_mail_that_waited_the_ceiling(queue: Queue) -> None:
    store = RelayStore(queue)
    old, young = str(uuid.uuid4()), str(uuid.uuid4())
    job = Job(to="a@example.com", subject="s", text="t")
    await queue.enqueue(old, job, request_id="r")
    await queue.redis.hset(queue.keys.task(old), "updated_at", 1)  # queued long ago
    await queue.enqueue(young, job, request_id="r")

    assert await store.expire_waiting(3_600_000, "relay unreachable for 1h: refused") == 1

    old_record, young_record = await queue.get(old), await queue.get(young)
    assert old_record is not None
    assert young_record is not None
    assert old_record.status is Status.FAILED
    assert old_record.reason == "relay unreachable for 1h: refused"
    assert young_record.status is Status.PENDING
    [claimed] = (await queue.claim("w1", 5, 60_000)).jobs  # the young one is still queued
    assert claimed.task_id == young
