"""The worker's observer hooks (worker.observer): a recording observer sees each claim and
outcome of a real worker sending to a real SMTP server, and a broken one stops nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from emailq.models import ClaimedJob
from emailq.queue import Unreadable
from emailq.settings import Settings
from tests.helpers.polling import wait_for
from tests.helpers.smtpd import SmtpServer
from tests.helpers.workers import running, scripted
from worker.observer import WorkerObserver

Factory = Callable[..., SmtpServer]


@dataclass
class Recorder(WorkerObserver):
    """Keeps (hook, task id, attempt, code) per call; counts claims and renewals."""

    calls: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    claims: int = 0
    claimed_in_claims: int = 0
    renewals: int = 0
    durations: list[float] = field(default_factory=list)

    def of(self, task_id: str) -> list[tuple[str, int, int | None]]:
        return [(hook, attempt, code) for hook, t, attempt, code in self.calls if t == task_id]

    def on_claim(self, jobs: int, seconds: float) -> None:
        self.claims += 1
        self.claimed_in_claims += jobs

    def on_claimed(self, job: ClaimedJob) -> None:
        self.calls.append(("claimed", job.task_id, job.attempt, None))

    def on_sent(self, job: ClaimedJob, code: int, seconds: float) -> None:
        self.calls.append(("sent", job.task_id, job.attempt, code))
        self.durations.append(seconds)

    def on_retry(
        self, job: ClaimedJob, code: int | None, delay_seconds: float, seconds: float
    ) -> None:
        self.calls.append(("retry", job.task_id, job.attempt, code))
        self.durations.append(seconds)

    def on_failed(
        self, job: ClaimedJob | Unreadable, code: int | None, reason: str, seconds: float
    ) -> None:
        self.calls.append(("failed", job.task_id, job.attempt, code))

    def on_deferred(self, job: ClaimedJob, code: int | None, seconds: float) -> None:
        self.calls.append(("deferred", job.task_id, job.attempt, code))

    def on_renewal(self, held: int, lost: int) -> None:
        self.renewals += 1


async def test_a_recording_observer_sees_every_claim_and_outcome(
    make_settings: Callable[..., Settings], smtp_factory: Factory
) -> None:
    smtp = scripted(smtp_factory, ["450 4.2.1 mailbox busy"])
    recorder = Recorder()
    async with running(make_settings(smtp_port=smtp.port, job_lease_seconds=1),
                       recorder) as run:  # fmt: skip
        retried = (await run.send())[0].task_id
        smtp.handler.replies.append("550 5.1.1 no such user")
        failed = (await run.send())[0].task_id
        smtp.handler.replies.append("451 4.3.0 slow down")  # the relay's, not the mail's
        deferred = (await run.send())[0].task_id
        await wait_for(lambda: recorder.renewals > 0, "a lease renewal")

    assert recorder.of(retried) == [("claimed", 1, None), ("retry", 1, 450),
                                    ("claimed", 2, None), ("sent", 2, 250)]  # fmt: skip
    assert recorder.of(failed) == [("claimed", 1, None), ("failed", 1, 550)]
    assert recorder.of(deferred) == [("claimed", 1, None), ("deferred", 1, 451),
                                     ("claimed", 1, None), ("sent", 1, 250)]  # fmt: skip
    claimed = [call for call in recorder.calls if call[0] == "claimed"]
    assert recorder.claimed_in_claims == len(claimed)
    assert recorder.claims > 0
    assert all(seconds > 0 for seconds in recorder.durations)


class Broken(WorkerObserver):
    def on_sent(self, job: ClaimedJob, code: int, seconds: float) -> None:
        raise RuntimeError("observer bug")


async def test_a_failing_observer_does_not_stop_a_send_being_recorded(
    make_settings: Callable[..., Settings], smtp_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    smtp = scripted(smtp_factory)
    async with running(make_settings(smtp_port=smtp.port), Broken()) as run:
        records = await run.send(2)
    assert [r.status for r in records] == ["success", "success"]
    assert len(smtp.handler.received) == 2
    assert caplog.text.count("observer hook on_sent failed") == 2
