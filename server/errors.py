"""Every error leaves the API in one JSON shape::

    {"error": "<code>", "detail": "<what went wrong>", "request_id": "<id>", "fields": [...]}

``fields`` appears on validation errors only, ``task_status`` on conflicts (409); a batch
with no valid message adds its per-message ``results``. Nothing else (no stack trace, no
input echo) reaches the client; unexpected errors are logged with the request id and
answered 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from emailq.errors import (
    Forbidden,
    InvalidMessage,
    MessageTooLarge,
    QuotaExceeded,
    StoreFull,
    StoreOutcomeUnknown,
    StoreUnavailable,
    validation_message,
)
from server.cors import allow_origin
from server.requeststate import ERROR_CODE_STATE

log = logging.getLogger("emailq.api")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          415: "unsupported_media_type", 429: "too_many_requests"}  # fmt: skip


class FieldError(BaseModel):
    """One problem of an invalid request."""

    loc: list[str | int] = Field(
        description='where: "body", "query", "path" or "header", then the field\'s path'
    )
    msg: str = Field(description="what is wrong with it")
    type: str | None = Field(default=None, description="pydantic's error type, when it gave one")


class ErrorBody(BaseModel):
    """Every error answer of the API (this module's doc)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "error": "validation_error", "detail": "to: value is not a valid email address",
        "request_id": "5f0c6a1e9b8d4c2fa7e3d1b0c9a8e7f6",
        "fields": [{"loc": ["body", "to"], "msg": "value is not a valid email address",
                    "type": "value_error"}],
    }]})  # fmt: skip

    error: str = Field(
        description="a stable code: validation_error, invalid_message, unauthorized, forbidden, "
        "not_found, conflict, idempotency_conflict, payload_too_large, unsupported_media_type, "
        "too_many_requests, quota_exceeded, bad_request, service_unavailable, "
        "store_outcome_unknown, storage_full, method_not_allowed or internal_error"
    )
    detail: str = Field(description="what went wrong, for a person")
    request_id: str = Field(description="this request's id, as in X-Request-ID and the logs")
    fields: list[FieldError] | None = Field(
        default=None, description="each problem of an invalid request (422 only)"
    )
    task_status: str | None = Field(
        default=None, description="the state of the task that forbade the request (409 only)"
    )


class Conflict(Exception):
    """The task's state forbids the request (409); the answer names that state."""

    def __init__(self, detail: str, *, task_status: str) -> None:
        super().__init__(detail)
        self.task_status = task_status


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused with a different request body (409)."""


class BodyTooDeep(Exception):
    """A JSON body nested deeper than the decoder can follow (422, like any bad JSON)."""


def error_response(
    request: Request, status: int, code: str, detail: str, **extra: Any
) -> JSONResponse:
    """The one error shape, with the request id of ``request``.

    A contact form that allowed the request's origin (``request.state.cors_origin``) gets
    the CORS header on its errors as well, or the page's script could not read them."""
    body = {"error": code, "detail": detail, "request_id": request.state.request_id, **extra}
    setattr(request.state, ERROR_CODE_STATE, code)
    response = JSONResponse(body, status_code=status)
    origin = getattr(request.state, "cors_origin", None)
    if origin is not None:
        allow_origin(response.headers, origin)
    return response


