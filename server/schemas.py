"""Response bodies of the API."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from emailq.forms import OWNER_PREFIX
from emailq.models import Attempt, Priority, Status, TaskRecord

MAX_BATCH = 100  # messages per batch request
MAX_REQUEUE_IDS = 1000  # ids per bulk requeue request
HIDDEN = "hidden"  # what a contact-form task's result shows as `to`
# Anything shaped like an address inside SMTP reply text ("550 5.1.1 <me@site>: unknown").
_ADDRESS = re.compile(r"[^\s<>()\[\]\",;:@]+@[^\s<>()\[\]\",;:]+")


def _without_addresses(text: str | None) -> str | None:
    return None if text is None else _ADDRESS.sub(HIDDEN, text)


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as an RFC 3339 UTC timestamp."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Accepted(BaseModel):
    """The original's answer to a send: the id to poll, and ``queued``."""

    task_id: str
    status: Literal["queued"] = "queued"


class AttemptOut(BaseModel):
    """One attempt as the result endpoint shows it."""

    at: str
    attempt: int
    outcome: str
    code: int | None = None
    reply: str | None = None
    duration_ms: float | None = None

    @classmethod
    def of(cls, entry: Attempt, *, private: bool = False) -> AttemptOut:
        """Convert a stored entry; ``private`` hides addresses in the server's reply."""
        out = cls(**entry.model_dump(exclude={"at"}), at=iso(entry.at) or "")
        if private:
            out.reply = _without_addresses(out.reply)
        return out


class TaskResult(BaseModel):
    """The original's ``status``, ``to``, ``attempts`` and ``reason``, plus timestamps and
    the attempt log."""

    task_id: str
    status: Status
    to: str
    attempts: int
    reason: str | None = None
    priority: Priority
    created_at: str
    updated_at: str
    sent_at: str | None = None
    next_attempt_at: str | None = None
    scheduled_at: str | None = None
    expires_at: str | None = None
    request_id: str | None = None
    metadata: dict[str, str] | None = Field(default=None, description="as sent; absent if none")
    tags: list[str] | None = Field(default=None, description="as sent; absent if none")
    attempt_log: list[AttemptOut]

    @classmethod
    def of(cls, record: TaskRecord) -> TaskResult:
        """Convert a stored record."""
        # A contact form's recipients are the site owner's private addresses, and its task
        # id travels through a visitor's browser: show neither them (not even inside an
        # SMTP server's reply text) nor the body.
        private = (record.key_id or "").startswith(OWNER_PREFIX)
        return cls(
            task_id=record.task_id,
            status=record.status,
            to=HIDDEN if private else record.to,
            attempts=record.attempts,
            reason=_without_addresses(record.reason or None) if private else record.reason or None,
            priority=record.priority,
            created_at=iso(record.created_at) or "",
            updated_at=iso(record.updated_at) or "",
            sent_at=iso(record.sent_at),
            next_attempt_at=iso(record.next_attempt_at),
            scheduled_at=iso(record.scheduled_at),
            expires_at=iso(record.expires_at),
            request_id=record.request_id,
            metadata=record.metadata or None,
            tags=record.tags or None,
            attempt_log=[AttemptOut.of(a, private=private) for a in record.log],
        )


class BatchRequest(BaseModel):
    """Up to 100 send requests, each validated on its own."""

    model_config = ConfigDict(extra="forbid")

    # Entries stay raw here so one bad message rejects only itself, not the whole batch.
    messages: list[Any] = Field(
        min_length=1, max_length=MAX_BATCH,
        description="each one a send request, as for POST /api/v1/email/received",
    )  # fmt: skip


class BatchEntry(BaseModel):
    """One message of a batch: its task id, or why it was rejected."""

    index: int
    task_id: str | None = None
    status: Literal["queued"] | None = None
    error: str | None = None
    detail: str | None = None
    fields: list[dict[str, Any]] | None = None


class BatchAccepted(BaseModel):
    """The answer to a batch: one entry per message, in request order."""

    results: list[BatchEntry]
    queued: int
    rejected: int


class FailedPage(BaseModel):
    """One page of dead letters, newest first."""

    tasks: list[TaskResult]
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; absent on the last. "
                                    "With a tag or metadata filter, the position in the whole "
                                    "dead-letter list to go on from")  # fmt: skip


class RequeueRequest(BaseModel):
    """Which dead letters to send again: ``task_ids``, or ``all``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task_ids: list[uuid.UUID] | None = Field(default=None, max_length=MAX_REQUEUE_IDS)
    all_: bool = Field(default=False, alias="all", description="every failed task")

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.task_ids is None) == (not self.all_):
            raise ValueError('give either "task_ids" or "all": true')
        return self


class Requeued(BaseModel):
    """The tasks that were failed and are pending again."""

    requeued: int
    task_ids: list[str]


class Cancelled(BaseModel):
    """A pending or scheduled task that will not be sent: it is now failed, 'cancelled'."""

    task_id: str
    status: Literal["cancelled"] = "cancelled"
