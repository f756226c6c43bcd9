"""Prometheus metrics of the API: this process's requests, and the queue's gauges.

- ``ApiMetrics`` holds this process's series in a registry of its own (one per app, so
  apps built side by side, as the tests build them, never share one): requests by route
  template, method and status, latency per route, mails accepted by lane, and error answers
  by their ``error`` code.
- ``ApiMetrics.answered`` fills the request series; the outermost layer
  (``server.middleware.RequestLayer``) calls it for every answer (CORS preflights and 404s
  included). Each route's template and series are looked up once, on its first request;
  after that a request costs two clock reads, a few dict lookups and two increments.
- ``ApiMetrics.render`` is what ``GET /metrics`` answers: the queue's gauges come from one
  ``Queue.gauges`` script call, awaited by the route *before* the text is rendered.
  prometheus_client's collectors are synchronous; a Redis call inside one would block the
  event loop (every request of this process) for its round trip, or need a thread.

Labels take values from short fixed sets only (route templates, known methods, status
codes, lanes, error codes): a label value from a request (a raw path with a task id, an
invented method) would make a new series per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.types import Scope

from emailq.errors import StoreUnavailable
from emailq.models import LANES, QueueGauges
from emailq.queue import EnqueueItem, Queue, Replay
from server.requeststate import ERROR_CODE_STATE

UNMATCHED = "unmatched"  # no route: a 404, or a CORS preflight answered before routing
OTHER = "other"  # a method outside METHODS: clients may send any token as a method
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
INTERNAL_ERROR = "internal_error"  # what an exception that escapes the app is answered with
# Seconds. The send path answers in a millisecond or two; `wait=` long-polls take up to 30.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)  # fmt: skip


def route_template(route: Any, path: str) -> str:
    """The path template of the route that served ``path``, prefixes included.

    FastAPI keeps an included router's routes with their own paths (``/email/result``, not
    ``/api/v1/email/result``); the prefix is the part of ``path`` before what the route's
    own pattern matches. Taken from the first request's path, so it assumes, as this app
    does, that router prefixes have no parameters of their own."""
    template: str | None = getattr(route, "path_format", None)
    pattern = getattr(route, "path_regex", None)
    if template is None or pattern is None:
        return UNMATCHED
    for start, char in enumerate(path):
        if char == "/" and pattern.match(path[start:]):
            return path[:start] + template
    return template


class _RouteSeries:
    """One route's latency histogram and request counters, by method then status."""

    __slots__ = ("counts", "latency", "requests", "template")

    def __init__(self, metrics: ApiMetrics, template: str) -> None:
        self.template = template
        self.requests = metrics.requests
        self.latency = metrics.latency.labels(template)
        self.counts: dict[str, dict[int, Counter]] = {}

    def observe(self, method: str, status: int, seconds: float) -> None:
        self.latency.observe(seconds)
        by_status = self.counts.get(method)
        if by_status is None:
            by_status = self.counts[method] = {}
        counter = by_status.get(status)
        if counter is None:
            counter = by_status[status] = self.requests.labels(self.template, method, str(status))
        counter.inc()


