"""``GET /metrics``: Prometheus text of this API process and of the queue (server.metrics).

Who may read it: what the admin endpoints take (an admin key with API_KEYS; without them,
local requests only), or the ``METRICS_TOKEN`` bearer token, so that Prometheus needs no
admin key, which could also requeue and cancel mail. The token only ever opens this page.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from server.auth import authenticate, require_admin
from server.deps import metrics_of, queue_of, settings_of

router = APIRouter(tags=["metrics"])


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _holds_token(request: Request, token: SecretStr) -> bool:
    """Does the request carry ``Authorization: Bearer <token>``? (Compared as digests, in
    constant time: how long it takes says nothing about how much of it matched.)"""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(_digest(given), _digest(token.get_secret_value()))


async def require_metrics_access(request: Request) -> None:
    """The metrics token, or admin access (server.auth.require_admin)."""
    settings = settings_of(request)
    if settings.metrics_token is not None and _holds_token(request, settings.metrics_token):
        return
    # Anything else is judged as an admin call is: a wrong key is 401 and counts towards
    # AUTH_FAILURE_LIMIT; without API_KEYS, a request from elsewhere is 403.
    await require_admin(request, await authenticate(request), settings)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_access)])
async def metrics(request: Request) -> Response:
    """Prometheus text: this process's requests, and the queue's gauges read now."""
    # Live as in the stats: a heartbeat (every third of a lease) in the last three leases.
    window_ms = settings_of(request).live_window_ms
    body = await metrics_of(request).render(queue_of(request), live_window_ms=window_ms)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
