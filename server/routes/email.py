"""The original service's two endpoints, with priorities, scheduling and waiting."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from emailq.compose import EmailRequest, compose, schedule
from emailq.forms import OWNER_PREFIX
from emailq.queue import EnqueueItem
from server.auth import Principal, PrincipalDep, check_recipients, local_refusal
from server.deps import QueueDep, WaiterDep, enqueuer_of, request_id_of, settings_of
from server.idempotency import IdempotencyKeyDep, send_once
from server.quota import quota_owner
from server.ratelimit import check_key_rate
from server.schemas import Accepted, TaskResult

router = APIRouter(prefix="/email", tags=["email"])
log = logging.getLogger("emailq.api")

MAX_WAIT_SECONDS = 30


@router.post("/received", status_code=202)
async def receive_email(
    principal: PrincipalDep, payload: EmailRequest,
    request: Request, response: Response, idempotency_key: IdempotencyKeyDep = None,
) -> Accepted:  # fmt: skip
    """Accept an email for sending. Answers 202 once it is stored in Redis."""
    # Accessors, not dependencies, on this hot path: see server/deps.py.
    settings, request_id = settings_of(request), request_id_of(request)
    job = compose(payload, max_body_bytes=settings.max_body_bytes)
    check_recipients(principal, settings, job)
    when = schedule(payload, datetime.now(UTC))
    # Counted once it would be stored: a refused request costs neither us nor its budget.
    await check_key_rate(request, response, principal)
    # uuid4: 122 random bits from os.urandom, so task ids cannot be guessed.
    item = EnqueueItem(str(uuid.uuid4()), job, request_id, when.lane, when.send_at_ms,
                       when.expires_at_ms, principal.owner,
                       quota_owner(request, principal))  # fmt: skip
    return await send_once(request, response, enqueuer_of(request), item, idempotency_key)


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


@router.get("/result", response_model_exclude_none=True)
async def email_result(
    task_id: Annotated[uuid.UUID, Query(description="the id returned by the send")],
    principal: PrincipalDep,
    request: Request,
    queue: QueueDep,
    waiter: WaiterDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="seconds to wait for a final status")
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