class ApiMetrics:
    """This API process's series, and the text ``GET /metrics`` answers."""

    def __init__(self) -> None:
        # A `_created` series beside each counter and histogram doubles every scrape's text
        # for a value Prometheus does not use. (A process-wide switch; the worker's too.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in 0.26
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "emailq_http_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "emailq_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        accepted = Counter("emailq_mails_accepted", "Mails stored for sending, by lane "
                           "(single sends, batch messages, contact forms; not replays)",
                           ["lane"], registry=self.registry)  # fmt: skip
        # Created for every lane now: a series that appears only with its first mail has no
        # earlier zero for rate() to start from.
        self._accepted = {str(lane): accepted.labels(lane.value) for lane in LANES}
        self._rejections = Counter("emailq_rejections", "Error answers, by their `error` code",
                                   ["error"], registry=self.registry)  # fmt: skip
        self._rejected: dict[str, Counter] = {}
        self._routes: dict[int, _RouteSeries] = {}
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of this process

    def accepted(self, lane: str, count: int = 1) -> None:
        """``count`` mails were stored in ``lane``."""
        self._accepted[lane].inc(count)

    def accepted_batch(
        self, items: Sequence[EnqueueItem], replies: Sequence[Replay | None]
    ) -> None:
        """Count the messages of a batch that were stored now: not those an earlier batch
        with the same Idempotency-Key stored (``replies`` names their task)."""
        for item, reply in zip(items, replies, strict=True):
            if reply is None:
                self.accepted(item.lane)

    def answered(self, scope: Scope, status: int, seconds: float) -> None:
        """Count one answered request (the middleware calls this)."""
        route = scope.get("route")
        # By identity: routes define __eq__ (so are unhashable) and live as long as the app.
        series = self._routes.get(id(route))
        if series is None:
            template = route_template(route, scope["path"])
            series = self._routes[id(route)] = _RouteSeries(self, template)
        method = scope["method"]
        series.observe(method if method in METHODS else OTHER, status, seconds)
        if status >= 400:
            state = scope.get("state")
            code = state.get(ERROR_CODE_STATE) if state else None
            if code is not None:
                self.rejected(code)

    def rejected(self, code: str) -> None:
        """Count one error answer with ``code`` (server.errors' codes: a short fixed set)."""
        counter = self._rejected.get(code)
        if counter is None:
            counter = self._rejected[code] = self._rejections.labels(code)
        counter.inc()

    async def render(self, queue: Queue, *, live_window_ms: int) -> bytes:
        """The exposition text: this process's series, then the queue's gauges, read now."""
        try:
            gauges: QueueGauges | None = await queue.gauges(live_window_ms=live_window_ms)
        except StoreUnavailable:
            gauges = None  # still answer: the API's own series matter most in an outage
        return generate_latest(_Scrape(self.registry, gauges))


class _Scrape:
    """One scrape's collector: the registry's series and gauges already read."""

    def __init__(self, registry: CollectorRegistry, gauges: QueueGauges | None) -> None:
        self.registry = registry
        self.gauges = gauges

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from queue_families(self.gauges)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def queue_families(gauges: QueueGauges | None) -> Iterator[Metric]:
    """The queue's gauges as metric families; without ``gauges`` (Redis did not answer),
    only ``emailq_redis_up 0``, so an outage is a value to alert on, not a gap."""
    yield _gauge("emailq_redis_up", "1 if this scrape read the queue's gauges from Redis, "
                 "else 0 (and they are left out)", 0 if gauges is None else 1)  # fmt: skip
    if gauges is None:
        return
    depth = GaugeMetricFamily("emailq_queue_depth", "Ready tasks waiting in the lane",
                              labels=["lane"])  # fmt: skip
    age = GaugeMetricFamily("emailq_queue_oldest_age_seconds", "Age (since it was accepted) "
                            "of the task at the head of the lane; 0 when empty",
                            labels=["lane"])  # fmt: skip
    for lane in gauges.lanes:
        depth.add_metric([lane.priority.value], lane.depth)
        age.add_metric([lane.priority.value], max(0.0, lane.oldest_age_seconds or 0.0))
    relay = GaugeMetricFamily("emailq_relay_workers", "Live workers by the state of their "
                              "relay circuit breaker (none: not published yet)",
                              labels=["state"])  # fmt: skip
    for state, count in gauges.relay.items():
        relay.add_metric([state], count)
    yield depth
    yield age
    yield relay
    yield _gauge("emailq_scheduled_tasks", "Tasks waiting for their send_at or a retry's "
                 "backoff", gauges.scheduled)  # fmt: skip
    yield _gauge("emailq_inflight_tasks", "Tasks claimed by a worker, under a lease",
                 gauges.in_flight)  # fmt: skip
    yield _gauge("emailq_dead_letters", "Failed tasks kept for requeue (RESULT_TTL_SECONDS)",
                 gauges.failed)  # fmt: skip
    yield _gauge("emailq_live_workers", "Workers with a heartbeat in the last three leases",
                 gauges.live_workers)  # fmt: skip
    yield _gauge("emailq_stored_bytes", "Job bytes of all mail waiting to be sent (what "
                 "MAX_STORED_BYTES limits)", gauges.stored_bytes)  # fmt: skip
    if gauges.memory_used_bytes is not None and gauges.memory_max_bytes is not None:
        yield _gauge("emailq_redis_memory_used_bytes", "Redis's used_memory (new mail is "
                     "refused, 507, past (1 - REDIS_MEMORY_HEADROOM) of maxmemory)",
                     gauges.memory_used_bytes)  # fmt: skip
        yield _gauge("emailq_redis_memory_max_bytes", "Redis's maxmemory (0: no limit)",
                     gauges.memory_max_bytes)  # fmt: skip
