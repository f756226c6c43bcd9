"""The ``Idempotency-Key`` header of the send endpoint, with the semantics of Stripe and Resend.

The first request with a key stores its task and, in the same Lua step, a record of the key
(scoped to the caller's API key, or without API keys to the client's address; kept 24 h).
A repeat with the same body gets the first answer again, with ``Idempotent-Replayed:
true``, and sends nothing; the same key with another body is 409, which names no task.
Batches use the same header, with a record per message (see ``batch_once``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Header, Request, Response

from emailq.coalesce import EnqueueCoalescer
from emailq.logs import log_line
from emailq.queue import EnqueueItem, Idempotency, Queue
from server.clientaddr import client_address
from server.deps import metrics_of
from server.errors import IdempotencyConflict
from server.schemas import Accepted

HEADER = "Idempotency-Key"
HEADER_KEY = b"idempotency-key"  # HEADER as an ASGI scope lists it (server.deps.header)
REPLAYED = "Idempotent-Replayed"
ANONYMOUS = "anonymous"  # the key id while no API key identifies the caller
MAX_KEY_CHARS = 256
# Printable ASCII only: the key is compared byte for byte and may be logged.
KEY_PATTERN = r"^[\x20-\x7e]+$"
_KEY = re.compile(KEY_PATTERN)

log = logging.getLogger("emailq.api")

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=MAX_KEY_CHARS,
        pattern=KEY_PATTERN,
        description="1-256 printable ASCII characters; a repeat within 24 h sends nothing",
        examples=["order-1234-receipt"],
    ),
]


def valid_key(value: str) -> bool:
    """Does ``value`` meet ``IdempotencyKeyDep``'s constraints (for a route that reads the
    header itself, server/direct.py)?"""
    return len(value) <= MAX_KEY_CHARS and _KEY.fullmatch(value) is not None


def scope_of(request: Request) -> str:
    """The caller's key space: its API key's id, or without keys its address, so that
    callers without a key cannot reach (or learn about) each other's requests."""
    key_id = str(getattr(request.state, "key_id", ANONYMOUS))
    # "@" is not allowed in key ids: an address scope cannot collide with a key's.
    return f"{ANONYMOUS}@{client_address(request)}" if key_id == ANONYMOUS else key_id


def fingerprint(raw: bytes) -> str:
    """SHA-256 of the body as canonical JSON: key order and whitespace do not count."""
    # A client library that re-serializes a retry may reorder keys; any changed value,
    # though, is a different request. Bodies that are not JSON never reach a route.
    canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def send_once(
    request: Request,
    response: Response,
    enqueuer: EnqueueCoalescer,
    item: EnqueueItem,
    key: str | None,
) -> Accepted:
    """Enqueue ``item`` unless ``key`` was used: then answer as the first time, or 409.
    Without a key it simply enqueues."""
    once = None
    if key is not None:
        once = Idempotency(
            scope=scope_of(request), key=key, fingerprint=fingerprint(await request.body())
        )
    replay = await enqueuer.enqueue_once(item, once)
    if replay is None:
        metrics_of(request).accepted(item.lane)
        fields = {"request_id": item.request_id, "task_id": item.task_id, "lane": item.lane}
        log_line(log, logging.INFO, "accepted", fields)
        return Accepted(task_id=item.task_id)
    if not replay.same_request:
        raise IdempotencyConflict(f"this {HEADER} was used with a different request body")
    response.headers[REPLAYED] = "true"
    log.info("replayed", extra={"request_id": item.request_id, "task_id": replay.task_id})
    return Accepted(task_id=replay.task_id)


@dataclass(frozen=True)
class BatchOnce:
    """A batch's Idempotency-Key once checked: its record, and whether this is a repeat."""

    idempotency: Idempotency
    replay: bool


async def batch_once(request: Request, queue: Queue, key: str | None) -> BatchOnce | None:
    """Check a batch's key before anything is stored: 409 if it came with another body.

    Batch keys live in their own scope, apart from single sends' keys. Each message is then
    stored under ``<key>#<index>`` (``Queue.enqueue_many``), so a repeat, or an identical
    batch racing this one, gets the same task ids and creates nothing twice."""
    if key is None:
        return None
    once = Idempotency(
        scope="batch:" + scope_of(request), key=key, fingerprint=fingerprint(await request.body())
    )
    seen = await queue.guard_batch(once)
    if seen is False:
        raise IdempotencyConflict(f"this {HEADER} was used with a different batch body")
    return BatchOnce(once, replay=seen is True)
