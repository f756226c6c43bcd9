"""``/dashboard``: the operators' page, static files from ``server/static/dashboard``.

The page holds no data: it asks for an admin key, keeps it in ``sessionStorage`` and calls
the admin API with it (``Authorization: Bearer``), so the files themselves need no key.
While ``API_KEYS`` is unset they are served to local requests only, as the admin API is.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from server.auth import local_refusal
from server.deps import settings_of
from server.pages import StaticPages

router = APIRouter(include_in_schema=False)


@functools.cache
def _pages() -> StaticPages:
    return StaticPages("dashboard")


def _local_unless_keyed(request: Request) -> None:
    settings = settings_of(request)
    if not settings.api_keys:
        refusal = local_refusal(request, settings)
        if refusal is not None:
            raise HTTPException(403, f"{refusal}; configure API_KEYS to open the dashboard "
                                     "from elsewhere")  # fmt: skip


@router.get("/dashboard")
async def dashboard(request: Request) -> Response:
    """The dashboard page."""
    _local_unless_keyed(request)
    return _pages().response("index.html")


@router.get("/dashboard/{name}")
async def dashboard_file(name: str, request: Request) -> Response:
    """The page's script and style sheet."""
    _local_unless_keyed(request)
    return _pages().response(name)
