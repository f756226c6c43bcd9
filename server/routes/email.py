"""The original service's two endpoints, with priorities, scheduling and waiting."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel

from emailq.compose import EmailRequest
from emailq.forms import OWNER_PREFIX
from emailq.submit import prepare
from server.auth import Principal, PrincipalDep, authenticate, local_refusal
from server.deps import (
    QueueDep,
    WaiterDep,
    enqueuer_of,
    header,
    request_id_of,
    settings_of,
    templates_of,
)
from server.direct import direct_route, json_model
from server.idempotency import HEADER_KEY, IdempotencyKeyDep, send_once, valid_key
from server.openapi import errors
from server.quota import quota_owner
from server.ratelimit import check_key_rate
from server.schemas import Accepted, TaskResult

M = TypeVar("M", bound=BaseModel)

router = APIRouter(prefix="/email", tags=["email"])
log = logging.getLogger("emailq.api")

MAX_WAIT_SECONDS = 30
# What a send may answer besides 202, beyond what authenticating and validating imply
# (server/openapi.py); the batch answers the same.
SEND_ERRORS = errors(409, 413, 429, 507, why={
    403: "a recipient is outside the key's domains or ALLOWED_RECIPIENTS; or, while "
         "API_KEYS is unset, the request is not a local one",
    409: "this Idempotency-Key was used with a different body",
    422: "the request is invalid (`fields` names each problem), or the mail it makes is: "
         "a subject or placeholder value with a line break, send_at too far ahead ...",
})  # fmt: skip


async def ordinary_send(request: Request, model: type[M]) -> tuple[Principal, M, str | None] | None:
    """A send's caller, body and Idempotency-Key, resolved as FastAPI would (see
    server/direct.py), or None, before anything is counted, for a request FastAPI must
    judge. The batch resolves its request the same way."""
    key = header(request, HEADER_KEY)
    if key is not None and not valid_key(key):
        return None
    body = await json_model(request, model)
    if body is None:
        return None
    return await authenticate(request), body, key


async def _send_arguments(request: Request, response: Response) -> dict[str, Any] | None:
    """``receive_email``'s arguments for an ordinary request."""
    resolved = await ordinary_send(request, EmailRequest)
    if resolved is None:
        return None
    principal, payload, key = resolved
    return {"principal": principal, "payload": payload, "request": request,
            "response": response, "idempotency_key": key}  # fmt: skip


async def receive_email(
    principal: PrincipalDep, payload: EmailRequest,
    request: Request, response: Response, idempotency_key: IdempotencyKeyDep = None,
) -> Accepted:  # fmt: skip
    """Accept an email for sending. Answers 202 once it is stored in Redis."""
    # Accessors, not dependencies, on this hot path: see server/deps.py.
    quota = quota_owner(request, principal)
    item = prepare(payload, principal, datetime.now(UTC), settings_of(request),
                   request_id=request_id_of(request), quota=quota,
                   templates=templates_of(request))  # fmt: skip
    # Counted once it would be stored: a refused request costs neither us nor its budget.
    await check_key_rate(request, response, principal)
    return await send_once(request, response, enqueuer_of(request), item, idempotency_key)


# `router.post`, with the route class that resolves an ordinary send without FastAPI's
# per-request dependency resolution (server/direct.py); the schema is the same.
router.add_api_route(
    "/received", receive_email, methods=["POST"], status_code=202, responses=SEND_ERRORS,
    route_class_override=direct_route(_send_arguments),
)  # fmt: skip


def _no_task(task_id: uuid.UUID) -> HTTPException:
    return HTTPException(404, f"no task {task_id} (unknown, or expired after its TTL)")


def _may_read(principal: Principal, request: Request, owner: str | None) -> bool:
    """May this caller see a task created by ``owner``?

    A contact form's task belongs to the site owner, not to whoever holds its id: only
    those who may use the admin endpoints (an admin key; a local request while API_KEYS is
    unset) see it. Everyone else gets the 404 of an unknown task, which is also what the
    made-up id given to a honeypot-filling bot answers, so a bot cannot tell the two apart.
    The admin endpoints' own rule, whole: with ALLOWED_RECIPIENTS or ALLOW_OPEN_RELAY set,
    nothing before this checked Host, Origin or forwarding headers, and a loopback peer
    alone (a local reverse proxy, a DNS-rebinding page) read form tasks.
    """
    if (owner or "").startswith(OWNER_PREFIX):
        local = local_refusal(request, settings_of(request)) is None
        return principal.is_admin or (principal.anonymous and local)
    return principal.may_read(owner)


@router.get(
    "/result",
    response_model_exclude_none=True,
    responses=errors(why={404: "no such task, one this caller may not read, or one expired "
                               "after RESULT_TTL_SECONDS"}),
)  # fmt: skip
async def email_result(
    task_id: Annotated[
        uuid.UUID,
        Query(
            description="the id returned by the send",
            examples=["3f2b8c1e-6d4a-4e8b-9c7f-1a2b3c4d5e6f"],
        ),
    ],
    principal: PrincipalDep,
    request: Request,
    queue: QueueDep,
    waiter: WaiterDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            examples=[10],
            description="seconds to wait for a final status (0: answer at once)",
        ),
    ] = 0,
) -> TaskResult:
    """The status of a send, at once or as soon as it is final within ``wait`` seconds."""
    # A task the caller may not read answers exactly as an unknown one, 404 at once (not
    # after waiting), so its existence is not revealed. The record read to check that
    # starts the wait.
    record = await queue.get(str(task_id))
    if record is None or not _may_read(principal, request, record.key_id):
        raise _no_task(task_id)
    record = await waiter.wait(str(task_id), wait, known=record)
    if record is None:  # expired while waiting
        raise _no_task(task_id)
    return TaskResult.of(record)
