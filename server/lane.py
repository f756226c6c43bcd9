"""The direct lane: an ordinary send or batch answered before FastAPI's routing.

A ``DirectRoute`` (server/direct.py) already skips FastAPI's dependency resolution, but a
request still reached it through FastAPI's inner layers (its exception middleware and exit
stacks, the router's walk through every route of every included router, the route's own
request/response wrapper): about a sixth of the API's time under load. ``DirectLane`` is
plain ASGI, the innermost of our middleware, so the request context, the metrics and the
body-size limit wrap it as they wrap the app. For a POST to the exact path of a route that
``serves_directly`` it calls that route's ``direct`` (the same function its handler calls);
everything else, and every request ``direct`` declines, goes to the app untouched (a
declined request's body, if read, is handed on as it was read).

What the router would have noted on the scope (``route``, ``endpoint``, ``path_params``:
the metrics name a request by its route) is set the same way, and an exception raised on
the lane is answered by the app's own exception handlers, through Starlette's
``ExceptionMiddleware`` exactly as the app builds it (made only once there is one to
answer: an ordinary request, answered, pays for no guard it does not use). So a refusal
after a side effect (503, 507, 409, 429 ...) answers exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.direct import DECLINED, DirectRoute

# What ``FastAPI.build_middleware_stack`` leaves to ServerErrorMiddleware, not to
# ExceptionMiddleware: an unhandled error escapes the lane as it escapes the app.
_SERVER_ERROR_KEYS: tuple[Any, ...] = (500, Exception)


class _Recorded:
    """A ``receive`` that keeps the body it passed on, to hand a declined request on."""

    __slots__ = ("body", "read", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.body: list[bytes] = []
        self.read = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.read = True
            self.body.append(message.get("body", b""))
        return message

    def replay(self) -> Receive:
        """What the app reads instead: the body already read, in one message, then the
        client's own stream (a disconnect)."""
        if not self.read:
            return self.receive
        pending: list[Message] = [
            {"type": "http.request", "body": b"".join(self.body), "more_body": False}
        ]
        receive = self.receive

        async def replayed() -> Message:
            return pending.pop() if pending else await receive()

        return replayed


class DirectLane:
    """Serves ordinary POSTs to ``routes`` (full path -> route) directly (module doc)."""

    def __init__(self, app: ASGIApp, *, routes: Mapping[str, DirectRoute]) -> None:
        self.app = app
        self.routes = {path: route for path, route in routes.items() if route.serves_directly}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A root_path would change which path the router matches: leave that to it.
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        # As Starlette's router and FastAPI's route.matches note them for a match.
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        recorded = _Recorded(receive)
        try:
            answer = await route.direct(Request(scope, recorded, send))
        except Exception as exc:
            await self._answer_error(exc, scope, receive, send)
            return
        if answer is None:
            # The app answers it as it would have: its own exception middleware included.
            scope[DECLINED] = True
            await self.app(scope, recorded.replay(), send)
            return
        await answer(scope, receive, send)

    async def _answer_error(
        self, exc: Exception, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer ``exc`` as the app would: through Starlette's ``ExceptionMiddleware`` with
        the app's handlers (one that has none escapes it, as it escapes the app). Made
        only for a refusal: an answer sent needs no guard (nothing is raised after it)."""

        async def reraise(scope: Scope, receive: Receive, send: Send) -> None:
            raise exc

        app: FastAPI = scope["app"]
        # The same split as FastAPI.build_middleware_stack makes.
        handlers = {key: handler for key, handler in app.exception_handlers.items()
                    if key not in _SERVER_ERROR_KEYS}  # fmt: skip
        await ExceptionMiddleware(reraise, handlers=handlers, debug=app.debug)(scope, receive, send)


def direct_routes(prefix: str, *routers: APIRouter) -> dict[str, DirectRoute]:
    """The ``DirectRoute``s of ``routers``, by the full path they answer once the routers
    are included under ``prefix``."""
    return {prefix + route.path: route for router in routers for route in router.routes
            if isinstance(route, DirectRoute)}  # fmt: skip
