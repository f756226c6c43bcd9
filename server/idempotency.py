"""The ``Idempotency-Key`` header of the send endpoint, with the semantics of Stripe and Resend.

The first request with a key stores its task and, in the same Lua step, a record of the key
(scoped to the caller's API key, kept 24 h). A repeat with the same body gets the first
answer again, with ``Idempotent-Replayed: true``, and sends nothing; the same key with
another body is 409. The batch endpoint refuses the header (422) rather than ignore it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated

from fastapi import Header, Request, Response
from fastapi.exceptions import RequestValidationError

from emailq.queue import EnqueueItem, Idempotency, Queue
from server.errors import IdempotencyConflict
from server.schemas import Accepted

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
ANONYMOUS = "anonymous"  # the scope while no API key identifies the caller

log = logging.getLogger("emailq.api")

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=256,
        # Printable ASCII only: the key is compared byte for byte and may be logged.
        pattern=r"^[\x20-\x7e]+$",
        description="1-256 printable ASCII characters; a repeat within 24 h sends nothing",
    ),
]


def fingerprint(raw: bytes) -> str:
    """SHA-256 of the body as canonical JSON: key order and whitespace do not count."""
    # A client library that re-serializes a retry may reorder keys; any changed value,
    # though, is a different request. Bodies that are not JSON never reach a route.
    canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def send_once(
    request: Request, response: Response, queue: Queue, item: EnqueueItem, key: str
) -> Accepted:
    """Enqueue ``item`` unless ``key`` was used: then answer as the first time, or 409."""
    scope = str(getattr(request.state, "key_id", ANONYMOUS))
    once = Idempotency(scope=scope, key=key, fingerprint=fingerprint(await request.body()))
    replay = await queue.enqueue_once(item, once)
    if replay is None:
        log.info("queued", extra={"request_id": item.request_id, "task_id": item.task_id})
        return Accepted(task_id=item.task_id)
    if not replay.same_request:
        raise IdempotencyConflict(
            f"this {HEADER} was used with a different request body (task {replay.task_id})"
        )
    response.headers[REPLAYED] = "true"
    log.info("replayed", extra={"request_id": item.request_id, "task_id": replay.task_id})
    return Accepted(task_id=replay.task_id)


def refuse_idempotency_key(
    key: Annotated[str | None, Header(alias=HEADER, include_in_schema=False)] = None,
) -> None:
    """For endpoints without idempotency: a key sent there is refused, not silently ignored."""
    if key is not None:
        raise RequestValidationError([{
            "loc": ("header", HEADER), "type": "not_supported",
            "msg": f"{HEADER} is supported on POST /api/v1/email/received only, not on batches",
        }])  # fmt: skip
