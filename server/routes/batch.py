"""Batch send: up to 100 messages, each validated on its own, stored in one round trip."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from emailq.compose import EmailRequest
from emailq.errors import Forbidden, InvalidMessage, MessageTooLarge
from emailq.queue import EnqueueItem
from emailq.submit import REJECTED, prepare
from server.auth import PrincipalDep
from server.deps import (
    QueueDep,
    RequestIdDep,
    SettingsDep,
    TemplatesDep,
    metrics_of,
    queue_of,
    request_id_of,
    settings_of,
    templates_of,
)
from server.direct import direct_route
from server.errors import error_response, validation_detail, validation_fields
from server.idempotency import IdempotencyKeyDep, batch_once
from server.openapi import errors
from server.quota import quota_owner
from server.ratelimit import check_key_rate
from server.routes.email import SEND_ERRORS, ordinary_send
from server.schemas import BatchAccepted, BatchEntry, BatchErrorBody, BatchRequest

router = APIRouter(prefix="/emails", tags=["email"])
log = logging.getLogger("emailq.api")

BATCH_PATH = "/emails/batch"  # under the API prefix; the middleware gives it its own size cap


def _rejected(index: int, exc: Exception) -> BatchEntry:
    """A message's refusal (one of ``REJECTED``) as a single send would answer it."""
    if isinstance(exc, ValidationError):
        fields = validation_fields(exc.errors())
        return BatchEntry(index=index, error="validation_error",
                          detail=validation_detail(fields), fields=fields)  # fmt: skip
    if isinstance(exc, InvalidMessage):
        fields = [{"loc": [exc.field], "msg": str(exc)}] if exc.field else []
        return BatchEntry(index=index, error="invalid_message", detail=str(exc), fields=fields)
    if isinstance(exc, Forbidden):  # a single send answers 403 forbidden
        return BatchEntry(index=index, error="forbidden", detail=str(exc))
    return BatchEntry(index=index, error="payload_too_large", detail=str(exc))


def _check_stored(stored: int, limit: int) -> None:
    """Refuse (413) a batch whose messages, as Redis would store them, pass ``limit`` bytes.

    Each message is held to MAX_BODY_BYTES after its placeholders are filled, so without
    this a batch of 100 small messages that repeat a variable could grow 250-fold into one
    store of 100 MiB: Redis busy past every client's timeout, the API's memory with it.
    Measured as stored (JSON), not as text: a control character is 6 bytes there, so text
    of them grew 6-fold again (helper-48). Checked as each message is made, so no more than
    ``limit`` is ever rendered."""
    if stored > limit:
        raise MessageTooLarge(
            f"the batch's messages come to over {limit} bytes as stored, after substitution "
            "(text, html and attachments); send them as smaller batches"
        )


async def _batch_arguments(request: Request, response: Response) -> dict[str, Any] | None:
    """``send_batch``'s arguments for an ordinary request (server/direct.py)."""
    resolved = await ordinary_send(request, BatchRequest)
    if resolved is None:
        return None
    principal, body, key = resolved
    return {"principal": principal, "body": body, "request": request, "response": response,
            "queue": queue_of(request), "settings": settings_of(request),
            "request_id": request_id_of(request), "templates": templates_of(request),
            "idempotency_key": key}  # fmt: skip


async def send_batch(
    principal: PrincipalDep,
    body: BatchRequest,
    request: Request,
    response: Response,
    queue: QueueDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    templates: TemplatesDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> BatchAccepted | JSONResponse:
    """Accept up to 100 emails; each is queued or rejected on its own (422 if none is valid)."""
    now = datetime.now(UTC)
    items: list[EnqueueItem] = []
    results: list[BatchEntry] = []
    quota = quota_owner(request, principal)
    stored_bytes = 0
    for index, raw in enumerate(body.messages):
        try:
            item = prepare(EmailRequest.model_validate(raw), principal, now, settings,
                           request_id=request_id, quota=quota, templates=templates)  # fmt: skip
        except REJECTED as exc:
            results.append(_rejected(index, exc))
            continue
        stored_bytes += len(item.job.model_dump_json())
        _check_stored(stored_bytes, settings.max_batch_request_bytes)
        items.append(item)
        results.append(BatchEntry(index=index, task_id=item.task_id, status="queued"))
    answer = BatchAccepted(results=results, queued=len(items), rejected=len(results) - len(items))
    if not items:
        detail = f"none of the {len(results)} messages is valid; see results"
        if all(entry.error == "forbidden" for entry in results):
            detail = "no message may be sent to its recipients; see results"
            return error_response(request, 403, "forbidden", detail,
                                  **answer.model_dump(exclude_none=True))  # fmt: skip
        return error_response(request, 422, "validation_error", detail,
                              **answer.model_dump(exclude_none=True))  # fmt: skip
    once = await batch_once(request, queue, idempotency_key)
    if once is None or not once.replay:
        # Each queued message counts against the key's rate limit: a batch of 100 is 100
        # sends, not a way around it. Over the limit the whole batch is refused (429).
        await check_key_rate(request, response, principal, cost=len(items))
    replies = await queue.enqueue_many(items, once.idempotency if once else None)
    stored = {
        item.task_id: (r.task_id if r else item.task_id)
        for item, r in zip(items, replies, strict=True)
    }
    metrics_of(request).accepted_batch(items, replies)
    answer.results = [e.model_copy(update={"task_id": stored[e.task_id]}) if e.task_id else e
                      for e in results]  # fmt: skip
    if once is not None and all(r is not None for r in replies):
        response.headers["Idempotent-Replayed"] = "true"
    log.info("queued batch of %d (%d rejected)", answer.queued, answer.rejected,
             extra={"request_id": request_id})  # fmt: skip
    return answer


# `router.post`, with the route class of the single send (server/direct.py).
router.add_api_route(
    "/batch", send_batch, methods=["POST"], status_code=202, response_model=BatchAccepted,
    response_model_exclude_none=True,
    responses=SEND_ERRORS | errors(model=BatchErrorBody, why={
        403: "no message may be sent to its recipients (`results` says why for each); or, "
             "while API_KEYS is unset, the request is not a local one",
        422: "the batch is malformed, or none of its messages is valid (`results` says why "
             "for each)",
    }),
    route_class_override=direct_route(_batch_arguments),
)  # fmt: skip
