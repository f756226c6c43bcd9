"""Task states, the job a worker sends, and the records the status store returns."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Status(StrEnum):
    """A task's state as clients see it (the original service's three values)."""

    PENDING = "pending"  # stored: queued, being sent, or waiting for its next attempt
    SUCCESS = "success"  # the SMTP server accepted the message
    FAILED = "failed"  # permanent error, or out of attempts; ``reason`` says which


TERMINAL = frozenset({Status.SUCCESS, Status.FAILED})


def iso(ms: int | None, timespec: str = "milliseconds") -> str | None:
    """Epoch milliseconds (how Redis times are stored) as an RFC 3339 UTC timestamp."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec=timespec)


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

    name: str = Field(default="", description="the display name, plain text ('' for none)")
    address: str = Field(description="the bare address")

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
    metadata: dict[str, str] = Field(default_factory=dict)  # the caller's labels (emailq.labels)
    tags: list[str] = Field(default_factory=list)


class LaneStats(BaseModel):
    """One priority lane in the queue statistics."""

    priority: Priority = Field(description="the lane")
    depth: int = Field(description="tasks ready to be claimed")
    oldest_age_seconds: float | None = Field(description="how long its oldest has waited")


class RelayState(StrEnum):
    """A worker's circuit breaker over its SMTP relay."""

    CLOSED = "closed"  # sending normally
    OPEN = "open"  # the relay failed: not sending, probing it now and then
    HALF_OPEN = "half_open"  # a probe is checking whether the relay is back


class WorkerRelay(BaseModel):
    """One live worker's view of the relay, as it publishes it with its heartbeat."""

    worker_id: str = Field(description="the worker's id")
    state: RelayState = Field(description="its circuit breaker over the relay")
    since: int = Field(description="epoch ms of the last state change (worker clock)")
    error: str | None = Field(default=None, description="what opened the breaker")
    send_rate: float | None = Field(
        default=None, description="shared mails/s now (SMTP_MAX_PER_SECOND, after slowdowns)"
    )


class QueueStats(BaseModel):
    """A snapshot of the queue for operators."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "lanes": [{"priority": "high", "depth": 0, "oldest_age_seconds": None},
                  {"priority": "default", "depth": 3, "oldest_age_seconds": 0.8},
                  {"priority": "low", "depth": 0, "oldest_age_seconds": None}],
        "scheduled": 1, "in_flight": 2, "live_workers": 1, "failed": 0,
        "sent_last_minute": 40, "sent_last_hour": 1200, "failed_last_minute": 0,
        "failed_last_hour": 2,
        "relay": [{"worker_id": "w-1", "state": "closed", "since": 1738314000000}],
    }]})  # fmt: skip

    lanes: list[LaneStats] = Field(description="each priority lane, highest first")
    scheduled: int = Field(description="waiting for send_at or for a retry's backoff")
    in_flight: int = Field(description="claimed by a worker, under a lease")
    live_workers: int = Field(description="heartbeats within the last three lease periods")
    failed: int = Field(description="dead letters still kept (RESULT_TTL_SECONDS)")
    sent_last_minute: int = Field(description="mails the relay accepted in the last minute")
    sent_last_hour: int = Field(description="mails the relay accepted in the last hour")
    failed_last_minute: int = Field(description="tasks that failed in the last minute")
    failed_last_hour: int = Field(description="tasks that failed in the last hour")
    relay: list[WorkerRelay] = Field(
        default_factory=list, description="each live worker's circuit breaker"
    )


class QueueGauges(BaseModel):
    """The queue as /metrics reports it, read in one cheap script call (``Queue.gauges``)."""

    lanes: list[LaneStats]  # depth and oldest age per lane
    scheduled: int  # waiting for send_at or for a retry's backoff
    in_flight: int  # claimed by a worker, under a lease
    failed: int  # dead letters still kept
    stored_bytes: int  # job bytes of all mail waiting to be sent (MAX_STORED_BYTES counts it)
    # Live workers per breaker state; "none": alive, but no state published (yet).
    relay: dict[str, int] = Field(default_factory=dict)
    # Redis's used_memory and maxmemory (0: no limit); None while REDIS_MEMORY_HEADROOM is 0
    # (not read: INFO may not be granted, see the README).
    memory_used_bytes: int | None = None
    memory_max_bytes: int | None = None

    @property
    def live_workers(self) -> int:
        """Workers with a heartbeat in the live window, whatever their relay state."""
        return sum(self.relay.values())


class ClaimedJob(BaseModel):
    """A job a worker holds under a lease; ``token`` fences its finish against a re-claim."""

    task_id: str
    token: str
    attempt: int
    request_id: str | None
    job: Job
    lane: str | None = None  # for log lines; None from a claim that did not say
    # Ms left before the task's expires_at when it was claimed (Redis's clock); None: none.
    expires_in_ms: int | None = None


class MinuteCount(BaseModel):
    """Tasks that finished in one clock minute (the queue's per-minute counters)."""

    minute: int  # epoch ms of the minute's start (Redis server time)
    sent: int
    failed: int


class WorkerStatus(BaseModel):
    """One live worker: when it last sent a heartbeat, and its view of the relay."""

    worker_id: str
    last_heartbeat: int  # epoch ms, Redis server time
    heartbeat_age_seconds: float
    relay: WorkerRelay | None = None  # absent until the worker has published one
