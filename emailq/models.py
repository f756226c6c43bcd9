"""Task states, the job a worker sends, and the records the status store returns."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class Status(StrEnum):
    """A task's state as clients see it (the original service's three values)."""

    PENDING = "pending"  # stored: queued, being sent, or waiting for its next attempt
    SUCCESS = "success"  # the SMTP server accepted the message
    FAILED = "failed"  # permanent error, or out of attempts; ``reason`` says which


TERMINAL = frozenset({Status.SUCCESS, Status.FAILED})


class Priority(StrEnum):
    """Which lane a task waits in; workers claim from the highest non-empty lane first."""

    HIGH = "high"  # one-time codes, password resets: ahead of any backlog
    DEFAULT = "default"  # everything else
    LOW = "low"  # newsletters and bulk mail: sent when the others leave room


LANES: tuple[Priority, ...] = (Priority.HIGH, Priority.DEFAULT, Priority.LOW)


class Job(BaseModel):
    """A rendered, validated message: everything the worker needs and nothing to evaluate."""

    to: str
    subject: str
    text: str
    html: str | None = None
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    reply_to: str | None = None

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: To, Cc and Bcc (Bcc never appears in a header)."""
        return [self.to, *self.cc, *self.bcc]


class Attempt(BaseModel):
    """One entry of a task's attempt log."""

    at: int = 0  # epoch milliseconds, stamped by the finish script from Redis server time
    attempt: int
    outcome: str  # success | retry | failed | lease_expired | deferred (relay's fault)
    code: int | None = None  # SMTP reply code, when the server gave one
    reply: str | None = None  # SMTP reply text, or the error
    duration_ms: float | None = None


class EventType(StrEnum):
    """What happened to a task, as the event stream records it (see ``Queue.events``)."""

    ACCEPTED = "accepted"  # stored by the API, a batch, a form or the CLI
    CLAIMED = "claimed"  # a worker took it under a lease for one attempt
    SENT = "sent"  # the relay accepted it: final (success)
    RETRY = "retry"  # the attempt failed; scheduled again after a backoff
    DEFERRED = "deferred"  # the relay failed, not the mail: back in the queue, uncounted
    LEASE_EXPIRED = "lease_expired"  # its worker stopped renewing (crashed, cut off)
    RELEASED = "released"  # claimed by a stopping worker and given back unstarted
    FAILED = "failed"  # final: permanent error, out of attempts, unreadable, outage ceiling
    CANCELLED = "cancelled"  # final: an admin cancelled it before it was sent
    EXPIRED = "expired"  # final: its expires_at passed before it could be sent
    REQUEUED = "requeued"  # a dead letter put back in its lane with fresh attempts


FINAL_EVENTS = frozenset({EventType.SENT, EventType.FAILED, EventType.CANCELLED,
                          EventType.EXPIRED})  # fmt: skip


class Event(BaseModel):
    """One entry of the event stream: a state change, written by the script that made it."""

    id: str  # the stream entry id, "<ms>-<seq>": read on from here (Queue.events(after_id))
    type: EventType
    task_id: str
    time: int  # epoch milliseconds, Redis server time
    lane: str = ""
    attempt: int = 0  # the attempt this event is about (0 before the first claim)
    code: int | None = None  # SMTP reply code, when the relay gave one
    reason: str = ""  # why it failed, was retried or deferred (first 200 characters)
    request_id: str = ""  # joins the API's request with every worker line for the task
    worker: str = ""  # the worker that claimed or released it


class TaskRecord(BaseModel):
    """What the status hash holds for one task."""

    task_id: str
    status: Status
    to: str
    attempts: int
    reason: str | None = None
    request_id: str | None = None
    created_at: int
    updated_at: int
    sent_at: int | None = None
    next_attempt_at: int | None = None
    priority: Priority = Priority.DEFAULT
    scheduled_at: int | None = None
    expires_at: int | None = None
    log: list[Attempt] = Field(default_factory=list)
    key_id: str | None = None  # the API key that created it, when keys are configured


class LaneStats(BaseModel):
    """One priority lane in the queue statistics."""

    priority: Priority
    depth: int
    oldest_age_seconds: float | None


class RelayState(StrEnum):
    """A worker's circuit breaker over its SMTP relay."""

    CLOSED = "closed"  # sending normally
    OPEN = "open"  # the relay failed: not sending, probing it now and then
    HALF_OPEN = "half_open"  # a probe is checking whether the relay is back


class WorkerRelay(BaseModel):
    """One live worker's view of the relay, as it publishes it with its heartbeat."""

    worker_id: str
    state: RelayState
    since: int  # epoch ms of the last state change (worker clock)
    error: str | None = None  # what opened the breaker
    send_rate: float | None = None  # shared mails/s now (SMTP_MAX_PER_SECOND, after slowdowns)


class QueueStats(BaseModel):
    """A snapshot of the queue for operators."""

    lanes: list[LaneStats]
    scheduled: int  # waiting for send_at or for a retry's backoff
    in_flight: int  # claimed by a worker, under a lease
    live_workers: int  # heartbeats within the last three lease periods
    failed: int  # dead letters still kept (RESULT_TTL_SECONDS)
    sent_last_minute: int
    sent_last_hour: int
    failed_last_minute: int
    failed_last_hour: int
    relay: list[WorkerRelay] = Field(default_factory=list)  # breaker state per live worker


class ClaimedJob(BaseModel):
    """A job a worker holds under a lease; ``token`` fences its finish against a re-claim."""

    task_id: str
    token: str
    attempt: int
    request_id: str | None
    job: Job
    lane: str | None = None  # for log lines; None from a claim that did not say
