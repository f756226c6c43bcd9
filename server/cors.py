"""CORS for the API from ``CORS_ORIGINS``: which web pages may call it from a browser.

CORS only relaxes the browser's same-origin rule for pages on those origins; it is never
authentication. The Origin header is sent by browsers but anyone else can forge it, so no
decision about who the caller is or what it may do looks at it (API keys do that).

Contact forms under ``/api/v1/forms/`` answer CORS per form, from each form's own allowed
origins; the global middleware stays out of their way, or it would answer their preflights
with the global list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.requeststate import ERROR_CODE_STATE, new_request_id

log = logging.getLogger("emailq.access")
CORS_REFUSED = "cors_refused"  # the error code of a refused preflight

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
    what was refused and what is allowed, and the operator finds it in the log and in
    ``emailq_rejections_total``. CORS answers before the request layer, so the request id
    is made here."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        preflight = "origin" in headers and "access-control-request-method" in headers
        if scope["method"] != "OPTIONS" or not preflight:
            await super().__call__(scope, receive, send)
            return
        answer = self.preflight_response(request_headers=headers)
        if answer.status_code == 400:
            answer = self._refused(scope, headers, answer)
        await answer(scope, receive, send)

    def _refused(self, scope: Scope, asked: Headers, answer: Response) -> Response:
        detail = "CORS preflight refused: " + "; ".join(self._reasons(asked))
        request_id = new_request_id()
        scope.setdefault("state", {})[ERROR_CODE_STATE] = CORS_REFUSED
        log.info("%s", detail, extra={"request_id": request_id, "http_method": "OPTIONS",
                                      "path": scope["path"], "http_status": 400})  # fmt: skip
        headers = {name: value for name, value in answer.headers.items()
                   if name not in ("content-length", "content-type")}  # fmt: skip
        headers["X-Request-ID"] = request_id
        body = {"error": CORS_REFUSED, "detail": detail, "request_id": request_id}
        return JSONResponse(body, status_code=400, headers=headers)

    def _reasons(self, asked: Headers) -> list[str]:
        """What the preflight asked that is not allowed, each with what is (the checks of
        Starlette's preflight_response, named). Header text is quoted and cut short."""
        reasons = []
        origin = asked["origin"]
        if not self.is_allowed_origin(origin=origin):
            reasons.append(f"origin {_quoted(origin)} is not in CORS_ORIGINS")
        method = asked["access-control-request-method"]
        if method not in self.allow_methods:
            allowed = ", ".join(self.allow_methods)
            reasons.append(f"method {_quoted(method)} is not one of {allowed}")
        requested = asked.get("access-control-request-headers")
        # As Starlette splits them: an empty name ("a,", "") is refused too, and named.
        names = [] if requested is None else [h.strip() for h in requested.lower().split(",")]
        refused = list(dict.fromkeys(h for h in names if h not in self.allow_headers))
        if refused:
            reasons.append(f"header {', '.join(_quoted(h) for h in refused[:5])} is not one "
                           f"of {', '.join(self.allow_headers)}")  # fmt: skip
        if "access-control-request-private-network" in asked:
            reasons.append("private network access is not allowed")
        return reasons or ["the request is not one this API allows"]


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 100 else text[:100] + "...")


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
