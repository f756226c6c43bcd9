"""Webhook endpoints, deliveries, and how stream events map to webhook event types."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from emailq.models import EventType, Status
from emailq.webhooks.signing import secret_key

ENDPOINT_ID = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SECRETS = 3  # the current secret and up to two being retired
MAX_URL_CHARS = 2048


class WebhookEvent(StrEnum):
    """The webhook event types an endpoint may subscribe to."""

    ACCEPTED = "email.accepted"  # stored by the API, a batch, a form or the CLI
    SENT = "email.sent"  # the relay accepted it (final)
    RETRYING = "email.retrying"  # an attempt failed; another is scheduled
    DEFERRED = "email.deferred"  # the relay failed, not the mail: queued again, uncounted
    FAILED = "email.failed"  # final: permanent error, out of attempts, or expired
    CANCELLED = "email.cancelled"  # final: an admin cancelled it before it was sent


# Stream events that become webhooks. Claims, lease expiries, releases and requeues are the
# queue's own business (the dashboard shows them); an expiry is a failure, reason 'expired'.
FROM_STREAM: dict[EventType, WebhookEvent] = {
    EventType.ACCEPTED: WebhookEvent.ACCEPTED,
    EventType.SENT: WebhookEvent.SENT,
    EventType.RETRY: WebhookEvent.RETRYING,
    EventType.DEFERRED: WebhookEvent.DEFERRED,
    EventType.FAILED: WebhookEvent.FAILED,
    EventType.EXPIRED: WebhookEvent.FAILED,
    EventType.CANCELLED: WebhookEvent.CANCELLED,
}
# The task's status right after each event (the payload's `status`), whatever it is now.
STATUS_AFTER: dict[WebhookEvent, Status] = {
    WebhookEvent.ACCEPTED: Status.PENDING,
    WebhookEvent.SENT: Status.SUCCESS,
    WebhookEvent.RETRYING: Status.PENDING,
    WebhookEvent.DEFERRED: Status.PENDING,
    WebhookEvent.FAILED: Status.FAILED,
    WebhookEvent.CANCELLED: Status.FAILED,
}
# An endpoint that names no events hears the outcomes: what most integrations act on.
DEFAULT_EVENTS = (WebhookEvent.SENT, WebhookEvent.FAILED, WebhookEvent.CANCELLED)


class Source(StrEnum):
    """Where an endpoint is configured."""

    FILE = "file"  # WEBHOOKS_FILE: changed there, not through the API
    API = "api"  # POST /api/v1/admin/webhooks


def _check_secrets(secrets: list[str]) -> list[str]:
    for secret in secrets:
        secret_key(secret)  # raises ValueError saying what is wrong, never echoing it
    if len(set(secrets)) != len(secrets):
        raise ValueError("secrets must differ")
    return secrets


def _unique(events: list[WebhookEvent]) -> list[WebhookEvent]:
    return list(dict.fromkeys(events))


def _one_line(value: str) -> str:
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("must be one line without control characters")
    return value


# An endpoint's fields as a registration (EndpointSpec) and a change (EndpointChange) take
# them: one definition, so a change is held to every rule a registration is.
Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS,
                           description="where deliveries are POSTed (http or https)")]  # fmt: skip
Events = Annotated[list[WebhookEvent], Field(min_length=1),
                   AfterValidator(_unique)]  # fmt: skip
Secrets = Annotated[list[str], Field(max_length=MAX_SECRETS), AfterValidator(_check_secrets)]
Description = Annotated[str, Field(max_length=200, description="a note for people"),
                        AfterValidator(_one_line)]  # fmt: skip
_SECRETS = ("whsec_<base64> signing secrets, newest first; every one signs each delivery "
            "(rotation)")  # fmt: skip


class EndpointSpec(BaseModel):
    """What configures an endpoint: a WEBHOOKS_FILE entry or an API request."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://app.example.com/hooks/email", "events": ["email.sent", "email.failed"],
         "description": "order mails"},
    ]})  # fmt: skip

    url: Url
    events: Events = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        description="event types to deliver; default email.sent, email.failed, "
        "email.cancelled",
    )  # fmt: skip
    secrets: Secrets = Field(default_factory=list, description=f"{_SECRETS}. Empty: one is "
                                                               "generated")  # fmt: skip
    description: Description = ""


class EndpointChange(BaseModel):
    """A change to an API endpoint: the fields given replace its own; those left out (or
    null) stay. The same rules as a registration."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"events": ["email.sent", "email.failed", "email.retrying"]},
        {"secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]},
    ]})  # fmt: skip

    url: Url | None = Field(default=None, description="where deliveries are POSTed")
    events: Events | None = Field(default=None, description="event types to deliver")
    secrets: Annotated[Secrets, Field(min_length=1)] | None = Field(
        default=None, description=f"{_SECRETS}: drop a retired one by leaving it out"
    )
    description: Description | None = Field(default=None, description="a note for people")

    @model_validator(mode="after")
    def _something(self) -> EndpointChange:
        if not self.changes():
            raise ValueError("give at least one of url, events, secrets, description")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields to replace, as the endpoint's JSON holds them."""
        return self.model_dump(mode="json", exclude_none=True)


class Endpoint(EndpointSpec):
    """A registered endpoint, as the store keeps it."""

    id: str = Field(pattern=ENDPOINT_ID)
    source: Source = Source.API
    created_at: int = 0  # epoch ms (Redis time); events before it are not delivered to it
    updated_at: int | None = None  # epoch ms of its last change or rotation through the API
    disabled_at: int | None = None  # set when it answered 410 Gone
    disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether deliveries go out to it."""
        return self.disabled_at is None

    def wants(self, event: WebhookEvent, at_ms: int) -> bool:
        """Does it take ``event``, which happened at ``at_ms``? A disabled endpoint does
        too: the delivery fails without a request, listed and replayable once enabled."""
        return event in self.events and at_ms >= self.created_at


class DeliveryStatus(StrEnum):
    """Where one delivery stands."""

    PENDING = "pending"  # waiting for its next attempt (or being attempted)
    SUCCEEDED = "succeeded"  # the endpoint answered 2xx
    FAILED = "failed"  # out of attempts, refused target, 410, or its endpoint is gone


# How an attempt ended: succeeded (2xx), retry (scheduled again), failed (given up), replay.
AttemptOutcome = Literal["succeeded", "retry", "failed", "replay"]


class DeliveryAttempt(BaseModel):
    """One attempt in a delivery's log."""

    at: int = Field(default=0, description="when, epoch ms (Redis time)")
    attempt: int = Field(description="1 for the first attempt")
    outcome: AttemptOutcome = Field(
        description="succeeded (2xx), retry (scheduled again), failed (given up), replay"
    )
    status_code: int | None = Field(
        default=None, description="the endpoint's HTTP status, when it answered"
    )
    error: str | None = Field(default=None, description="what went wrong, in one line")
    duration_ms: float | None = Field(default=None, description="how long the attempt took")
    url: str | None = Field(
        default=None, description="where it went, without its query (an endpoint may move)"
    )


class Delivery(BaseModel):
    """One event for one endpoint: the same webhook-id and body on every attempt."""

    id: str  # msg_...: the webhook-id header
    endpoint_id: str
    type: WebhookEvent
    task_id: str
    status: DeliveryStatus
    attempts: int
    created_at: int
    updated_at: int
    next_attempt_at: int | None = None
    reason: str | None = None
    payload: dict[str, Any]
    log: list[DeliveryAttempt] = Field(default_factory=list)
