"""The application's state, typed: one object per app, reached through ``server/deps.py``.

``create_app`` builds it with what is known at once (settings, contact forms, metrics); the
lifespan opens the rest. Before the lifespan runs (a ``TestClient`` not used as a context manager)
those attributes are absent and reading one raises ``AttributeError``, as Starlette's
untyped ``app.state`` did: no route reaches them without a running app.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.metrics import ApiMetrics

if TYPE_CHECKING:  # annotations only: server.ratelimit itself reads the state via deps
    import httpx

    from emailq.coalesce import EnqueueCoalescer
    from emailq.forms import Form
    from emailq.queue import Queue
    from emailq.settings import Settings
    from emailq.templates import Templates
    from emailq.waiting import ResultWaiter
    from emailq.webhooks.store import WebhookStore
    from server.ratelimit import RateLimits


@dataclass(eq=False, repr=False)
class AppState:
    """What the app holds: settings, forms and templates from ``create_app``, clients from
    the lifespan."""

    settings: Settings
    forms: dict[str, Form] = field(default_factory=dict)  # contact forms by id (FORMS_FILE)
    templates: Templates | None = None  # stored templates (TEMPLATES_DIR), checked at start
    # This process's Prometheus series; made with the app, as its middleware needs them.
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    # Opened by the lifespan, closed when it ends.
    queue: Queue = field(init=False)
    enqueuer: EnqueueCoalescer = field(init=False)  # groups concurrent sends (coalesce.py)
    waiter: ResultWaiter = field(init=False)  # one subscription for every `wait=` client
    rate_limits: RateLimits = field(init=False)
    http: httpx.AsyncClient = field(init=False)  # pooled, for CAPTCHA verification
    # Set when the server begins to stop (``python -m server`` on SIGTERM), before it waits
    # for open requests: endless responses (the admin event stream) end on it.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    webhooks: WebhookStore = field(init=False)  # webhook endpoints and deliveries
    # Set by ``python -m server``, which runs uvicorn with its proxy headers off: the peer
    # is the socket's, so a request that names it in X-Forwarded-For is not a sign that the
    # server rewrote it (server/clientaddr.py). Unknown under any other launcher.
    peer_is_socket: bool = False
