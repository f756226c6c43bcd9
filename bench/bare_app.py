"""The enqueue reference: the same request model, validated, answered 202, nothing stored."""

from __future__ import annotations

import uuid

from fastapi import FastAPI

from emailq.compose import EmailRequest
from server.schemas import Accepted

app = FastAPI()


@app.post("/api/v1/email/received", status_code=202)
async def receive_email(payload: EmailRequest) -> Accepted:
    """Validate and answer; no Redis."""
    return Accepted(task_id=str(uuid.uuid4()))