def validation_fields(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's error list, keeping location, message and type only."""
    # Drop "input" and "ctx", which echo user data.
    return [
        {"loc": list(e.get("loc", ())), "msg": validation_message(e), "type": e.get("type", "")}
        for e in errors
    ]


def validation_detail(fields: list[dict[str, Any]]) -> str:
    """One line naming the first invalid field."""
    first = fields[0] if fields else {"loc": [], "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        # pydantic puts the character's position where a field's name would be: "35: JSON
        # decode error" read as if field 35 were wrong.
        where = first["loc"][-1] if first["loc"] else "?"
        return f"the body is not valid JSON (at character {where})"
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def _json_media(request: Request) -> bool:
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


# What pydantic says of a body FastAPI did not decode as JSON (it was given the raw text).
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type"}


def _undecoded_body(request: Request, errors: Sequence[Any]) -> bool:
    """Is this a JSON endpoint's body sent as another media type (curl's -d without -H)?"""
    return not _json_media(request) and any(
        tuple(e.get("loc", ())) == ("body",) and e.get("type") in _NOT_AN_OBJECT for e in errors
    )


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if _undecoded_body(request, exc.errors()):
        # 415 naming the fix, rather than pydantic's "a valid dictionary" about a body that
        # may be perfectly good JSON.
        detail = "send the body as JSON, with 'Content-Type: application/json'"
        return error_response(request, 415, "unsupported_media_type", detail)
    fields = validation_fields(exc.errors())
    return error_response(
        request, 422, "validation_error", validation_detail(fields), fields=fields
    )


async def _invalid_message(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidMessage)
    fields = [{"loc": ["body", exc.field], "msg": str(exc)}] if exc.field else []
    return error_response(request, 422, "invalid_message", str(exc), fields=fields)


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 413, "payload_too_large", str(exc))


async def _forbidden(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 403, "forbidden", str(exc))


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("store unavailable: %s", exc, extra={"request_id": request.state.request_id})
    response = error_response(
        request, 503, "service_unavailable",
        "the queue store is unavailable; nothing was stored; retry shortly",
    )  # fmt: skip
    response.headers["Retry-After"] = "1"
    return response


async def _store_outcome_unknown(request: Request, exc: Exception) -> JSONResponse:
    # Not "nothing was stored": the write reached Redis and its answer did not come back.
    log.warning("store outcome unknown: %s", exc, extra={"request_id": request.state.request_id})
    response = error_response(
        request, 503, "store_outcome_unknown",
        "the queue store did not answer after the request was sent to it: it may have been "
        "stored and sent. Retry with the same Idempotency-Key to be sure of one mail",
    )  # fmt: skip
    response.headers["Retry-After"] = "1"
    return response


async def _store_full(request: Request, exc: Exception) -> JSONResponse:
    # 507, not 503: Redis answers, and everything but new mail still works (results, admin
    # calls, the workers); the detail names the limit that refused it.
    log.warning("store full: %s", exc, extra={"request_id": request.state.request_id})
    return error_response(request, 507, "storage_full", str(exc))


async def _quota_exceeded(request: Request, exc: Exception) -> JSONResponse:
    # The detail names MAX_STORED_BYTES_PER_KEY and the bytes held, needed and allowed.
    assert isinstance(exc, QuotaExceeded)
    if exc.never_fits:  # waiting will not help: say so with the status a client reads first
        return error_response(request, 413, "payload_too_large", str(exc))
    return error_response(request, 429, "quota_exceeded", str(exc))


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Conflict)
    return error_response(request, 409, "conflict", str(exc), task_status=exc.task_status)


async def _idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 409, "idempotency_conflict", str(exc))


# FastAPI's 400 when its JSON decoder raises anything but JSONDecodeError, raised from it.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _undecodable(request: Request, detail: str, kind: str) -> JSONResponse:
    fields = [{"loc": ["body"], "msg": detail, "type": kind}]
    return error_response(request, 422, "validation_error", detail, fields=fields)


def _undecodable_body(exc: StarletteHTTPException) -> tuple[str, str] | None:
    """Why FastAPI could not decode a JSON body (detail, type), if that is what ``exc`` is."""
    if exc.status_code != 400 or exc.detail != _FASTAPI_BODY_ERROR:
        return None
    cause = exc.__cause__
    if isinstance(cause, RecursionError):  # `[[[[...`, 50,000 deep
        return "the JSON body is nested too deeply", "json_too_deep"
    if isinstance(cause, UnicodeDecodeError):
        return "the JSON body is not valid UTF-8", "json_invalid"
    if isinstance(cause, ValueError):  # a number of over 4,300 digits, say
        return "the JSON body could not be decoded", "json_invalid"
    return None


async def _body_too_deep(request: Request, exc: Exception) -> JSONResponse:
    return _undecodable(request, "the JSON body is nested too deeply", "json_too_deep")


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # A JSON body the decoder gave up on is the client's bad JSON like any other: 422, as
    # invalid JSON is answered, not FastAPI's bare 400.
    undecodable = _undecodable_body(exc)
    if undecodable is not None:
        return _undecodable(request, *undecodable)
    code = _CODES.get(exc.status_code, "http_error")
    response = error_response(request, exc.status_code, code, str(exc.detail))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed(request)
    return response


def _allowed(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the first
    route that matched the path, and FastAPI makes one route per method (GET and DELETE on
    one path are two routes), so its Allow header left methods out (RFC 9110 15.5.6)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"request_id": request.state.request_id})
    return error_response(request, 500, "internal_error", "internal error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the shape above."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(InvalidMessage, _invalid_message)
    app.add_exception_handler(MessageTooLarge, _too_large)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(StoreOutcomeUnknown, _store_outcome_unknown)
    app.add_exception_handler(StoreFull, _store_full)
    app.add_exception_handler(QuotaExceeded, _quota_exceeded)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(IdempotencyConflict, _idempotency_conflict)
    app.add_exception_handler(BodyTooDeep, _body_too_deep)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
