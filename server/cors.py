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

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.requestid import new_request_id

ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
ALLOW_METHODS = ["GET", "POST"]
EXPOSE_HEADERS = ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
                  "X-Request-ID", "Idempotent-Replayed"]  # fmt: skip


def allow_origin(headers: MutableHeaders, origin: str) -> None:
    """The headers of an answer a form's page on ``origin`` may read, with the ones that
    say why it was refused or limited (a form answers CORS itself, not the middleware)."""
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSE_HEADERS)
    headers["Vary"] = "Origin"


class _Cors(CORSMiddleware):
    """Starlette's CORS, whose refused preflight answers in the API's error shape: a
    browser shows a page's script nothing of it, but a person trying it with curl reads
    what was refused and what is allowed. CORS answers before the request context, so the
    request id is made here."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        refused = bytes(answer.body).decode().removeprefix("Disallowed CORS ")
        detail = (f"CORS preflight refused: its {refused} is not allowed here (origins: "
                  f"CORS_ORIGINS; methods: {', '.join(ALLOW_METHODS)}; headers: "
                  f"{', '.join(ALLOW_HEADERS)})")  # fmt: skip
        request_id = new_request_id()
        headers = {name: value for name, value in answer.headers.items()
                   if name not in ("content-length", "content-type")}  # fmt: skip
        headers["X-Request-ID"] = request_id
        body = {"error": "cors_refused", "detail": detail, "request_id": request_id}
        return JSONResponse(body, status_code=400, headers=headers)


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
        self.cors = _Cors(
            app, allow_origins=list(origins), allow_methods=ALLOW_METHODS,
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
