"""RetryPolicy: permanent errors fail at once, transient ones back off until the last try."""

from __future__ import annotations

import pytest

from emailq.errors import SendError
from worker.retry import RetryPolicy

BASE, CAP = 2.0, 30.0
TRANSIENT = SendError("try later", code=451)
SAMPLES = 200


@pytest.fixture
def policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=5, backoff_seconds=BASE, max_backoff=CAP)


def delays(policy: RetryPolicy, attempt: int) -> list[float]:
    found = [policy.retry_delay(attempt, TRANSIENT) for _ in range(SAMPLES)]
    assert all(d is not None for d in found)
    return [d for d in found if d is not None]


@pytest.mark.parametrize(
    "error",
    [
        SendError("mailbox unavailable", code=550, permanent=True),
        SendError("no code but permanent", permanent=True),
    ],
)
def test_permanent_error_fails_at_once(policy: RetryPolicy, error: SendError) -> None:
    assert policy.retry_delay(1, error) is None


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_transient_delay_is_exponential_plus_bounded_jitter(
    policy: RetryPolicy, attempt: int
) -> None:
    low = BASE * 2 ** (attempt - 1)
    found = delays(policy, attempt)
    assert all(low <= d <= low + BASE for d in found)
    assert len(set(found)) > 1  # jittered, not a fixed step


def test_delay_never_exceeds_the_cap() -> None:
    policy = RetryPolicy(max_attempts=25, backoff_seconds=BASE, max_backoff=CAP)
    assert all(d <= CAP for d in delays(policy, 20))
    assert all(d == CAP for d in delays(policy, 10))  # 2 * 2**9 is far past the cap


def test_no_retry_once_attempt_reaches_max(policy: RetryPolicy) -> None:
    assert policy.retry_delay(4, TRANSIENT) is not None
    assert policy.retry_delay(5, TRANSIENT) is None
    assert policy.retry_delay(6, TRANSIENT) is None


def test_single_attempt_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1, backoff_seconds=BASE, max_backoff=CAP)
    assert policy.retry_delay(1, TRANSIENT) is None


def test_connection_error_without_code_is_retried(policy: RetryPolicy) -> None:
    assert policy.retry_delay(1, SendError("ConnectionRefusedError")) is not None


def test_zero_backoff_retries_immediately() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_seconds=0, max_backoff=0)
    assert policy.retry_delay(1, TRANSIENT) == 0
