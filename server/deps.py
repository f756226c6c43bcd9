"""Dependencies shared by routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from emailq.queue import Queue
from emailq.settings import Settings
from emailq.waiting import ResultWaiter


def get_queue(request: Request) -> Queue:
    """The queue opened by the lifespan."""
    queue: Queue = request.app.state.queue
    return queue


def get_waiter(request: Request) -> ResultWaiter:
    """The result waiter started by the lifespan: one subscription for every waiting client."""
    waiter: ResultWaiter = request.app.state.waiter
    return waiter


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


def get_request_id(request: Request) -> str:
    """The id the request-context middleware assigned to this request."""
    request_id: str = request.state.request_id
    return request_id


QueueDep = Annotated[Queue, Depends(get_queue)]
WaiterDep = Annotated[ResultWaiter, Depends(get_waiter)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
