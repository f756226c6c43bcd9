"""Webhook endpoints and their deliveries (admin): register, list, delete, re-enable,
list deliveries (failed ones, say) and replay one. Deliveries are made by the dispatcher
process (``python -m worker.webhooks``); see emailq.webhooks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, Field

from emailq.errors import InvalidMessage
from emailq.models import iso
from emailq.settings import Settings
from emailq.webhooks.models import (
    ENDPOINT_ID,
    AttemptOutcome,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EndpointChange,
    EndpointSpec,
    Source,
    WebhookEvent,
)
from emailq.webhooks.signing import mask
from emailq.webhooks.store import new_endpoint_id
from emailq.webhooks.targets import TargetRefused, check_url
from server.auth import AdminDep
from server.deps import SettingsDep, WebhooksDep
from server.schemas import _example

router = APIRouter(
    prefix="/admin/webhooks",
    tags=["webhooks"],
    dependencies=[AdminDep],
    responses={401: {"description": "API_KEYS is set and no valid key was given"},
               403: {"description": "not an admin key; or API_KEYS is unset and the request "
                                    "is not local"}},
)  # fmt: skip
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown endpoint"}}
FROM_FILE: dict[int | str, dict[str, Any]] = {409: {"description": "set in WEBHOOKS_FILE"}}
EXAMPLE_ENDPOINT = "ep_k3x9q2m7v4w8"
EXAMPLE_MSG = "msg_" + "abcdefghijklmnopqrstuvwxyz234567"
EndpointId = Annotated[str, Path(pattern=ENDPOINT_ID, description="the endpoint's id",
                                 examples=[EXAMPLE_ENDPOINT])]  # fmt: skip
MsgId = Annotated[str, Path(pattern=r"^msg_[a-z2-7]{32}$", description="the webhook-id",
                            examples=[EXAMPLE_MSG])]  # fmt: skip
_ENDPOINT = {
    "id": EXAMPLE_ENDPOINT,
    "url": "https://app.example.com/hooks/email",
    "events": ["email.sent", "email.failed"],
    "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    "description": "order mails",
    "source": "api",
    "created_at": "2025-01-31T09:00:00.000+00:00",
    "updated_at": None,
    "disabled_at": None,
    "disabled_reason": None,
}
_DELIVERY = {
    "id": EXAMPLE_MSG, "endpoint_id": EXAMPLE_ENDPOINT, "type": "email.sent",
    "task_id": "3f2b8c1e-6d4a-4e8b-9c7f-1a2b3c4d5e6f", "status": "succeeded", "attempts": 1,
    "created_at": "2025-01-31T09:00:01.000+00:00", "updated_at": "2025-01-31T09:00:01.000+00:00",
    "next_attempt_at": None, "reason": None,
    "payload": {"type": "email.sent", "created_at": "2025-01-31T09:00:01.000+00:00", "data": {}},
    "attempt_log": [{"at": "2025-01-31T09:00:01.000+00:00", "attempt": 1,
                     "outcome": "succeeded", "status_code": 204, "duration_ms": 41.0,
                     "url": "https://app.example.com/hooks/email"}],
}  # fmt: skip


class EndpointOut(BaseModel):
    """A webhook endpoint. Lists mask its secrets; the endpoint's own page shows them."""

    model_config = _example(_ENDPOINT)

    id: str = Field(description="the endpoint's id")
    url: str = Field(description="where deliveries are POSTed")
    events: list[WebhookEvent] = Field(description="the event types it receives")
    secrets: list[str] = Field(description="whsec_ signing secrets, newest first")
    description: str = Field(description="a note for people")
    source: Source = Field(description="file: WEBHOOKS_FILE; api: registered here")
    created_at: str | None = Field(description="when it was registered, RFC 3339 UTC")
    updated_at: str | None = Field(
        default=None, description="its last change or rotation here; null: none since"
    )
    disabled_at: str | None = Field(description="when it answered 410 Gone; null: enabled")
    disabled_reason: str | None = Field(description="why it was disabled")

    @classmethod
    def of(cls, endpoint: Endpoint, *, reveal: bool) -> EndpointOut:
        """The API's view of ``endpoint``."""
        shown = endpoint.secrets if reveal else [mask(s) for s in endpoint.secrets]
        return cls(id=endpoint.id, url=endpoint.url, events=endpoint.events, secrets=shown,
                   description=endpoint.description, source=endpoint.source,
                   created_at=iso(endpoint.created_at), updated_at=iso(endpoint.updated_at),
                   disabled_at=iso(endpoint.disabled_at),
                   disabled_reason=endpoint.disabled_reason)  # fmt: skip


class EndpointList(BaseModel):
    """Every endpoint, file and API."""

    model_config = _example({"endpoints": [_ENDPOINT]})

    endpoints: list[EndpointOut] = Field(description="secrets masked")


