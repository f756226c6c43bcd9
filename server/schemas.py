"""Response bodies of the API."""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from emailq.forms import OWNER_PREFIX
from emailq.models import Attempt, Priority, Status, TaskRecord, iso
from server.errors import ErrorBody

MAX_BATCH = 100  # messages per batch request
MAX_REQUEUE_IDS = 1000  # ids per bulk requeue request
HIDDEN = "hidden"  # what a contact-form task's result shows as `to`
# Anything shaped like an address inside SMTP reply text ("550 5.1.1 <me@site>: unknown").
_ADDRESS = re.compile(r"[^\s<>()\[\]\",;:@]+@[^\s<>()\[\]\",;:]+")
TASK_ID = "3f2b8c1e-6d4a-4e8b-9c7f-1a2b3c4d5e6f"  # the examples' task id


def _example(*examples: dict[str, Any]) -> ConfigDict:
    """A model's ``examples`` in the OpenAPI schema (each route shows one)."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


def _without_addresses(text: str | None) -> str | None:
    return None if text is None else _ADDRESS.sub(HIDDEN, text)


class Accepted(BaseModel):
    """The original's answer to a send: the id to poll, and ``queued``."""

    model_config = _example({"task_id": TASK_ID, "status": "queued"})

    task_id: str = Field(description="the task's id: poll GET /api/v1/email/result with it")
    status: Literal["queued"] = Field(default="queued", description="always queued")


class AttemptOut(BaseModel):
    """One attempt as the result endpoint shows it."""

    at: str = Field(description="when it ended, RFC 3339 UTC")
    attempt: int = Field(description="1 for the first attempt")
    outcome: str = Field(
        description="success, retry, failed, lease_expired (the worker vanished), deferred "
        "(the relay's fault: not counted against MAX_ATTEMPTS) or outcome_unknown"
    )
    code: int | None = Field(default=None, description="the SMTP reply code, when there was one")
    reply: str | None = Field(default=None, description="the SMTP reply text, or the error")
    duration_ms: float | None = Field(default=None, description="how long the attempt took")

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

    model_config = _example({
        "task_id": TASK_ID, "status": "success", "to": "user@example.com", "attempts": 1,
        "priority": "default", "created_at": "2025-01-31T09:00:00.000+00:00",
        "updated_at": "2025-01-31T09:00:01.250+00:00",
        "sent_at": "2025-01-31T09:00:01.250+00:00",
        "request_id": "5f0c6a1e9b8d4c2fa7e3d1b0c9a8e7f6",
        "attempt_log": [{"at": "2025-01-31T09:00:01.250+00:00", "attempt": 1,
                         "outcome": "success", "code": 250, "reply": "2.0.0 Ok: queued",
                         "duration_ms": 182.4}],
    })  # fmt: skip

    task_id: str = Field(description="the id the send returned")
    status: Status = Field(description="pending until sent (success) or given up (failed)")
    to: str = Field(description='the recipient ("hidden" for a contact form\'s task)')
    attempts: int = Field(description="attempts made so far")
    reason: str | None = Field(default=None, description="why it failed, or why it is retried")
    priority: Priority = Field(description="the lane it waits in")
    created_at: str = Field(description="when it was accepted, RFC 3339 UTC")
    updated_at: str = Field(description="its last change, RFC 3339 UTC")
    sent_at: str | None = Field(default=None, description="when the relay accepted it")
    next_attempt_at: str | None = Field(default=None, description="when it is tried again")
    scheduled_at: str | None = Field(default=None, description="its send_at, if it had one")
    expires_at: str | None = Field(default=None, description="not sent after this")
    request_id: str | None = Field(default=None, description="the X-Request-ID of the send")
    metadata: dict[str, str] | None = Field(default=None, description="as sent; absent if none")
    tags: list[str] | None = Field(default=None, description="as sent; absent if none")
    attempt_log: list[AttemptOut] = Field(description="every attempt, oldest first")

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

    model_config = ConfigDict(extra="forbid", **_example({"messages": [
        {"to": "ada@example.com", "subject": "Your code", "body": "Code: {code}",
         "variables": {"code": "493817"}, "priority": "high"},
        {"to": "bob@example.com", "subject": "Weekly news", "body": "Hello {username}",
         "username": "Bob", "priority": "low"},
    ]}))  # fmt: skip

    # Entries stay raw here so one bad message rejects only itself, not the whole batch;
    # the schema still says what each must be.
    messages: list[Any] = Field(
        min_length=1, max_length=MAX_BATCH,
        description="each one a send request, as for POST /api/v1/email/received",
        # Any entry is taken and answered in `results` (an invalid one rejected on its own),
        # so the schema may not refuse one: it names the send request as the expected kind.
        json_schema_extra={"items": {"anyOf": [
            {"$ref": "#/components/schemas/EmailRequest"},
            {"description": "anything else: rejected on its own, see its entry in results"},
        ]}},
    )  # fmt: skip


