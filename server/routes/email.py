"""The original service's two endpoints."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from emailq.compose import EmailRequest, compose
from server.deps import QueueDep, RequestIdDep, SettingsDep
from server.schemas import Accepted, TaskResult

router = APIRouter(prefix="/email", tags=["email"])
log = logging.getLogger("emailq.api")


@router.post("/received", status_code=202)
async def receive_email(
    payload: EmailRequest, queue: QueueDep, settings: SettingsDep, request_id: RequestIdDep
) -> Accepted:
    """Accept an email for sending. Answers 202 once it is stored in Redis."""
    job = compose(payload, max_body_bytes=settings.max_body_bytes)
    # uuid4: 122 random bits from os.urandom, so task ids cannot be guessed.
    task_id = str(uuid.uuid4())
    await queue.enqueue(task_id, job, request_id=request_id)
    log.info("queued", extra={"request_id": request_id, "task_id": task_id})
    return Accepted(task_id=task_id)


@router.get("/result", response_model_exclude_none=True)
async def email_result(
    task_id: Annotated[uuid.UUID, Query(description="the id returned by the send")],
    queue: QueueDep,
) -> TaskResult:
    """The status of a send: pending, success or failed, with its attempt log."""
    record = await queue.get(str(task_id))
    if record is None:
        raise HTTPException(404, f"no task {task_id} (unknown, or expired after its TTL)")
    return TaskResult.of(record)
