"""Request context: request id, process time, the request line, and the request-size limit.

Written as plain ASGI rather than ``BaseHTTPMiddleware``: it wraps every request, so it
should not add a task and a body copy per call.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Mapping

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emailq.logs import bind, unbind

log = logging.getLogger("emailq.access")

# A client may choose its request id, but it is echoed in headers and logs: keep it short
# and free of anything that could split a header or a log line.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SAFE_REQUEST_ID.match(text) else None
    return None


def _new_request_id() -> str:
    # 32 hex digits, as uuid4().hex was, without its os.urandom call: a request id names a
    # request in logs and answers and is no secret (a client may even choose its own).
    return f"{random.getrandbits(128):032x}"


def _too_large(limit: int) -> HTTPException:
    # An HTTPException, not MessageTooLarge: FastAPI re-raises only HTTPException from a
    # body read and answers anything else with a 400 "error parsing the body".
    return HTTPException(413, f"request body is over the limit of {limit} bytes")


def _request_line(scope: Scope, request_id: str, status: int, started: float) -> None:
    # A success is DEBUG: a /health probe or a /result poll is no news, and an accepted
    # mail has its own "accepted" line. An error is INFO, so a client's 4xx can be found
    # by its request id. (5xx are logged with their traceback where they are raised.)
    level = logging.DEBUG if status < 400 else logging.INFO
    if log.isEnabledFor(level):
        log.log(level, "request", extra={
            "request_id": request_id, "http_method": scope["method"],
            "path": scope["path"][:200], "http_status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        })  # fmt: skip


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class RequestContextMiddleware:
    """Sets ``X-Request-ID`` and ``X-Process-Time`` on every response; caps body size.

    ``path_limits`` gives exact paths (the batch endpoint) their own cap instead of
    ``max_request_bytes``.
    """

    def __init__(
        self, app: ASGIApp, *, max_request_bytes: int, path_limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _client_request_id(scope) or _new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers["X-Process-Time"] = f"{time.perf_counter() - started:.6f}"
            await send(message)

        # Every line logged while this request is served carries its id.
        token = bind(request_id=request_id)
        try:
            await self.app(scope, self._limited(scope, receive), send_with_headers)
        finally:
            unbind(token)
        _request_line(scope, request_id, status, started)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        limit = self.path_limits.get(scope["path"], self.max_request_bytes)
        declared = _declared_length(scope)
        seen = 0

        async def receive_limited() -> Message:
            # Checked when the route reads the body, so the error reaches the app's
            # exception handlers and gets the usual JSON shape and headers.
            nonlocal seen
            if declared is not None and declared > limit:
                raise _too_large(limit)
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # chunked bodies declare no length
                raise _too_large(limit)
            return message

        return receive_limited
