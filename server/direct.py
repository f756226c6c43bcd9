"""Routes whose ordinary request skips FastAPI's per-request dependency resolution.

FastAPI resolves every parameter of a route anew on each request (dependencies, headers,
the body, each through its own validator), and that machinery cost the send endpoint more
than its own work (README, Performance). A ``DirectRoute`` is an ``APIRoute``, so the
OpenAPI schema is made from the endpoint's signature exactly as before; its handler
(``get_route_handler``, FastAPI's documented hook) first asks the route's resolver for the
endpoint's arguments. A resolver answers only for the ordinary request (a JSON body that
validates, headers as declared) and returns None for anything else *before it has done
anything with a side effect*: FastAPI's own handler then serves that request, so every
refusal (bad JSON, a wrong media type, a missing body, an invalid header, and the order in
which they are checked) answers exactly as it did. The endpoint is the same function on
both paths; so are the dependencies a resolver calls (it calls them as plain functions).

The route's router must be included without ``dependencies=``: the resolver gives the
endpoint's own parameters, not ones added where the router is included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# The endpoint's keyword arguments for an ordinary request, or None: FastAPI resolves them.
Resolver = Callable[[Request, Response], Awaitable["dict[str, Any] | None"]]

# Noted on the scope by the ASGI lane (server/lane.py) for a request ``direct`` declined, so
# the route's handler does not resolve it a second time.
DECLINED = "emailq.direct_declined"

# What FastAPI decodes as JSON; anything rarer is left to it (``fastapi.routing``: the
# ``application/*json`` types, read with ``email.message``'s header parser).
_JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})


def _content_type(request: Request) -> bytes | None:
    name: bytes
    value: bytes
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            return value
    return None


async def json_model(request: Request, model: type[M]) -> M | None:
    """The request's JSON body as ``model``, or None unless it is plainly one.

    Only for a body FastAPI would decode the same way: ``Content-Type: application/json``
    and a body pydantic's own JSON parser reads and validates at once. Its parser is
    stricter than ``json.loads`` (no byte-order mark, no UTF-16, no lone surrogates), so a
    body it refuses may still be one FastAPI accepts: None hands it to FastAPI either way.
    The body read goes through the request-size limit (server/middleware.py) as before.
    """
    media = _content_type(request)
    if media is None or media.lower() not in _JSON_TYPES:
        return None
    body = await request.body()  # cached on the request: FastAPI's handler reuses it
    if not body:
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


def _fresh_response() -> Response:
    """What FastAPI hands an endpoint's ``Response`` parameter (``solve_dependencies``):
    no headers (it deletes the ``content-length: 0`` an empty body is given, the only one
    without a media type; emptying the list skips building a header view to do it), and
    no status."""
    response = Response()
    response.raw_headers.clear()
    response.status_code = None  # type: ignore[assignment]  # FastAPI's marker: not set
    return response


def _plain_model(route: APIRoute) -> type[BaseModel] | None:
    """The route's response model, if FastAPI's validation hands an instance of exactly it
    back unchanged (pydantic's default) and no include/exclude applies: such a result is
    serialized by the model's own serializer, with the route's options, to the same bytes,
    without the validation pass. None otherwise."""
    model = route.response_model
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    if model.model_config.get("revalidate_instances", "never") != "never":
        return None
    if route.response_model_include is not None or route.response_model_exclude is not None:
        return None
    return model


class DirectRoute(APIRoute):
    """An ``APIRoute`` whose ordinary request is resolved by ``resolve`` (module doc)."""

    resolve: ClassVar[Resolver]
    # Set once the handler is built, if ``direct`` can answer for this route (a response
    # model, the default response class): the ASGI lane (server/lane.py) asks this.
    serves_directly = False
    _plain_model: type[BaseModel] | None = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        generic = super().get_route_handler()
        if self.response_field is None or not isinstance(self.response_class, DefaultPlaceholder):
            return generic  # _answer copies FastAPI's answer for a response model only

        self.serves_directly = True
        self._plain_model = _plain_model(self)

        async def handler(request: Request) -> Response:
            if DECLINED in request.scope:  # the lane asked already (server/lane.py)
                return await generic(request)
            answer = await self.direct(request)
            return await generic(request) if answer is None else answer

        return handler

    async def direct(self, request: Request) -> Response | None:
        """The answer to an ordinary request, or None, before any side effect, for one
        FastAPI's own handler must serve. Only for a route that ``serves_directly``."""
        response = _fresh_response()
        arguments = await type(self).resolve(request, response)
        if arguments is None:
            return None
        return await self._answer(await self.endpoint(**arguments), response)

    async def _answer(self, result: Any, response: Response) -> Response:
        """The endpoint's ``result`` as FastAPI's handler answers it: validated against the
        response model, serialized, with the status and headers the endpoint set."""
        if isinstance(result, Response):
            return result
        if self._plain_model is not None and type(result) is self._plain_model:
            content = result.__pydantic_serializer__.to_json(
                result, by_alias=self.response_model_by_alias,
                exclude_unset=self.response_model_exclude_unset,
                exclude_defaults=self.response_model_exclude_defaults,
                exclude_none=self.response_model_exclude_none,
            )  # fmt: skip
        else:
            content = await serialize_response(
                field=self.response_field,
                response_content=result,
                include=self.response_model_include,
                exclude=self.response_model_exclude,
                by_alias=self.response_model_by_alias,
                exclude_unset=self.response_model_exclude_unset,
                exclude_defaults=self.response_model_exclude_defaults,
                exclude_none=self.response_model_exclude_none,
                dump_json=True,
            )
        answer = Response(content, status_code=response.status_code or self.status_code or 200,
                          media_type="application/json")  # fmt: skip
        if not is_body_allowed_for_status_code(answer.status_code):
            answer.body = b""
        answer.headers.raw.extend(response.headers.raw)
        return answer


def direct_route(resolve: Resolver) -> type[APIRoute]:
    """A ``DirectRoute`` class for the endpoint whose ordinary arguments ``resolve`` gives
    (``router.add_api_route(..., route_class_override=direct_route(resolve))``)."""
    return type("DirectRoute", (DirectRoute,), {"resolve": staticmethod(resolve)})
