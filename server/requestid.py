"""A new request id: made by the request layer (server/middleware.py) for every request,
and by CORS for a preflight it refuses before that layer runs (server/cors.py)."""

from __future__ import annotations

import random


def new_request_id() -> str:
    """32 hex digits, as uuid4().hex was, without its os.urandom call: a request id names a
    request in logs and answers and is no secret (a client may even choose its own)."""
    return f"{random.getrandbits(128):032x}"
