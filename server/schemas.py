"""Response bodies of the API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from emailq.models import Attempt, Status, TaskRecord


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
    def of(cls, entry: Attempt) -> AttemptOut:
        """Convert a stored entry."""
        return cls(**entry.model_dump(exclude={"at"}), at=iso(entry.at) or "")


class TaskResult(BaseModel):
    """The original's ``status``, ``to``, ``attempts`` and ``reason``, plus timestamps and
    the attempt log."""

    task_id: str
    status: Status
    to: str
    attempts: int
    reason: str | None = None
    created_at: str
    updated_at: str
    sent_at: str | None = None
    next_attempt_at: str | None = None
    request_id: str | None = None
    attempt_log: list[AttemptOut]

    @classmethod
    def of(cls, record: TaskRecord) -> TaskResult:
        """Convert a stored record."""
        return cls(
            task_id=record.task_id,
            status=record.status,
            to=record.to,
            attempts=record.attempts,
            reason=record.reason or None,
            created_at=iso(record.created_at) or "",
            updated_at=iso(record.updated_at) or "",
            sent_at=iso(record.sent_at),
            next_attempt_at=iso(record.next_attempt_at),
            request_id=record.request_id,
            attempt_log=[AttemptOut.of(a) for a in record.log],
        )
