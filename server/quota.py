"""Whose share of stored bytes a send draws on (``MAX_STORED_BYTES_PER_KEY``).

The same identity ``RATE_LIMIT_PER_KEY`` counts messages for: the API key, or the client
address while ``API_KEYS`` is unset (one budget shared by every anonymous caller would let
one of them lock out the rest). Contact forms draw on one budget per form. enqueue.lua
checks and charges it in the step that stores (see ``emailq.queue.StoreLimits``).
"""

from __future__ import annotations

from fastapi import Request

from server.auth import Principal
from server.clientaddr import client_address


def quota_owner(request: Request, principal: Principal) -> str:
    """The quota owner of a send by ``principal``: ``key:<id>`` or ``address:<client>``."""
    if principal.anonymous:
        return "address:" + client_address(request)
    return "key:" + principal.key_id
