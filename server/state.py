"""The application's state, typed: one object per app, reached through ``server/deps.py``.

``create_app`` builds it with what is known at once (settings, contact forms); the lifespan
opens the rest. Before the lifespan runs (a ``TestClient`` not used as a context manager)
those attributes are absent and reading one raises ``AttributeError``, as Starlette's
untyped ``app.state`` did: no route reaches them without a running app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: server.ratelimit itself reads the state via deps
    import httpx

    from emailq.coalesce import EnqueueCoalescer
    from emailq.forms import Form
    from emailq.queue import Queue
    from emailq.settings import Settings
    from emailq.waiting import ResultWaiter
    from emailq.webhooks.store import WebhookStore
    from server.ratelimit import RateLimits


@dataclass(eq=False, repr=False)
class AppState:
    """What the app holds: settings and forms from ``create_app``, clients from the lifespan."""

    settings: Settings
    forms: dict[str, Form] = field(default_factory=dict)  # contact forms by id (FORMS_FILE)
    # Opened by the lifespan, closed when it ends.
    queue: Queue = field(init=False)
    enqueuer: EnqueueCoalescer = field(init=False)  # groups concurrent sends (coalesce.py)
    waiter: ResultWaiter = field(init=False)  # one subscription for every `wait=` client
    rate_limits: RateLimits = field(init=False)
    http: httpx.AsyncClient = field(init=False)  # pooled, for CAPTCHA verification
    webhooks: WebhookStore = field(init=False)  # webhook endpoints and deliveries
