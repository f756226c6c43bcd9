"""Prometheus metrics across real processes: after a known workload (N sent, M refused
with a 5xx by the relay, a backlog in each lane), the API's /metrics and the worker's own
metrics port hold exactly the counts of what happened."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import redis

from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import Api, mail
from tests.helpers.metrics import Samples, family, parse, scrape, worker_with_metrics
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import RecordingHandler, SmtpServer

N, M = 5, 3  # mails the relay accepts, and mails it refuses for good
REFUSED = "550 5.1.1 no such user"
RECEIVED = "/api/v1/email/received"


def _post(base: str, **fields: object) -> str:
    response = httpx.post(f"{base}{RECEIVED}", json=mail(**fields), timeout=5.0)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def _worker_settles(url: str) -> Samples:
    """The worker's metrics once no job is held (each outcome is recorded in Redis before
    its job leaves the worker's hands, so a final status can be seen a moment earlier)."""
    found: list[Samples] = []

    def idle() -> bool:
        found[:] = [scrape(url)]
        return found[0]["emailq_worker_inflight_sends"] == 0

    wait_until(idle, what="the worker to hold no job")
    return found[0]


def _check_worker(samples: Samples) -> None:
    sends = family(samples, "emailq_worker_sends_total")
    assert sends == {
        'emailq_worker_sends_total{code_class="2xx",outcome="success"}': N,
        'emailq_worker_sends_total{code_class="5xx",outcome="failed"}': M,
    }
    assert samples['emailq_worker_send_duration_seconds_count{outcome="success"}'] == N
    assert samples['emailq_worker_send_duration_seconds_count{outcome="failed"}'] == M
    # Each job claimed once (no retries: 550 is permanent), in however many round trips.
    assert samples["emailq_worker_claimed_jobs_total"] == N + M
    claims = samples["emailq_worker_claims_total"]
    assert claims >= 1
    assert samples["emailq_worker_claim_duration_seconds_count"] == claims
    assert samples["emailq_worker_leases_lost_total"] == 0
    # WORKER_CONCURRENCY=1: one pooled connection, kept after the 550s (RSET), now idle.
    assert samples['emailq_worker_smtp_connections{state="busy"}'] == 0
    assert samples['emailq_worker_smtp_connections{state="idle"}'] == 1


def test_metrics_count_a_known_workload_exactly(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
    redis_url: str,
) -> None:
    relay = smtp_factory(handler=RecordingHandler(replies=[REFUSED] * M))
    settings = make_settings(smtp_port=relay.port, worker_concurrency=1)
    base = procs.api(settings)
    worker, worker_metrics = worker_with_metrics(procs, settings)

    # While the worker runs, the API sees it live, its relay breaker closed.
    def live() -> bool:
        samples = scrape(f"{base}/metrics")
        return (samples["emailq_live_workers"], samples['emailq_relay_workers{state="closed"}']) \
            == (1, 1)  # fmt: skip

    wait_until(live, what="the worker to be live in /metrics")

    api = Api(base)
    sent_ids = api.enqueue(N + M)
    results = api.wait_terminal(sent_ids)
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == ["failed"] * M + ["success"] * N
    delivered = relay.handler.task_ids()  # counted at the relay: N, none twice
    assert sorted(delivered) == sorted(t for t, r in results.items() if r["status"] == "success")
    _check_worker(_worker_settles(worker_metrics))

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0

    # A backlog in each lane, one scheduled mail, and some refused requests.
    backlog = [_post(base, priority="high")]
    backlog += [_post(base) for _ in range(2)]
    backlog += [_post(base, priority="low") for _ in range(3)]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    backlog.append(_post(base, send_at=later))
    for bad in ("not an address", ""):
        assert httpx.post(f"{base}{RECEIVED}", json=mail(to=bad)).status_code == 422
    unknown = httpx.get(f"{base}/api/v1/email/result", params={"task_id": str(uuid.uuid4())})
    assert unknown.status_code == 404
    assert httpx.get(f"{base}/no/such/page").status_code == 404

    first = parse(httpx.get(f"{base}/metrics").text)
    text = httpx.get(f"{base}/metrics").text
    samples = scrape(f"{base}/metrics")
    assert not any(task_id in text for task_id in [*sent_ids, *backlog])  # no ids in labels

    # -- the queue, read from Redis at the scrape --
    assert samples["emailq_redis_up"] == 1
    assert family(samples, "emailq_queue_depth") == {
        'emailq_queue_depth{lane="high"}': 1, 'emailq_queue_depth{lane="default"}': 2,
        'emailq_queue_depth{lane="low"}': 3,
    }  # fmt: skip
    for lane in ("high", "default", "low"):
        assert samples[f'emailq_queue_oldest_age_seconds{{lane="{lane}"}}'] > 0
    assert samples["emailq_scheduled_tasks"] == 1
    assert samples["emailq_inflight_tasks"] == 0
    assert samples["emailq_dead_letters"] == M
    assert samples["emailq_live_workers"] == 0  # it left the live list on its way out
    assert set(family(samples, "emailq_relay_workers").values()) == {0}
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        charged = sum(int(store.hget(Keys().task(t), "bytes") or 0) for t in backlog)
    finally:
        store.close()
    assert charged > 0
    assert samples["emailq_stored_bytes"] == charged
    # Redis's own memory, what REDIS_MEMORY_HEADROOM's 507 is judged by.
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        memory = store.info("memory")
    finally:
        store.close()
    assert samples["emailq_redis_memory_max_bytes"] == memory["maxmemory"]
    assert 0 < samples["emailq_redis_memory_used_bytes"] <= 2 * memory["used_memory"]

    # -- this API process's own counts --
    assert family(samples, "emailq_mails_accepted_total") == {
        'emailq_mails_accepted_total{lane="high"}': 1,
        'emailq_mails_accepted_total{lane="default"}': N + M + 2 + 1,
        'emailq_mails_accepted_total{lane="low"}': 3,
    }
    posts = N + M + len(backlog)
    route = f'route="{RECEIVED}"'
    assert samples[f'emailq_http_requests_total{{method="POST",{route},status="202"}}'] == posts
    assert samples[f'emailq_http_requests_total{{method="POST",{route},status="422"}}'] == 2
    assert samples[f"emailq_http_request_duration_seconds_count{{{route}}}"] == posts + 2
    assert samples['emailq_http_requests_total{method="GET",route="unmatched",status="404"}'] == 1
    assert family(samples, "emailq_rejections_total") == {
        'emailq_rejections_total{error="validation_error"}': 2,
        'emailq_rejections_total{error="not_found"}': 2,  # the unknown task, the unknown page
    }
    # Each scrape counts the ones answered before it.
    scrapes = 'emailq_http_requests_total{method="GET",route="/metrics",status="200"}'
    assert samples[scrapes] == first[scrapes] + 2
