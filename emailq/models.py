"""Task states, the job a worker sends, and the records the status store returns."""

from __future__ import annotations

import base64
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


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


class Mailbox(BaseModel):
    """A sender as a request gave it: a plain-text display name ('' for none) and a bare,
    validated address. ``emailq.message`` writes the header; nothing parses it again."""

    model_config = ConfigDict(frozen=True)

    name: str = ""
    address: str

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


class Attachment(BaseModel):
    """A validated attachment: a safe file name, a ``type/subtype`` and the bytes, base64."""

    filename: str
    content_type: str
    content: str  # base64 of the exact bytes, no line breaks

    @property
    def data(self) -> bytes:
        """The bytes as the recipient gets them."""
        return base64.b64decode(self.content, validate=True)


class Job(BaseModel):
    """A rendered, validated message: everything the worker needs and nothing to evaluate."""

    to: str
    subject: str
    text: str
    html: str | None = None
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    reply_to: str | None = None
    # The request's `from`; None: MAIL_FROM. Its address is the envelope sender too.
    sender: Mailbox | None = None
    attachments: list[Attachment] = Field(default_factory=list)

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
    metadata: dict[str, str] = Field(default_factory=dict)  # the caller's labels (emailq.labels)
    tags: list[str] = Field(default_factory=list)


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
