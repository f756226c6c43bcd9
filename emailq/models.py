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
    outcome: str  # success | retry | failed | lease_expired
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
    log: list[Attempt] = Field(default_factory=list)


class ClaimedJob(BaseModel):
    """A job a worker holds under a lease; ``token`` fences its finish against a re-claim."""

    task_id: str
    token: str
    attempt: int
    request_id: str | None
    job: Job
