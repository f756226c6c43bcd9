"""The app's state (``server.state.AppState``) for routes and middleware: the only module
that reads it off the app. Plain accessors, and ``Annotated`` dependencies.

The dependencies are ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool (three thread hand-offs per send, before this was changed).
``authenticate`` and the send route call the accessors directly instead of declaring
dependencies: FastAPI spends about 10 us resolving each one, per request; dropping five
from the send path took it from 404 to 357 us per request (in-process, store stubbed; see
bench/api_cost.py and the README).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import Depends, FastAPI, Request

from emailq.coalesce import EnqueueCoalescer
from emailq.forms import Form
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.templates import Templates
from emailq.waiting import ResultWaiter
from emailq.webhooks.store import WebhookStore
from server.state import AppState

if TYPE_CHECKING:  # server.ratelimit and server.metrics read their parts through here
    from server.metrics import ApiMetrics
    from server.ratelimit import RateLimits


# Each app's state, by the app: read up to seven times a send, and Starlette's ``app.state``
# answers an attribute through ``__getattr__``, after a failed lookup (about 0.6 us each).
_STATES: weakref.WeakKeyDictionary[FastAPI, AppState] = weakref.WeakKeyDictionary()


def attach_state(app: FastAPI, state: AppState) -> None:
    """Give ``app`` its state (``create_app`` does; so may a test's bare app)."""
    _STATES[app] = state


def state_of(app: FastAPI) -> AppState:
    """The state ``attach_state`` gave ``app``."""
    return _STATES[app]


def _state(request: Request) -> AppState:
    return _STATES[request.scope["app"]]


def queue_of(request: Request) -> Queue:
    """The queue opened by the lifespan."""
    return _state(request).queue


def enqueuer_of(request: Request) -> EnqueueCoalescer:
    """Stores single sends, grouping concurrent ones into one Redis call."""
    return _state(request).enqueuer


def settings_of(request: Request) -> Settings:
    """The settings the app was built with."""
    return _state(request).settings


def peer_is_socket(request: Request) -> bool:
    """Whether the server hands the app the socket's peer, never one from a header."""
    return _state(request).peer_is_socket


def rate_limits_of(request: Request) -> RateLimits:
    """The rate limiter opened by the lifespan."""
    return _state(request).rate_limits


def metrics_of(request: Request) -> ApiMetrics:
    """This process's Prometheus series (server.metrics)."""
    return _state(request).metrics


def forms_of(request: Request) -> dict[str, Form]:
    """The contact forms (FORMS_FILE) by id."""
    return _state(request).forms


def http_of(request: Request) -> httpx.AsyncClient:
    """The pooled HTTP client for CAPTCHA verification."""
    return _state(request).http


def templates_of(request: Request) -> Templates:
    """The stored templates, loaded and checked when the app was built (TEMPLATES_DIR)."""
    templates = _state(request).templates
    assert templates is not None  # create_app always loads them (an empty set without a dir)
    return templates


def header(request: Request, name: bytes) -> str | None:
    """The first value of the header ``name`` (lower case), as ``request.headers.get`` reads
    it, without building a header view and raising KeyError for a header that is absent:
    the send path asks for three that an ordinary request does not send."""
    key: bytes
    value: bytes
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def request_id_of(request: Request) -> str:
    """The id the request-context middleware assigned to this request."""
    request_id: str = request.state.request_id
    return request_id


async def get_queue(request: Request) -> Queue:
    """Dependency form of ``queue_of``."""
    return queue_of(request)


async def get_waiter(request: Request) -> ResultWaiter:
    """The result waiter started by the lifespan: one subscription for every waiting client."""
    return _state(request).waiter


async def get_webhooks(request: Request) -> WebhookStore:
    """The webhook store opened by the lifespan (on the queue's client)."""
    return _state(request).webhooks


async def get_settings(request: Request) -> Settings:
    """Dependency form of ``settings_of``."""
    return settings_of(request)


async def get_templates(request: Request) -> Templates:
    """Dependency form of ``templates_of``."""
    return templates_of(request)


async def get_request_id(request: Request) -> str:
    """Dependency form of ``request_id_of``."""
    return request_id_of(request)


QueueDep = Annotated[Queue, Depends(get_queue)]
WaiterDep = Annotated[ResultWaiter, Depends(get_waiter)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
WebhooksDep = Annotated[WebhookStore, Depends(get_webhooks)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
TemplatesDep = Annotated[Templates, Depends(get_templates)]
