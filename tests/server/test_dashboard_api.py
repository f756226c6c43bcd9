"""What the dashboard reads and serves, through the HTTP API against a real Redis: the page
and its headers, per-minute throughput, live workers, read-only mode, and who may ask."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.models import Attempt
from emailq.queue import Keys, Queue
from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import assert_error, bearer, local_client, mail
from tests.helpers.queues import within_one_minute_bucket

ADMIN = "/api/v1/admin"
KEYS = Keys()
ADMIN_KEY = "eq_admin-dashboard-test-key"  # test keys, not credentials
SEND_KEY = "eq_send-dashboard-test-key"
KEYS_SETTING = f"ops:admin:{hash_key(ADMIN_KEY)} app:send:{hash_key(SEND_KEY)}"
NEW_ENDPOINTS = ("/throughput", "/workers", "/permissions", "/events")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with local_client(create_app(settings)) as test_client:
        yield test_client


def send(client: TestClient, **fields: str) -> str:
    response = client.post("/api/v1/email/received", json=mail(**fields))
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def deliver(redis_url: str, count: int) -> None:
    """Claim and finish ``count`` ready tasks as a worker would: each one sent."""

    async def work() -> None:
        queue = Queue.from_url(redis_url, timeout=2)
        try:
            claim = await queue.claim("test-worker", count, 60_000)
            assert len(claim.jobs) == count
            for job in claim.jobs:
                entry = Attempt(attempt=job.attempt, outcome="success", code=250, reply="OK")
                assert await queue.finish(job, "success", entry) == "success"
        finally:
            await queue.close()

    asyncio.run(work())


# -- the page ----------------------------------------------------------------------------


def test_the_page_and_its_files_carry_a_strict_policy(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # No inline script or style for the policy to have to allow.
    assert "<script>" not in page.text
    assert "style=" not in page.text
    assert 'src="dashboard/dashboard.js"' in page.text
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    # Server text goes in as text: no HTML parsing of anything at run time.
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write",
                         script.text)  # fmt: skip
    assert client.get("/dashboard/dashboard.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("name", ["nothing.js", "..%2F..%2Fpyproject.toml", "index.py"])
def test_only_the_shipped_files_are_served(client: TestClient, name: str) -> None:
    assert_error(client.get(f"/dashboard/{name}"), 404, "not_found")


def test_without_keys_the_page_answers_local_requests_only(settings: Settings) -> None:
    with local_client(create_app(settings), client=("203.0.113.9", 4000)) as remote:
        assert_error(remote.get("/dashboard"), 403, "forbidden")
        assert_error(remote.get("/dashboard/dashboard.js"), 403, "forbidden")
    with local_client(create_app(settings)) as local:
        # A DNS-rebinding page reaches loopback under its own name.
        assert_error(local.get("/dashboard", headers={"Host": "evil.example"}), 403, "forbidden")


def test_with_keys_the_page_is_served_and_the_data_needs_an_admin_key(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(api_keys=KEYS_SETTING)
    with TestClient(create_app(settings), client=("203.0.113.9", 4000)) as remote:
        assert remote.get("/dashboard").status_code == 200  # holds nothing but code
        for path in NEW_ENDPOINTS:
            assert_error(remote.get(ADMIN + path), 401, "unauthorized")
            assert_error(remote.get(ADMIN + path, headers=bearer(SEND_KEY)), 403, "forbidden")
        answer = remote.get(f"{ADMIN}/permissions", headers=bearer(ADMIN_KEY))
        assert answer.json() == {"read_only": False}


# -- throughput and workers --------------------------------------------------------------


def test_throughput_counts_each_minute_of_the_last_two_hours(
    client: TestClient, redis_url: str
) -> None:

    async def in_one_bucket() -> None:
        queue = Queue.from_url(redis_url, timeout=2)
        try:
            await within_one_minute_bucket(queue)
        finally:
            await queue.close()

    asyncio.run(in_one_bucket())
    for _ in range(3):
        send(client)
    deliver(redis_url, 3)
    for _ in range(2):
        cancelled = send(client)
        assert client.post(f"{ADMIN}/tasks/{cancelled}/cancel").status_code == 200

    minutes = client.get(f"{ADMIN}/throughput").json()["minutes"]

    assert len(minutes) == 120
    assert (minutes[-1]["sent"], minutes[-1]["failed"]) == (3, 2)
    assert all((m["sent"], m["failed"]) == (0, 0) for m in minutes[:-1])
    starts = [m["at"] for m in minutes]
    assert starts == sorted(starts)
    assert starts[-1].endswith(":00.000+00:00")
    assert len(client.get(f"{ADMIN}/throughput", params={"minutes": 5}).json()["minutes"]) == 5


@pytest.mark.parametrize("minutes", ["0", "121", "-1", "x"])
def test_throughput_minutes_are_checked(client: TestClient, minutes: str) -> None:
    response = client.get(f"{ADMIN}/throughput", params={"minutes": minutes})
    assert_error(response, 422, "validation_error")


def test_workers_lists_live_ones_with_heartbeat_age_and_relay(
    client: TestClient, store: redis.Redis, settings: Settings
) -> None:
    now_ms = int(store.time()[0]) * 1000
    store.zadd(KEYS.workers, {"host:1:live": now_ms - 2000, "host:2:gone": now_ms - 3_600_000})
    relay = '{"worker_id": "host:1:live", "state": "open", "since": 1, "error": "<b>down</b>"}'
    store.set(KEYS.relay_state("host:1:live"), relay)

    workers = client.get(f"{ADMIN}/workers").json()["workers"]

    assert [w["worker_id"] for w in workers] == ["host:1:live"]
    [live] = workers
    assert 2.0 <= live["heartbeat_age_seconds"] < 3 * settings.job_lease_seconds
    assert live["relay"]["state"] == "open"
    assert live["relay"]["error"] == "<b>down</b>"  # as text; the page shows it as text


def test_a_worker_two_heartbeats_behind_is_marked_late(
    client: TestClient, store: redis.Redis, settings: Settings
) -> None:
    lease_ms = int(settings.job_lease_seconds * 1000)
    now_ms = int(store.time()[0]) * 1000  # whole seconds: up to a second behind Redis's now
    store.zadd(KEYS.workers, {"host:4:beating": now_ms - lease_ms // 3 + 1000,
                              "host:5:stalled": now_ms - lease_ms})  # fmt: skip
    listed = client.get(f"{ADMIN}/workers").json()["workers"]
    late = {w["worker_id"]: w["heartbeat_late"] for w in listed}
    assert late == {"host:4:beating": False, "host:5:stalled": True}


def test_a_worker_without_a_relay_state_is_listed_without_one(
    client: TestClient, store: redis.Redis
) -> None:
    store.zadd(KEYS.workers, {"host:3:new": int(store.time()[0]) * 1000})
    [worker] = client.get(f"{ADMIN}/workers").json()["workers"]
    assert (worker["worker_id"], worker["relay"]) == ("host:3:new", None)


# -- read-only mode ----------------------------------------------------------------------


def test_read_only_refuses_requeue_and_cancel_and_changes_nothing(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with local_client(create_app(make_settings())) as writable:
        dead = send(writable)
        assert writable.post(f"{ADMIN}/tasks/{dead}/cancel").status_code == 200
        waiting = send(writable)
    before = {key: store.type(key) for key in store.scan_iter()}
    snapshot = (store.hgetall(KEYS.task(dead)), store.hgetall(KEYS.task(waiting)),
                store.zrange(KEYS.failed, 0, -1),
                store.lrange(KEYS.lane("default"), 0, -1))  # fmt: skip

    with local_client(create_app(make_settings(dashboard_read_only=True))) as client:
        assert client.get(f"{ADMIN}/permissions").json() == {"read_only": True}
        for path, body in ((f"/tasks/{dead}/requeue", None), ("/failed/requeue", {"all": True}),
                           (f"/tasks/{waiting}/cancel", None)):  # fmt: skip
            answer = client.post(ADMIN + path, json=body)
            assert "DASHBOARD_READ_ONLY" in assert_error(answer, 403, "forbidden")["detail"]
        # Reading still works.
        assert client.get(f"{ADMIN}/failed").json()["tasks"][0]["task_id"] == dead

    assert {key: store.type(key) for key in store.scan_iter()} == before
    assert snapshot == (store.hgetall(KEYS.task(dead)), store.hgetall(KEYS.task(waiting)),
                        store.zrange(KEYS.failed, 0, -1),
                        store.lrange(KEYS.lane("default"), 0, -1))  # fmt: skip


def test_read_only_checks_the_admin_key_first(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_keys=KEYS_SETTING, dashboard_read_only=True)
    with TestClient(create_app(settings)) as client:
        task = "00000000-0000-4000-8000-000000000000"
        assert_error(client.post(f"{ADMIN}/tasks/{task}/requeue"), 401, "unauthorized")


# -- the event stream's arguments --------------------------------------------------------


@pytest.mark.parametrize("given", ["abc", "1-2-3", "$", "1-", "9" * 21, "0-0\r\nid: 5"])
def test_a_bad_last_event_id_is_422(client: TestClient, given: str) -> None:
    try:
        response = client.get(f"{ADMIN}/events", headers={"Last-Event-ID": given})
    except Exception:  # the HTTP client itself refuses a header with CR/LF: nothing sent
        assert "\n" in given
        return
    assert_error(response, 422, "validation_error")


def test_the_event_stream_answers_503_when_redis_is_down(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2)
    with local_client(create_app(settings)) as client:
        assert_error(client.get(f"{ADMIN}/events"), 503, "service_unavailable")


def test_openapi_documents_the_new_admin_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in NEW_ENDPOINTS:
        assert ADMIN + path in paths
    assert "/dashboard" not in paths
    assert ADMIN + "/events" in paths
    assert "text/event-stream" in str(paths[ADMIN + "/events"])


def test_dashboard_is_not_mounted_under_the_dev_pages_switch(
    make_settings: Callable[..., Settings],
) -> None:
    # The dashboard is an operator's page, there in production too.
    with local_client(create_app(make_settings(dev_pages=False))) as client:
        assert client.get("/dashboard").status_code == 200
