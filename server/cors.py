"""CORS for the API from ``CORS_ORIGINS``: which web pages may call it from a browser.

CORS only relaxes the browser's same-origin rule for pages on those origins; it is never
authentication. The Origin header is sent by browsers but anyone else can forge it, so no
decision about who the caller is or what it may do looks at it (API keys do that).

Contact forms under ``/api/v1/forms/`` answer CORS per form, from each form's own allowed
origins; the global middleware stays out of their way, or it would answer their preflights
with the global list.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
EXPOSE_HEADERS = ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
                  "X-Request-ID", "Idempotent-Replayed"]  # fmt: skip


def allow_origin(headers: MutableHeaders, origin: str) -> None:
    """The headers of an answer a form's page on ``origin`` may read, with the ones that
    say why it was refused or limited (a form answers CORS itself, not the middleware)."""
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSE_HEADERS)
    headers["Vary"] = "Origin"


class ApiCorsMiddleware:
    """Starlette's CORSMiddleware for paths under ``prefix``, except those under ``exclude``."""

    def __init__(
        self, app: ASGIApp, *, origins: Sequence[str], prefix: str, exclude: Sequence[str] = ()
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.exclude = tuple(exclude)
        # No credentials: callers authenticate with a bearer key, never with cookies, so
        # a page on an allowed origin cannot ride on a visitor's session.
        self.cors = CORSMiddleware(
            app, allow_origins=list(origins), allow_methods=["GET", "POST"],
            allow_headers=ALLOW_HEADERS, expose_headers=EXPOSE_HEADERS, max_age=600,
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path.startswith(self.prefix)
            and not path.startswith(self.exclude)
        ):
            await self.cors(scope, receive, send)
            return
        await self.app(scope, receive, send)