class BatchEntry(BaseModel):
    """One message of a batch: its task id, or why it was rejected."""

    index: int = Field(description="the message's position in the request, from 0")
    task_id: str | None = Field(default=None, description="its task, when it was queued")
    status: Literal["queued"] | None = Field(default=None, description="queued, when it was")
    error: str | None = Field(
        default=None, description="why it was rejected: the code a single send would answer"
    )
    detail: str | None = Field(default=None, description="the rejection, for a person")
    fields: list[dict[str, Any]] | None = Field(
        default=None, description="each problem of an invalid message, as an error's `fields`"
    )


class BatchAccepted(BaseModel):
    """The answer to a batch: one entry per message, in request order."""

    model_config = _example({
        "results": [{"index": 0, "task_id": TASK_ID, "status": "queued"},
                    {"index": 1, "error": "validation_error",
                     "detail": "to: value is not a valid email address",
                     "fields": [{"loc": ["to"], "msg": "value is not a valid email address",
                                 "type": "value_error"}]}],
        "queued": 1, "rejected": 1,
    })  # fmt: skip

    results: list[BatchEntry] = Field(description="one entry per message, in request order")
    queued: int = Field(description="messages queued")
    rejected: int = Field(description="messages rejected")


class BatchErrorBody(ErrorBody):
    """A batch none of whose messages was queued: the error, and why for each message."""

    results: list[BatchEntry] | None = Field(
        default=None, description="one entry per message, when the batch itself was valid"
    )
    queued: int | None = Field(default=None, description="0, with results")
    rejected: int | None = Field(default=None, description="every message, with results")


class FailedPage(BaseModel):
    """One page of dead letters, newest first."""

    model_config = _example({"tasks": [], "offset": 0, "limit": 50})

    tasks: list[TaskResult] = Field(description="the failed tasks of this page")
    offset: int = Field(description="as requested")
    limit: int = Field(description="as requested")
    # Not required: absent on the last page (the route drops None values).
    next_offset: int | None = Field(
        default=None,
        description="offset of the next page; absent on the last. With a tag or metadata "
        "filter, the position in the whole dead-letter list to go on from",
    )


class RequeueRequest(BaseModel):
    """Which dead letters to send again: ``task_ids``, or ``all``."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"task_ids": [TASK_ID]}, {"all": True}],
            # `_one_of` as a schema: a list of ids (all absent or false), or all true alone.
            "oneOf": [
                {"required": ["task_ids"],
                 "properties": {"task_ids": {"type": "array"}, "all": {"const": False}}},
                {"required": ["all"],
                 "properties": {"all": {"const": True}, "task_ids": {"type": "null"}}},
            ],
        },
    )  # fmt: skip

    task_ids: list[uuid.UUID] | None = Field(
        default=None, max_length=MAX_REQUEUE_IDS,
        description="failed tasks to send again (others are skipped); not with all",
    )  # fmt: skip
    # Strict: `"all": 0` or `"all": "yes"` is a mistake to answer 422, not a false or a true.
    all_: StrictBool = Field(default=False, alias="all", description="every failed task")

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.task_ids is None) == (not self.all_):
            raise ValueError('give either "task_ids" or "all": true')
        return self


class Requeued(BaseModel):
    """The tasks that were failed and are pending again."""

    model_config = _example({"requeued": 1, "task_ids": [TASK_ID]})

    requeued: int = Field(description="how many")
    task_ids: list[str] = Field(description="which")


class Cancelled(BaseModel):
    """A pending or scheduled task that will not be sent: it is now failed, 'cancelled'."""

    model_config = _example({"task_id": TASK_ID, "status": "cancelled"})

    task_id: str = Field(description="the cancelled task")
    status: Literal["cancelled"] = Field(
        default="cancelled",
        description="always cancelled; its result reads failed, reason 'cancelled'",
    )


class Health(BaseModel):
    """The process answers."""

    model_config = _example({"status": "ok"})

    status: Literal["ok"] = Field(default="ok", description="always ok")


class Ready(BaseModel):
    """Redis answers."""

    model_config = _example({"status": "ready"})

    status: Literal["ready"] = Field(default="ready", description="always ready")
