"""The API application. Run it with ``python -m server`` (see ``server/__main__.py``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from opentelemetry import _logs, trace
from opentelemetry import metrics as otel_metrics

from emailq import __version__
from emailq.coalesce import EnqueueCoalescer
from emailq.errors import ConfigError
from emailq.forms import load_forms
from emailq.logs import configure_logging, redact_url
from emailq.netlists import split_list
from emailq.queue import Queue
from emailq.settings import Settings
from emailq.startup import exit_on_config_error, freeze_heap, load_settings
from emailq.templates import load_templates
from emailq.waiting import ResultWaiter
from emailq.webhooks.config import load_webhooks
from emailq.webhooks.store import WebhookStore
from server import docs
from server.auth import relay_guard
from server.cors import ApiCorsMiddleware
from server.deps import attach_state
from server.errors import install_error_handlers
from server.lane import DirectLane, direct_routes
from server.middleware import RequestLayer
from server.openapi import install_openapi
from server.ratelimit import RateLimits
from server.routes import (
    admin,
    batch,
    dashboard,
    dev,
    email,
    forms,
    health,
    inbox,
    metrics,
    monitor,
    templates,
    webhooks,
)
from server.state import AppState

log = logging.getLogger("emailq.api")

API_PREFIX = "/api/v1"

# What OpenTelemetry's API hands out while no provider has been set: FastAPI's own test for
# "not configured" (``fastapi.telemetry._api._unconfigured``, private), by class, as it does.
# Should FastAPI add a class there, this set takes it for a configured provider and leaves
# FastAPI's defaults: the per-request ask comes back, and nothing else changes.
_UNSET_PROVIDERS = frozenset({
    ("opentelemetry.trace", "ProxyTracerProvider"),
    ("opentelemetry.metrics._internal", "_ProxyMeterProvider"),
    ("opentelemetry._logs._internal", "ProxyLoggerProvider"),
})  # fmt: skip


def native_telemetry() -> TelemetryConfig | None:
    """FastAPI's native OpenTelemetry, decided once, as the app is built: FastAPI's defaults
    when a global provider is set by then (``opentelemetry-instrument`` sets them before
    any app code runs), else off. Left to FastAPI, every request asks OpenTelemetry for its
    three providers (environment reads each time), 5% of a send's instructions, to find
    what does not change while the process runs. emailq's own telemetry is ``/metrics`` and its
    log lines. Raises ``ConfigError`` when a provider named in the environment does not
    load (FastAPI would have failed every request with it instead)."""
    try:
        providers = (trace.get_tracer_provider(), otel_metrics.get_meter_provider(),
                     _logs.get_logger_provider())  # fmt: skip
    except Exception as exc:  # OTEL_PYTHON_*_PROVIDER names an entry point that does not load
        raise ConfigError(
            "OpenTelemetry: a provider named by OTEL_PYTHON_TRACER_PROVIDER, "
            "OTEL_PYTHON_METER_PROVIDER or OTEL_PYTHON_LOGGER_PROVIDER did not load "
            f"({type(exc).__name__}); unset it, or install the package that provides it"
        ) from exc
    if any((type(p).__module__, type(p).__name__) not in _UNSET_PROVIDERS for p in providers):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings) -> FastAPI:
    """Build the app for ``settings``; the Redis client opens in the lifespan.

    Raises ``OpenRelayRefused`` for a configuration that would relay mail for anyone,
    ``FormsConfigError`` for an invalid ``FORMS_FILE`` and ``TemplatesConfigError`` for a
    template of ``TEMPLATES_DIR`` that does not parse or uses what cannot be bounded
    (``WebhooksConfigError``: the same for ``WEBHOOKS_FILE``).
    """
    # Read and checked now, so a bad FORMS_FILE stops the start with the form and field named
    # (before the relay guard, which logs how the API may be reached once the start is sure).
    contact_forms = load_forms(settings.forms_file)
    stored_templates = load_templates(settings.templates_dir)  # likewise, file and line
    # Checked here too, though the dispatcher registers them: a bad file stops the start.
    load_webhooks(settings.webhooks_file, allow_private=settings.webhook_allow_private)
    relay_guard(settings)

    state = AppState(settings, contact_forms, stored_templates)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.queue = Queue.from_settings(settings)
        # The README's bound on a 503: a wait for the call in flight, then its own call.
        state.enqueuer = EnqueueCoalescer(
            state.queue, budget_seconds=2 * settings.redis_timeout_seconds
        )
        # One pub/sub subscription serves every `wait=` client of this process.
        state.waiter = ResultWaiter(state.queue)
        state.webhooks = WebhookStore(state.queue)
        await state.waiter.start()
        # A second Redis pool, kept apart from the queue's on purpose (server.ratelimit).
        state.rate_limits = RateLimits(settings)
        # One pooled client for CAPTCHA verification, not a new one (and TLS handshake) per
        # form submission.
        state.http = httpx.AsyncClient()
        log.info("API ready; Redis at %s", redact_url(settings.redis_url))
        down = await state.queue.unreachable()
        if down is not None:
            log.warning("not ready: %s; every send answers 503, and /ready 503, until Redis "
                        "answers", down)  # fmt: skip
        try:
            yield
        finally:
            await state.waiter.stop()
            await state.rate_limits.close()
            await state.http.aclose()
            await state.queue.close()

    app = FastAPI(
        title="emailq",
        version=__version__,
        description="Queue an email, get a task_id at once, poll or wait for the result.",
        lifespan=lifespan,
        # FastAPI's own pages load from a CDN; server/docs.py serves ours (API_DOCS).
        docs_url=None,
        redoc_url=None,
        openapi_url=docs.OPENAPI_URL if settings.api_docs else None,
        telemetry=native_telemetry(),
    )
    attach_state(app, state)
    # Innermost, added first: the send and batch routes' ordinary requests are answered here,
    # inside the request layer (metrics, request context, size limit), before FastAPI's
    # routing.
    app.add_middleware(DirectLane, routes=direct_routes(API_PREFIX, email.router, batch.router))
    cors = None
    if settings.cors_origins:
        # Inside the metrics, outside the request context: preflights are answered before
        # anything else runs, and counted.
        cors = functools.partial(ApiCorsMiddleware, origins=split_list(settings.cors_origins),
                                 prefix=API_PREFIX, exclude=[API_PREFIX + "/forms/"])  # fmt: skip
    app.add_middleware(
        RequestLayer,
        metrics=state.metrics,
        max_request_bytes=settings.max_request_bytes,
        path_limits={API_PREFIX + batch.BATCH_PATH: settings.max_batch_request_bytes},
        cors=cors,
    )
    install_error_handlers(app)
    app.include_router(email.router, prefix=API_PREFIX)
    app.include_router(batch.router, prefix=API_PREFIX)
    app.include_router(admin.router, prefix=API_PREFIX)
    app.include_router(monitor.router, prefix=API_PREFIX)
    app.include_router(webhooks.router, prefix=API_PREFIX)
    app.include_router(forms.router, prefix=API_PREFIX)
    app.include_router(templates.router, prefix=API_PREFIX)
    app.include_router(dashboard.router)
    if settings.dev_pages:
        app.include_router(dev.router)
    if settings.dev_pages and settings.dev_inbox_dir is not None:
        app.include_router(inbox.router_for(settings.dev_inbox_dir))
    app.include_router(health.router)
    app.include_router(metrics.router)
    install_openapi(app, settings)
    if settings.api_docs:
        docs.install_docs(app)
    return app


@functools.cache
def _app_from_environment() -> FastAPI:
    # A bad setting, FORMS_FILE, TEMPLATES_DIR or open-relay configuration is one line and
    # exit code 2, not a traceback from inside uvicorn's import of this module.
    with exit_on_config_error():
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        app = create_app(settings)
    freeze_heap()  # as `python -m server` does (emailq.startup.freeze_heap)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn server.main:app --no-proxy-headers` looks `app` up here. Building it on first
    # access rather than at import keeps the environment from being read by anything that
    # merely imports us.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(name)
