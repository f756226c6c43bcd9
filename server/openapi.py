"""What ``/openapi.json`` says beyond what FastAPI infers from the routes.

FastAPI documents a route's success answer and a 422 in *its* error shape. This module makes
the schema tell the truth about the rest, in one place:

* the one error shape (``ErrorBody``, server/errors.py) on every error status;
* the statuses that follow from what a route depends on, added to every such route:
  ``authenticate`` (401, 403, 429, 503, and the ``bearerAuth`` security requirement),
  the queue (503), parameters or a body (422; a body also 413 and 415);
* ``X-Request-ID`` on every answer, ``Retry-After`` on 429 and 503.

A route declares only what it raises itself, with ``errors()``:
``responses=errors(404, 409, why={404: "no such task"})``. A new route or field follows the
pattern in the README's "The OpenAPI schema" section; ``tests/server/test_openapi.py``
fails when a property has no description, a route no example or an error status another
shape, and ``tests/server/test_openapi_fuzz.py`` (schemathesis) when the API answers a
status or body its schema does not document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel

from emailq.settings import Settings
from server.auth import authenticate
from server.deps import get_queue
from server.errors import ErrorBody

BEARER = "bearerAuth"  # the security scheme's name in components.securitySchemes
REF = "#/components/schemas/"

# What each error status means on this API; a route may say more with ``errors(why=...)``.
WHY: dict[int, str] = {
    400: "the request was understood but refused (a contact form's CAPTCHA failed)",
    401: "API_KEYS is set and no valid `Authorization: Bearer <key>` was given",
    403: "the key may not do this (recipients outside its domains, not an admin key); or, "
         "while API_KEYS is unset, the request is not a local one",
    404: "no such resource",
    409: "the resource's state forbids the request",
    413: "the request body, or the mail it makes, is over its size limit (MAX_BODY_BYTES), "
         "or larger than MAX_STORED_BYTES_PER_KEY could ever hold",
    415: "the body's Content-Type is not one this endpoint reads (JSON: application/json)",
    422: "the request is invalid: `detail` names the first problem, `fields` each one",
    429: "over a rate limit (`detail` names the setting and window), too many failed "
         "authentications from this address, or over MAX_STORED_BYTES_PER_KEY; "
         "Retry-After says when to try again where waiting helps",
    503: "Redis is unavailable (nothing was stored), or did not answer after a write was "
         "sent to it (`store_outcome_unknown`: retry with the same Idempotency-Key)",
    507: "the store is full (MAX_STORED_BYTES, or Redis near its maxmemory): no new mail is "
         "taken until mail is sent; everything else still works",
}  # fmt: skip

# Response headers, in components.headers; every answer carries X-Request-ID.
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "this request's id, as in the logs and an error's `request_id` (a "
                       "client's own X-Request-ID is kept when it is 1-128 safe characters)",
        "required": True, "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "string", "examples": ["12"]},
    },
}  # fmt: skip


def errors(
    *statuses: int, why: Mapping[int, str] | None = None, model: type[BaseModel] = ErrorBody
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the error statuses a route raises itself, in the one error shape.

    ``statuses`` are described as ``WHY`` says; ``why`` adds statuses, or says more about
    one, for this route. ``model`` is a subclass of ``ErrorBody`` where an error carries more.
    """
    described = {status: WHY[status] for status in statuses} | dict(why or {})
    return {status: {"model": model, "description": text} for status, text in described.items()}


def _tree(dependant: Dependant) -> Iterator[Dependant]:
    """``dependant`` and every dependency below it."""
    yield dependant
    for sub in dependant.dependencies:
        yield from _tree(sub)


def _implied(route: RouteContext) -> tuple[set[int], bool]:
    """The error statuses a route answers because of what it depends on, and whether it
    authenticates its caller."""
    tree = list(_tree(route.dependant))
    calls: set[Callable[..., Any]] = {d.call for d in tree if d.call is not None}
    statuses: set[int] = set()
    authenticated = authenticate in calls
    if authenticated:
        # 429: failed authentications; 503: counting them needs Redis.
        statuses |= {401, 403, 429, 503}
    if get_queue in calls:
        statuses.add(503)
    has_body = route.body_field is not None or "requestBody" in (route.openapi_extra or {})
    if has_body:
        statuses |= {413, 415, 422}
    if any(d.path_params or d.query_params or d.header_params for d in tree):
        statuses.add(422)
    return statuses, authenticated


def _without_null(parameter: dict[str, Any]) -> None:
    """An optional parameter (``str | None = None``) as what the wire can carry: a header
    or query value is a string or absent (``required: false``), never JSON null, which a
    client (and schemathesis) would otherwise send as the text "null"."""
    schema = parameter.get("schema", {})
    kept = [alt for alt in schema.get("anyOf", []) if alt != {"type": "null"}]
    if len(kept) == 1 and len(kept) < len(schema["anyOf"]):
        del schema["anyOf"]
        schema.update(kept[0])


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF + "ErrorBody"}}}}  # fmt: skip


def _document_operation(
    operation: dict[str, Any], route: RouteContext, security: list[dict[str, list[str]]]
) -> None:
    statuses, authenticated = _implied(route)
    for parameter in operation.get("parameters", []):
        _without_null(parameter)
    responses: dict[str, Any] = operation["responses"]
    for status in sorted(statuses):
        responses.setdefault(str(status), _error_response(WHY[status]))
    invalid = responses.get("422", {})
    if invalid.get("description") == "Validation Error":  # FastAPI's own, in its own shape
        responses["422"] = _error_response(WHY[422])
    if authenticated:
        operation["security"] = security
    for code, response in responses.items():
        if code.startswith(("4", "5")) and "content" not in response:  # a bare description
            response["content"] = _error_response("")["content"]
        headers = response.setdefault("headers", {})
        names = ["X-Request-ID", "Retry-After"] if code in ("429", "503") else ["X-Request-ID"]
        for name in names:
            headers.setdefault(name, {"$ref": "#/components/headers/" + name})


def _error_components(schema: dict[str, Any]) -> None:
    """``ErrorBody`` in the components (routes with only implied errors name it by $ref);
    FastAPI's own error models out, as no answer has their shape."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    generated = ErrorBody.model_json_schema(mode="serialization", ref_template=REF + "{model}")
    for name, definition in generated.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault("ErrorBody", generated)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _security(settings: Settings) -> list[dict[str, list[str]]]:
    # Without API_KEYS a key is neither needed nor read: say so, so that Swagger's "Try it
    # out" works without one (the empty requirement is OpenAPI's "none needed").
    return [{BEARER: []}] if settings.api_keys else [{}]


def build_schema(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's schema of ``app``, completed as the module doc says."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)  # fmt: skip
    schema.setdefault("components", {})["headers"] = HEADERS
    schema["components"]["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key from API_KEYS (create one with `emailq keygen`); "
            "needed only when API_KEYS is set, and then on every /api/v1 endpoint "
            "but the contact forms",
        }
    }
    security = _security(settings)
    # Routes of included routers are reached through their contexts, as FastAPI's own
    # schema does: the context holds the router's prefix and dependencies.
    for route in iter_route_contexts(app.routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        path = schema["paths"].get(route.path_format, {})
        for method in route.methods or ():
            if method.lower() in path:
                _document_operation(path[method.lower()], route, security)
    _error_components(schema)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve ``build_schema``'s schema, built once on first request, as ``app.openapi()``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
