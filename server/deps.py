"""What the lifespan opened, for routes: plain accessors and ``Annotated`` dependencies.

The dependencies are ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool (three thread hand-offs per send, before this was changed).
``authenticate`` and the send route call the accessors directly instead of declaring
dependencies: FastAPI spends about 10 us resolving each one, per request; dropping five
from the send path took it from 404 to 357 us per request (in-process, store stubbed; see
bench/api_cost.py and the README).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from emailq.coalesce import EnqueueCoalescer
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.templates import Templates
from emailq.waiting import ResultWaiter


def queue_of(request: Request) -> Queue:
    """The queue opened by the lifespan."""
    queue: Queue = request.app.state.queue
    return queue


def enqueuer_of(request: Request) -> EnqueueCoalescer:
    """Stores single sends, grouping concurrent ones into one Redis call."""
    enqueuer: EnqueueCoalescer = request.app.state.enqueuer
    return enqueuer


def settings_of(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


def templates_of(request: Request) -> Templates:
    """The stored templates, loaded and checked when the app was built (TEMPLATES_DIR)."""
    templates: Templates = request.app.state.templates
    return templates


def request_id_of(request: Request) -> str:
    """The id the request-context middleware assigned to this request."""
    request_id: str = request.state.request_id
    return request_id


async def get_queue(request: Request) -> Queue:
    """Dependency form of ``queue_of``."""
    return queue_of(request)


async def get_waiter(request: Request) -> ResultWaiter:
    """The result waiter started by the lifespan: one subscription for every waiting client."""
    waiter: ResultWaiter = request.app.state.waiter
    return waiter


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
RequestIdDep = Annotated[str, Depends(get_request_id)]
TemplatesDep = Annotated[Templates, Depends(get_templates)]