class AttemptOut(BaseModel):
    """One attempt of a delivery, as the API shows it (times as everywhere else here)."""

    at: str = Field(description="when it ended, RFC 3339 UTC")
    attempt: int = Field(description="1 for the first attempt")
    outcome: AttemptOutcome = Field(
        description="succeeded (2xx), retry (scheduled again), failed (given up), replay"
    )
    status_code: int | None = Field(description="the endpoint's HTTP status, when it answered")
    error: str | None = Field(description="what went wrong, in one line")
    duration_ms: float | None = Field(description="how long the attempt took")
    url: str | None = Field(
        description="where it went: the endpoint's url then (it may move), without its query"
    )

    @classmethod
    def of(cls, entry: DeliveryAttempt) -> AttemptOut:
        """The API's view of a stored attempt (its time in epoch ms)."""
        return cls(**entry.model_dump(exclude={"at"}), at=iso(entry.at) or "")


class DeliveryOut(BaseModel):
    """One delivery: the same webhook-id and body on every attempt."""

    model_config = _example(_DELIVERY)

    id: str = Field(description="the webhook-id header")
    endpoint_id: str = Field(description="the endpoint it goes to")
    type: WebhookEvent = Field(description="the event type")
    task_id: str = Field(description="the mail's task id")
    status: DeliveryStatus = Field(description="pending, succeeded or failed")
    attempts: int = Field(description="attempts made so far")
    created_at: str | None = Field(description="when the event was read, RFC 3339 UTC")
    updated_at: str | None = Field(description="its last change, RFC 3339 UTC")
    next_attempt_at: str | None = Field(description="when it is tried again, if pending")
    reason: str | None = Field(description="why it failed or is retried")
    payload: dict[str, Any] = Field(description="the body, as signed and sent")
    attempt_log: list[AttemptOut] = Field(description="every attempt, oldest first")

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        """The API's view of ``d``."""
        return cls(id=d.id, endpoint_id=d.endpoint_id, type=d.type, task_id=d.task_id,
                   status=d.status, attempts=d.attempts, created_at=iso(d.created_at),
                   updated_at=iso(d.updated_at), next_attempt_at=iso(d.next_attempt_at),
                   reason=d.reason, payload=d.payload,
                   attempt_log=[AttemptOut.of(entry) for entry in d.log])  # fmt: skip


class DeliveryPage(BaseModel):
    """A page of deliveries, newest first."""

    model_config = _example({"deliveries": [_DELIVERY], "offset": 0, "limit": 50})

    deliveries: list[DeliveryOut] = Field(description="the deliveries of this page")
    offset: int = Field(description="as requested")
    limit: int = Field(description="as requested")
    next_offset: int | None = Field(
        default=None, description="offset of the next page; absent on the last"
    )


class Replayed(BaseModel):
    """A delivery queued again."""

    model_config = _example({"id": EXAMPLE_MSG, "status": "pending"})

    id: str = Field(description="the webhook-id, the same as before")
    status: DeliveryStatus = Field(default=DeliveryStatus.PENDING, description="pending again")


async def _endpoint(webhooks: WebhooksDep, endpoint_id: str) -> Endpoint:
    endpoint = await webhooks.endpoint(endpoint_id)
    if endpoint is None:
        raise HTTPException(404, f"no webhook endpoint {endpoint_id}")
    return endpoint


def _check_target(url: str, settings: Settings) -> None:
    """Refuse (422) a URL deliveries may not go to (README, Webhooks: No SSRF)."""
    try:
        check_url(url, allow_private=settings.webhook_allow_private)
    except TargetRefused as exc:
        raise InvalidMessage(f"url: {exc}", field="url") from None


@router.post("", status_code=201, responses={409: {"description": "too many endpoints"}})
async def create(spec: EndpointSpec, webhooks: WebhooksDep, settings: SettingsDep) -> EndpointOut:
    """Register an endpoint; its secret is generated unless given (shown in full here)."""
    _check_target(spec.url, settings)
    endpoint = await webhooks.add_endpoint(spec, new_endpoint_id())
    if endpoint is None:
        raise HTTPException(409, "too many webhook endpoints; delete one first")
    return EndpointOut.of(endpoint, reveal=True)


@router.get("")
async def list_endpoints(webhooks: WebhooksDep) -> EndpointList:
    """Every endpoint (secrets masked)."""
    return EndpointList(endpoints=[EndpointOut.of(e, reveal=False)
                                   for e in await webhooks.endpoints()])  # fmt: skip


@router.get("/{endpoint_id}", responses=NOT_FOUND)
async def get_endpoint(endpoint_id: EndpointId, webhooks: WebhooksDep) -> EndpointOut:
    """One endpoint, with its secrets."""
    return EndpointOut.of(await _endpoint(webhooks, endpoint_id), reveal=True)


