"""Dependencies shared by routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, HTTPException, Request

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


def _is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:  # a name (TestClient's "testclient"), or no peer at all
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def require_admin(request: Request, settings: SettingsDep) -> None:
    """Admin access: the ``ADMIN_TOKEN`` bearer token if one is set, else loopback only."""
    if settings.admin_token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = settings.admin_token.get_secret_value().encode()
        # compare_digest: the time taken does not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <ADMIN_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return
    if not _is_loopback(request.client.host if request.client else None):
        raise HTTPException(403, "admin endpoints answer loopback clients only; set ADMIN_TOKEN "
                                 "to reach them from elsewhere")  # fmt: skip


AdminDep = Depends(require_admin)
