"""A worker's Prometheus metrics: an observer (worker.observer) that counts what the loop
reports, served on ``WORKER_METRICS_PORT`` (off by default).

Served by prometheus_client's own HTTP server, in a daemon thread: all it reads is this
process's memory (counters, and the loop's and pool's counts read at scrape time), never
Redis, so a scrape neither waits for nor blocks the event loop. Every attempt is counted
once in ``emailq_worker_sends_total``, under the outcome that ended it.
"""

from __future__ import annotations

import asyncio
import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from emailq.models import ClaimedJob
from emailq.queue import Unreadable
from emailq.settings import Settings
from worker.loop import Worker
from worker.observer import WorkerObserver

log = logging.getLogger("emailq.worker")

# Seconds. A send over a warm connection takes milliseconds; a slow relay's end of DATA up
# to SMTP_DATA_TIMEOUT_SECONDS (600 by default).
SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                600.0)  # fmt: skip
# A claim is one Redis round trip: well under a millisecond on a LAN, unless Redis stalls.
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
SUCCESS, RETRY, FAILED, DEFERRED, UNKNOWN = "success", "retry", "failed", "deferred", "unknown"


def code_class(code: int | None) -> str:
    """An SMTP reply code as a label value: 2xx, 4xx, 5xx, or none (no reply at all)."""
    if code is None or not 200 <= code < 600:
        return "none"
    return f"{code // 100}xx"


class WorkerMetrics(WorkerObserver):
    """The series of one worker process, in a registry of its own."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # as server.metrics does
        self.registry = registry = CollectorRegistry()
        self._sends = Counter(
            "emailq_worker_sends", "Send attempts, by the outcome recorded and the SMTP reply's "
            "class: success, retry, failed, deferred (the relay's fault: not counted as an "
            "attempt of the mail's), unknown (sent, and the reply never came)",
            ["outcome", "code_class"], registry=registry,
        )  # fmt: skip
        self._duration = Histogram(
            "emailq_worker_send_duration_seconds",
            "Time from the start of an attempt to its outcome, by outcome",
            ["outcome"], buckets=SEND_BUCKETS, registry=registry,
        )  # fmt: skip
        self._claims = Counter("emailq_worker_claims", "Claim round trips to Redis (alone, or "
                               "made with a finish)", registry=registry)  # fmt: skip
        self._claimed = Counter("emailq_worker_claimed_jobs", "Jobs those claims returned",
                                registry=registry)  # fmt: skip
        self._claim_time = Histogram("emailq_worker_claim_duration_seconds", "Time of one "
                                     "claim round trip", buckets=CLAIM_BUCKETS,
                                     registry=registry)  # fmt: skip
        self._renewals = Counter("emailq_worker_lease_renewals", "Lease renewal round trips "
                                 "(heartbeats) that Redis answered", registry=registry)  # fmt: skip
        self._lost = Counter("emailq_worker_leases_lost", "Jobs given up unsent because their "
                             "lease passed to another worker", registry=registry)  # fmt: skip
        self._lapsed = Counter("emailq_worker_leases_reclaimed", "Jobs whose lease had lapsed "
                               "(its worker died or lost Redis) that this worker's claims put "
                               "back, their interrupted attempt counted",
                               registry=registry)  # fmt: skip
        self._in_flight = Gauge("emailq_worker_inflight_sends", "Jobs held: claimed, outcome "
                                "not yet recorded", registry=registry)  # fmt: skip
        self._connections = Gauge("emailq_worker_smtp_connections", "SMTP connections of the "
                                  "pool: busy (sending) or idle (kept for reuse)", ["state"],
                                  registry=registry)  # fmt: skip
        ProcessCollector(registry=registry)  # CPU, memory, open files of this process
        # The task whose unknown outcome was just counted: the loop follows on_unknown_outcome
        # with on_retry or on_failed for the same attempt, which must not count it again.
        self._unknown: str | None = None
        self._server: WSGIServer | None = None

    def watch(self, worker: Worker) -> None:
        """Read ``worker``'s jobs in flight and SMTP pool at each scrape."""
        pool = worker.sender.pool
        self._in_flight.set_function(lambda: worker.in_flight)
        self._connections.labels("busy").set_function(lambda: pool.connections()[0])
        self._connections.labels("idle").set_function(lambda: pool.connections()[1])

    # -- the observer hooks (plain calls on the event loop: quick, never blocking) --------

    def _send(self, outcome: str, code: int | None, seconds: float) -> None:
        self._sends.labels(outcome, code_class(code)).inc()
        self._duration.labels(outcome).observe(seconds)

    def on_claim(self, jobs: int, seconds: float) -> None:
        self._claims.inc()
        self._claimed.inc(jobs)
        self._claim_time.observe(seconds)

    def on_lapsed(self, worker_id: str, jobs: int) -> None:
        self._lapsed.inc(jobs)

    def on_sent(self, job: ClaimedJob, code: int, seconds: float) -> None:
        self._send(SUCCESS, code, seconds)

    def on_retry(
        self, job: ClaimedJob, code: int | None, delay_seconds: float, seconds: float
    ) -> None:
        if not self._counted_as_unknown(job.task_id):
            self._send(RETRY, code, seconds)

    def on_failed(
        self, job: ClaimedJob | Unreadable, code: int | None, reason: str, seconds: float
    ) -> None:
        if not self._counted_as_unknown(job.task_id):
            self._send(FAILED, code, seconds)

    def on_deferred(self, job: ClaimedJob, code: int | None, seconds: float) -> None:
        self._send(DEFERRED, code, seconds)

    def on_unknown_outcome(self, job: ClaimedJob, seconds: float) -> None:
        self._send(UNKNOWN, None, seconds)
        self._unknown = job.task_id

    def on_lease_lost(self, job: ClaimedJob, reason: str) -> None:
        self._lost.inc()

    def on_renewal(self, held: int, lost: int) -> None:
        self._renewals.inc()

    def _counted_as_unknown(self, task_id: str) -> bool:
        counted, self._unknown = self._unknown == task_id, None
        return counted

    # -- the endpoint ----------------------------------------------------------------------

    def listen(self, worker: Worker, settings: Settings) -> bool:
        """Serve the metrics on WORKER_METRICS_HOST:WORKER_METRICS_PORT; False (logged) if
        that address cannot be had."""
        self.watch(worker)
        host, port = settings.worker_metrics_host, settings.worker_metrics_port
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            log.error("WORKER_METRICS_PORT=%d: cannot listen on %s (%s); set another port, "
                      "or 0 for no metrics", port, host, exc)  # fmt: skip
            return False
        log.info("metrics at http://%s:%d/metrics", host, port)
        return True

    async def close(self) -> None:
        """Stop serving (waits for the server thread's next poll, up to half a second)."""
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()
