"""Every HTTP request's outer layer: counted and timed, given its request id, its body size
limited, its request line logged.

One plain ASGI layer, not ``BaseHTTPMiddleware`` (a task and a body copy per call), and not
three: the metrics, the request context and the size limit were each a layer with its own
frame, closure and ``send`` wrapper around every request, and around both messages of
every answer. Here they are one call and one ``send`` (``_Answer``), in the same order as
before: the metrics outermost, so they count every answer (CORS preflights and 404s
included); then, when ``CORS_ORIGINS`` is set, CORS (``server/cors.py``), which answers a
preflight before anything else runs; then the request context and the limit.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emailq.logs import bind, log_line, unbind
from server.metrics import INTERNAL_ERROR, ApiMetrics
from server.requeststate import new_request_id

log = logging.getLogger("emailq.access")

# A client may choose its request id, but it is echoed in headers and logs: keep it short
# and free of anything that could split a header or a log line.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_STAMPED = (b"x-request-id", b"x-process-time")  # what every answer is given, lower case


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
        log_line(log, level, "request", {
            "request_id": request_id, "http_method": scope["method"],
            "path": scope["path"][:200], "http_status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        })  # fmt: skip


def _read_headers(scope: Scope) -> tuple[str | None, int | None]:
    """The request id the client chose (its first ``X-Request-ID``), if it is a safe one,
    and the first ``Content-Length`` that is a number, in one pass over the headers."""
    request_id: str | None = None
    declared: int | None = None
    seen_id = False
    for name, value in scope["headers"]:
        if name == b"x-request-id" and not seen_id:
            seen_id = True
            text = value.decode("latin-1")
            request_id = text if _SAFE_REQUEST_ID.match(text) else None
        elif name == b"content-length" and declared is None and value.isdigit():
            declared = int(value)
    return request_id, declared


class _Answer:
    """A request's ``send``: notes the status for the metrics and the request line and,
    once the request has an id, stamps ``X-Request-ID`` and ``X-Process-Time`` on it."""

    __slots__ = ("request_id", "send", "started", "status")

    def __init__(self, send: Send, started: float) -> None:
        self.send = send
        self.started = started
        self.status = 0
        self.request_id: str | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.request_id is not None:
                self._stamp(message)
        await self.send(message)

    def _stamp(self, message: Message) -> None:
        stamps = (self.request_id or "", f"{time.perf_counter() - self.started:.6f}")
        headers = list(message.get("headers", ()))
        if any(name.lower() in _STAMPED for name, _ in headers):
            replaced = MutableHeaders(raw=headers)  # as a header view sets one: in place
            replaced["X-Request-ID"], replaced["X-Process-Time"] = stamps
            headers = replaced.raw
        else:
            headers += [(b"x-request-id", stamps[0].encode()),
                        (b"x-process-time", stamps[1].encode())]  # fmt: skip
        message["headers"] = headers


class RequestLayer:
    """Counts and times every request into ``metrics``; gives it a request id (bound for
    its log lines, echoed as ``X-Request-ID`` with ``X-Process-Time``); caps its body at
    ``max_request_bytes``, or at its exact path's entry in ``path_limits`` (the batch).
    ``cors``, if given, wraps what follows the metrics (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ApiMetrics,
        max_request_bytes: int,
        path_limits: Mapping[str, int] | None = None,
        cors: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.path_limits = dict(path_limits or {})
        self.cors = None if cors is None else cors(self._context)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = _Answer(send, time.perf_counter())
        try:
            if self.cors is None:
                await self._serve(scope, receive, answer)
            else:
                await self.cors(scope, receive, answer)
        except Exception:
            # Escaped the app's handlers: Starlette's outermost layer answers it 500
            # internal_error, unless an answer had started (the client saw that status).
            if answer.status == 0:
                self.metrics.rejected(INTERNAL_ERROR)
            self.metrics.answered(scope, answer.status or 500, time.perf_counter() - answer.started)
            raise
        self.metrics.answered(scope, answer.status, time.perf_counter() - answer.started)

    async def _context(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request context alone, inside CORS: its own ``send`` stamps the answer."""
        await self._serve(scope, receive, _Answer(send, time.perf_counter()))

    async def _serve(self, scope: Scope, receive: Receive, answer: _Answer) -> None:
        chosen, declared = _read_headers(scope)
        request_id = answer.request_id = chosen or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        # Every line logged while this request is served carries its id.
        token = bind(request_id=request_id)
        try:
            await self.app(scope, self._limited(scope, receive, declared), answer)
        finally:
            unbind(token)
        _request_line(scope, request_id, answer.status, answer.started)

    def _limited(self, scope: Scope, receive: Receive, declared: int | None) -> Receive:
        limit = self.path_limits.get(scope["path"], self.max_request_bytes)
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