def _changed(endpoint_id: str, outcome: Endpoint | str) -> EndpointOut:
    if isinstance(outcome, Endpoint):
        return EndpointOut.of(outcome, reveal=True)
    if outcome == "file":
        raise HTTPException(409, f"{endpoint_id} is configured in WEBHOOKS_FILE; change it there")
    raise HTTPException(404, f"no webhook endpoint {endpoint_id}")


@router.patch("/{endpoint_id}", responses={**NOT_FOUND, **FROM_FILE})
async def change_endpoint(
    endpoint_id: EndpointId, change: EndpointChange, webhooks: WebhooksDep, settings: SettingsDep
) -> EndpointOut:
    """Change an API endpoint's url, events, secrets or description (the fields given);
    deliveries use them from their next attempt. Shows its secrets in full. A disabled
    endpoint stays disabled: enable it once its new url answers."""
    if change.url is not None:
        _check_target(change.url, settings)
    return _changed(endpoint_id, await webhooks.change_endpoint(endpoint_id, change.changes()))


@router.post("/{endpoint_id}/secrets/rotate", responses={**NOT_FOUND, **FROM_FILE})
async def rotate(endpoint_id: EndpointId, webhooks: WebhooksDep) -> EndpointOut:
    """Generate a new secret for an API endpoint: it signs every delivery from now on, the
    newest old one beside it, until a PATCH of ``secrets`` drops that (older ones go now).
    Shows the secrets in full."""
    return _changed(endpoint_id, await webhooks.rotate_secret(endpoint_id))


@router.delete("/{endpoint_id}", status_code=204, responses={**NOT_FOUND, **FROM_FILE})
async def delete_endpoint(endpoint_id: EndpointId, webhooks: WebhooksDep) -> Response:
    """Remove an API endpoint; its pending deliveries fail, unsent."""
    outcome = await webhooks.delete_endpoint(endpoint_id)
    if outcome == "missing":
        raise HTTPException(404, f"no webhook endpoint {endpoint_id}")
    if outcome == "file":
        raise HTTPException(409, f"{endpoint_id} is configured in WEBHOOKS_FILE; remove it there")
    return Response(status_code=204)


@router.post("/{endpoint_id}/enable", responses=NOT_FOUND)
async def enable(endpoint_id: EndpointId, webhooks: WebhooksDep) -> EndpointOut:
    """Deliver to an endpoint again after it answered 410 Gone."""
    if not await webhooks.enable_endpoint(endpoint_id):
        raise HTTPException(404, f"no webhook endpoint {endpoint_id}")
    return EndpointOut.of(await _endpoint(webhooks, endpoint_id), reveal=False)


@router.get("/{endpoint_id}/deliveries", responses=NOT_FOUND)
async def deliveries(
    endpoint_id: EndpointId,
    webhooks: WebhooksDep,
    status: Annotated[
        DeliveryStatus | None,
        Query(description="only deliveries in this state", examples=["failed"]),
    ] = None,
    offset: Annotated[
        int, Query(ge=0, le=1_000_000_000, description="deliveries to skip, newest first")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="deliveries on this page")] = 50,
) -> DeliveryPage:
    """An endpoint's deliveries, newest first; ``status=failed`` lists the failed ones."""
    await _endpoint(webhooks, endpoint_id)
    found = await webhooks.deliveries(endpoint_id, status, offset=offset, limit=limit + 1)
    more = len(found) > limit
    return DeliveryPage(deliveries=[DeliveryOut.of(d) for d in found[:limit]], offset=offset,
                        limit=limit, next_offset=offset + limit if more else None)  # fmt: skip


@router.get("/{endpoint_id}/deliveries/{msg_id}", responses=NOT_FOUND)
async def delivery(endpoint_id: EndpointId, msg_id: MsgId, webhooks: WebhooksDep) -> DeliveryOut:
    """One delivery with its attempt log."""
    found = await webhooks.delivery(endpoint_id, msg_id)
    if found is None:
        raise HTTPException(404, f"no delivery {msg_id} for endpoint {endpoint_id}")
    return DeliveryOut.of(found)


@router.post("/{endpoint_id}/deliveries/{msg_id}/replay", status_code=202,
             responses={**NOT_FOUND, 409: {"description": "still pending, or endpoint "
                                                          "disabled"}})  # fmt: skip
async def replay(endpoint_id: EndpointId, msg_id: MsgId, webhooks: WebhooksDep) -> Replayed:
    """Send a finished delivery again: same webhook-id and body, a fresh retry schedule."""
    outcome = await webhooks.replay(endpoint_id, msg_id)
    if outcome == "missing":
        raise HTTPException(404, f"no delivery {msg_id} for endpoint {endpoint_id}")
    if outcome == "pending":
        raise HTTPException(409, f"delivery {msg_id} is still pending")
    if outcome == "disabled":
        raise HTTPException(409, f"endpoint {endpoint_id} is disabled; enable it first")
    return Replayed(id=msg_id)
