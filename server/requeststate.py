"""What the layers of one request note for each other: its id, and the error code of its
answer. The request layer (server/middleware.py) makes the id of every request it serves;
CORS (server/cors.py) makes one for a preflight it refuses before that layer runs. The
error handlers (server/errors.py), and CORS for that preflight, note the code on the
scope's state, where the metrics (server/metrics.py) count it."""

from __future__ import annotations

import random

# Where an error answer notes its `error` code on the request's state.
ERROR_CODE_STATE = "error_code"


def new_request_id() -> str:
    """32 hex digits, as uuid4().hex was, without its os.urandom call: a request id names a
    request in logs and answers and is no secret (a client may even choose its own)."""
    return f"{random.getrandbits(128):032x}"
