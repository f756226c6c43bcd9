"""Hooks at the worker's seams, as arq's ``on_job_start``/``after_job_end`` and SAQ's
``before_process``/``after_process``: metrics (and anything else that watches sends) are a
new module implementing ``WorkerObserver``, not edits inside the claim/send/finish loop.

Hooks are plain calls on the worker's event loop: they must be quick and must not block
(count, time, log; hand anything slow to a task of your own). An exception from a hook is
logged and ignored, so a broken observer cannot stop a send from being recorded. Outcome
hooks are called once the outcome is recorded in Redis (or given up on, as stale), so they
agree with the event stream. Durable consumers (webhooks) read the event stream instead
(``Queue.events``): it survives worker restarts, these do not.
"""

from __future__ import annotations

from typing import Protocol

from emailq.models import ClaimedJob
from emailq.queue import Unreadable


class WorkerObserver(Protocol):
    """What a worker reports, with no-op defaults: subclass it and override what you need.
    ``seconds`` is the send's duration, from the start of its attempt to its outcome.
    (Each body says ``return``: a Protocol method with an empty body is abstract.)"""

    def on_claim(self, jobs: int, seconds: float) -> None:
        """One claim round trip (alone, or with a finish) ended with ``jobs`` claimed."""
        return

    def on_claimed(self, job: ClaimedJob) -> None:
        """A claimed job starts its attempt (``job.attempt``)."""
        return

    def on_sent(self, job: ClaimedJob, code: int, seconds: float) -> None:
        """The relay accepted the mail with reply ``code``."""
        return

    def on_retry(
        self, job: ClaimedJob, code: int | None, delay_seconds: float, seconds: float
    ) -> None:
        """The attempt failed; the job is scheduled again in ``delay_seconds``."""
        return

    def on_failed(
        self, job: ClaimedJob | Unreadable, code: int | None, reason: str, seconds: float
    ) -> None:
        """The job failed for good: a permanent error, out of attempts, an unknown outcome
        that is not retried, an unreadable stored job, or the relay-outage ceiling."""
        return

    def on_deferred(self, job: ClaimedJob, code: int | None, seconds: float) -> None:
        """The relay failed (unreachable, throttling): the job is back in the queue and the
        attempt does not count."""
        return

    def on_lease_lost(self, job: ClaimedJob, reason: str) -> None:
        """The lease passed to another worker before the message went out: not sent, and
        nothing recorded (the job is its new owner's)."""
        return

    def on_unknown_outcome(self, job: ClaimedJob, seconds: float) -> None:
        """The message went out and its reply never came. Followed by ``on_retry`` or
        ``on_failed``, as ON_UNKNOWN_OUTCOME decides."""
        return

    def on_lapsed(self, worker_id: str, jobs: int) -> None:
        """This worker's claim put back (or failed, out of attempts) ``jobs`` whose lease
        ``worker_id`` had stopped renewing: that worker died or lost Redis."""
        return

    def on_renewal(self, held: int, lost: int) -> None:
        """A heartbeat renewed the leases of ``held`` jobs, of which ``lost`` were gone."""
        return


class NoObserver(WorkerObserver):
    """Observes nothing: the default."""
