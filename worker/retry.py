"""When to try a failed send again, decided with tenacity's strategies.

The retry loop itself is not an in-memory tenacity loop: a job waiting for its next attempt
lives in Redis (the ``scheduled`` set), so a worker that dies during the backoff loses
nothing. tenacity supplies the decisions: stop after MAX_ATTEMPTS, and exponential backoff
with jitter, evaluated for the attempt number Redis counted.
"""

from __future__ import annotations

import tenacity

from emailq.errors import SendError


class RetryPolicy:
    """Answers "retry after how long, or give up?" for a failed attempt."""

    def __init__(self, *, max_attempts: int, backoff_seconds: float, max_backoff: float) -> None:
        self.max_attempts = max_attempts
        self._stop = tenacity.stop_after_attempt(max_attempts)
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=backoff_seconds, max=max_backoff, jitter=backoff_seconds
        )
        self._retryable = tenacity.retry_if_exception(
            lambda exc: isinstance(exc, SendError) and not exc.permanent
        )

    def retry_delay(self, attempt: int, error: SendError) -> float | None:
        """Seconds until the next attempt, or None when the task should fail now."""
        state = tenacity.RetryCallState(tenacity.AsyncRetrying(), fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        state.set_exception((type(error), error, error.__traceback__))
        if not self._retryable(state) or self._stop(state):
            return None
        return float(self._wait(state))
