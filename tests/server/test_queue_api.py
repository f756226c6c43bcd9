"""Queue features through the HTTP API against a real Redis: priorities, scheduling, expiry,
waiting, batches and the admin endpoints (no worker runs here; see tests/e2e for sending)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.queue import Keys, Queue
from emailq.settings import Settings
from server.deps import state_of
from server.main import create_app
from tests.helpers.api import MAX_BODY, assert_error, local_client, mail

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
BATCH = "/api/v1/emails/batch"
ADMIN = "/api/v1/admin"
KEYS = Keys()
LOOPBACK = ("127.0.0.1", 50000)

ADMIN_KEY = "eq_admin-test-key"  # test keys, not credentials
SEND_KEY = "eq_send-test-key"
KEYS_SETTING = f"ops:admin:{hash_key(ADMIN_KEY)} app:send:{hash_key(SEND_KEY)}"


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A loopback client, which may use the admin endpoints while API_KEYS is unset."""
    with local_client(app, client=LOOPBACK) as test_client:
        yield test_client


def rfc3339(moment: datetime) -> str:
    return moment.isoformat()


def send(client: TestClient, **fields: Any) -> str:
    response = client.post(SEND, json=mail(**fields))
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def result(client: TestClient, task_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(RESULT, params={"task_id": task_id, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ready_ids(store: redis.Redis, lane: str) -> list[str]:
    return list(store.lrange(KEYS.lane(lane), 0, -1))


def claim_one(redis_url: str) -> str:
    """Claim as a worker would, so the task is 'being sent'."""

    async def claim() -> str:
        queue = Queue.from_url(redis_url, timeout=1.0)
        try:
            found = await queue.claim("test-worker", 1, 60_000)
        finally:
            await queue.close()
        return found.jobs[0].task_id

    return asyncio.run(claim())


# -- priority, send_at, expiry -----------------------------------------------------------


def test_priority_picks_the_lane(client: TestClient, store: redis.Redis) -> None:
    ids = {p: send(client, priority=p) for p in ("high", "default", "low")}
    plain = send(client)

    assert ready_ids(store, "high") == [ids["high"]]
    assert ready_ids(store, "default") == [ids["default"], plain]
    assert ready_ids(store, "low") == [ids["low"]]
    assert result(client, plain)["priority"] == "default"


def test_result_shows_priority_schedule_and_expiry(client: TestClient, store: redis.Redis) -> None:
    send_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    task_id = send(client, priority="high", send_at=rfc3339(send_at), ttl_seconds=300)

    shown = result(client, task_id)

    assert (shown["status"], shown["priority"]) == ("pending", "high")
    assert datetime.fromisoformat(shown["scheduled_at"]) == send_at
    # ttl_seconds counts from send_at when one is given.
    assert datetime.fromisoformat(shown["expires_at"]) == send_at + timedelta(seconds=300)
    assert ready_ids(store, "high") == []
    assert store.zscore(KEYS.scheduled, task_id) == send_at.timestamp() * 1000


def test_expires_at_is_shown_as_given(client: TestClient) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    shown = result(client, send(client, expires_at=rfc3339(expires)))

    assert datetime.fromisoformat(shown["expires_at"]) == expires
    assert "scheduled_at" not in shown


def test_a_send_at_in_the_past_sends_now(client: TestClient, store: redis.Redis) -> None:
    task_id = send(client, send_at=rfc3339(datetime.now(UTC) - timedelta(hours=1)))

    assert ready_ids(store, "default") == [task_id]
    assert store.zcard(KEYS.scheduled) == 0
    assert "scheduled_at" not in result(client, task_id)


def _later(**delta: float) -> str:
    return rfc3339(datetime.now(UTC) + timedelta(**delta))


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"send_at": _later(days=30, hours=1)}, "invalid_message"),
        ({"expires_at": _later(hours=1), "ttl_seconds": 60}, "invalid_message"),
        ({"send_at": _later(hours=2), "expires_at": _later(hours=1)}, "invalid_message"),
        ({"expires_at": _later(hours=-1)}, "invalid_message"),
        ({"ttl_seconds": 0}, "validation_error"),
        ({"ttl_seconds": 31 * 24 * 3600}, "validation_error"),
        ({"send_at": "2030-01-01T00:00:00"}, "validation_error"),  # no offset: ambiguous
        ({"send_at": "tomorrow"}, "validation_error"),
        # Unix time was taken, a number or digits, its unit guessed (seconds below 2e10).
        ({"send_at": 1796000000}, "validation_error"),
        ({"send_at": "1796000000"}, "validation_error"),
        ({"expires_at": 1796000000000}, "validation_error"),
        ({"priority": "urgent"}, "validation_error"),
    ],
)
def test_bad_schedules_are_422_and_store_nothing(
    client: TestClient, store: redis.Redis, fields: dict[str, Any], code: str
) -> None:
    assert_error(client.post(SEND, json=mail(**fields)), 422, code)
    assert store.dbsize() == 0


# -- waiting -----------------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["31", "-1", "soon"])
def test_wait_outside_0_to_30_is_422(client: TestClient, wait: str) -> None:
    response = client.get(RESULT, params={"task_id": str(uuid.uuid4()), "wait": wait})
    body = assert_error(response, 422, "validation_error")
    assert body["fields"][0]["loc"] == ["query", "wait"]


def test_wait_on_an_unknown_task_is_404(client: TestClient) -> None:
    response = client.get(RESULT, params={"task_id": str(uuid.uuid4()), "wait": 5})
    assert_error(response, 404, "not_found")


def test_wait_returns_the_current_state_when_time_is_up(client: TestClient) -> None:
    task_id = send(client)
    assert result(client, task_id, wait=0.2)["status"] == "pending"


def test_wait_returns_once_the_task_is_final(client: TestClient, app: FastAPI) -> None:
    task_id = send(client)
    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(result(client, task_id, wait=20)))
    waiting.start()
    deadline = time.monotonic() + 10  # bounds a failing test only
    while state_of(app).waiter.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    assert client.post(f"{ADMIN}/tasks/{task_id}/cancel").status_code == 200
    waiting.join()

    # Woken by the finish, well before its 20 s: otherwise it would still say pending.
    assert (answers[0]["status"], answers[0]["reason"]) == ("failed", "cancelled")
    assert state_of(app).waiter.waiting == 0


# -- batch -------------------------------------------------------------------------------


def test_a_batch_stores_the_good_messages_and_reports_the_bad(
    client: TestClient, store: redis.Redis
) -> None:
    messages = [
        mail(username="A"),
        mail(to="not-an-address"),
        mail(priority="high"),
        mail(subject="Hi\r\nBcc: evil@example.com"),
        mail(send_at=_later(hours=1)),
    ]

    response = client.post(BATCH, json={"messages": messages})

    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["queued"], body["rejected"]) == (3, 2)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    good = [results[i] for i in (0, 2, 4)]
    assert all(r["status"] == "queued" and "error" not in r for r in good)
    assert results[1]["error"] == "validation_error"
    assert results[1]["detail"].startswith("to: ")
    assert results[1]["fields"][0]["loc"] == ["to"]
    assert "not-an-address" not in json.dumps(results[1])
    assert results[3]["error"] == "invalid_message"
    assert all("task_id" not in results[i] for i in (1, 3))
    assert ready_ids(store, "default") == [good[0]["task_id"]]
    assert ready_ids(store, "high") == [good[1]["task_id"]]
    assert store.zrange(KEYS.scheduled, 0, -1) == [good[2]["task_id"]]
    for entry in good:
        shown = result(client, entry["task_id"])
        assert shown["request_id"] == response.headers["X-Request-ID"]


def test_a_lone_surrogate_rejects_only_its_message(client: TestClient, store: redis.Redis) -> None:
    raw = json.dumps({"messages": [mail(body="bad \ud800"), mail()]}).encode()
    response = client.post(BATCH, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    bad, good = response.json()["results"]
    assert bad["error"] == "invalid_message"
    assert bad["fields"][0]["loc"] == ["body"]
    assert ready_ids(store, "default") == [good["task_id"]]


def test_a_batch_with_no_valid_message_is_422_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    messages = [mail(to="nobody"), mail(body="x" * (MAX_BODY + 1)), "not an object"]

    response = client.post(BATCH, json={"messages": messages})

    body = assert_error_with_results(response)
    assert [r["error"] for r in body["results"]] == [
        "validation_error", "payload_too_large", "validation_error",
    ]  # fmt: skip
    assert (body["queued"], body["rejected"]) == (0, 3)
    assert store.dbsize() == 0


def assert_error_with_results(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == "validation_error"
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": [mail() for _ in range(101)]},
        {"messages": []},
        {"messages": [mail()], "extra": 1},
        {"message": [mail()]},
        [mail()],
    ],
)
def test_a_malformed_batch_is_422_and_stores_nothing(
    client: TestClient, store: redis.Redis, payload: Any
) -> None:
    assert_error(client.post(BATCH, json=payload), 422, "validation_error")
    assert store.dbsize() == 0


def test_a_batch_has_its_own_size_limit(
    client: TestClient, store: redis.Redis, settings: Settings
) -> None:
    messages = [mail(body="x" * (MAX_BODY - 100)) for _ in range(100)]
    payload = json.dumps({"messages": messages}).encode()
    assert len(payload) > settings.max_request_bytes  # too big for a single send

    accepted = client.post(BATCH, content=payload, headers={"Content-Type": "application/json"})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["queued"] == 100
    assert store.llen(KEYS.lane("default")) == 100

    over = b"x" * (settings.max_batch_request_bytes + 1)
    refused = client.post(BATCH, content=over, headers={"Content-Type": "application/json"})
    assert_error(refused, 413, "payload_too_large")
    too_big_single = client.post(
        SEND, content=payload, headers={"Content-Type": "application/json"}
    )
    assert_error(too_big_single, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("value", "fits"),
    # A 1 KB value filled 1,000 times: each message within MAX_BODY_BYTES (1 MiB) after
    # substitution, 100 MiB for the batch's 100 from a 400 KB request (16 fit). As stored, a
    # control character takes 6 bytes (\u0001): 3 of those messages pass 16 MiB.
    [("A" * 1040, 16), ("\x01" * 1040, 2)],
)
def test_a_batch_that_substitution_grows_past_the_batch_limit_is_413_and_stores_nothing(
    make_settings: Callable[..., Settings], store: redis.Redis, value: str, fits: int
) -> None:
    settings = make_settings(max_body_bytes=1024 * 1024)
    grows = mail(body="{a}" * 1000, variables={"a": value})
    with local_client(create_app(settings)) as client:
        for count in (100, fits + 1):
            refused = client.post(BATCH, json={"messages": [grows] * count})
            assert_error(refused, 413, "payload_too_large")
            assert "as stored, after substitution" in refused.json()["detail"]
            assert store.dbsize() == 0
        accepted = client.post(BATCH, json={"messages": [grows] * fits})  # a batch as any
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["queued"] == fits


# -- admin: stats and dead letters -------------------------------------------------------


def test_stats_count_what_was_enqueued(client: TestClient) -> None:
    for priority, count in (("high", 2), ("default", 3), ("low", 1)):
        for _ in range(count):
            send(client, priority=priority)
    send(client, send_at=_later(hours=1))
    cancelled = send(client, priority="low")
    client.post(f"{ADMIN}/tasks/{cancelled}/cancel")

    response = client.get(f"{ADMIN}/stats")

    assert response.status_code == 200, response.text
    stats = response.json()
    lanes = {lane["priority"]: lane for lane in stats["lanes"]}
    assert {p: lane["depth"] for p, lane in lanes.items()} == {"high": 2, "default": 3, "low": 1}
    assert all(lane["oldest_age_seconds"] >= 0 for lane in lanes.values())
    assert stats["scheduled"] == 1
    assert (stats["in_flight"], stats["live_workers"]) == (0, 0)
    assert (stats["failed"], stats["failed_last_minute"], stats["failed_last_hour"]) == (1, 1, 1)
    assert (stats["sent_last_minute"], stats["sent_last_hour"]) == (0, 0)


def test_stats_of_an_empty_queue(client: TestClient) -> None:
    stats = client.get(f"{ADMIN}/stats").json()
    assert [(lane["depth"], lane["oldest_age_seconds"]) for lane in stats["lanes"]] == [
        (0, None), (0, None), (0, None),
    ]  # fmt: skip


def fail_in_order(client: TestClient, count: int) -> list[str]:
    """Tasks failed (by cancelling) one after another, oldest first."""
    ids = []
    for n in range(count):
        task_id = send(client, subject=f"mail {n}")
        assert client.post(f"{ADMIN}/tasks/{task_id}/cancel").status_code == 200
        ids.append(task_id)
        time.sleep(0.003)  # distinct millisecond scores, so "newest first" is one order
    return ids


def test_failed_lists_newest_first_in_pages(client: TestClient) -> None:
    ids = fail_in_order(client, 5)

    first = client.get(f"{ADMIN}/failed", params={"limit": 2}).json()
    second = client.get(f"{ADMIN}/failed", params={"offset": 2, "limit": 2}).json()
    last = client.get(f"{ADMIN}/failed", params={"offset": 4, "limit": 2}).json()

    pages = [first, second, last]
    listed = [t["task_id"] for page in pages for t in page["tasks"]]
    assert listed == ids[::-1]
    assert [p.get("next_offset") for p in pages] == [2, 4, None]
    assert (first["offset"], first["limit"]) == (0, 2)
    task = first["tasks"][0]
    assert (task["status"], task["reason"]) == ("failed", "cancelled")
    assert [a["outcome"] for a in task["attempt_log"]] == ["cancelled"]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"offset": -1}])
def test_failed_paging_is_checked(client: TestClient, params: dict[str, int]) -> None:
    assert_error(client.get(f"{ADMIN}/failed", params=params), 422, "validation_error")


# -- admin: requeue and cancel -----------------------------------------------------------


def test_requeue_one(client: TestClient, store: redis.Redis) -> None:
    [failed] = fail_in_order(client, 1)
    pending = send(client)

    assert_error(client.post(f"{ADMIN}/tasks/{uuid.uuid4()}/requeue"), 404, "not_found")
    conflict = assert_error(client.post(f"{ADMIN}/tasks/{pending}/requeue"), 409, "conflict")
    assert conflict["task_status"] == "pending"
    assert_error(client.post(f"{ADMIN}/tasks/not-a-uuid/requeue"), 422, "validation_error")

    response = client.post(f"{ADMIN}/tasks/{failed}/requeue")

    assert response.status_code == 200, response.text
    assert response.json() == {"requeued": 1, "task_ids": [failed]}
    shown = result(client, failed)
    assert (shown["status"], shown["attempts"]) == ("pending", 0)
    assert "reason" not in shown
    assert [a["outcome"] for a in shown["attempt_log"]] == ["cancelled", "requeued"]
    assert ready_ids(store, "default") == [pending, failed]
    assert client.get(f"{ADMIN}/failed").json()["tasks"] == []
    again = assert_error(client.post(f"{ADMIN}/tasks/{failed}/requeue"), 409, "conflict")
    assert again["task_status"] == "pending"


def test_requeue_listed_ids_skips_the_others(client: TestClient) -> None:
    ids = fail_in_order(client, 3)
    pending = send(client)

    listed = [ids[0], ids[2], pending, str(uuid.uuid4())]
    response = client.post(f"{ADMIN}/failed/requeue", json={"task_ids": listed})

    assert response.status_code == 200, response.text
    assert response.json() == {"requeued": 2, "task_ids": [ids[0], ids[2]]}
    assert [t["task_id"] for t in client.get(f"{ADMIN}/failed").json()["tasks"]] == [ids[1]]


def test_requeue_all(client: TestClient, store: redis.Redis) -> None:
    ids = fail_in_order(client, 3)

    response = client.post(f"{ADMIN}/failed/requeue", json={"all": True})

    assert response.json() == {"requeued": 3, "task_ids": ids}
    assert ready_ids(store, "default") == ids
    assert client.post(f"{ADMIN}/failed/requeue", json={"all": True}).json() == {
        "requeued": 0, "task_ids": [],
    }  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [{}, {"all": False}, {"all": True, "task_ids": []}, {"task_ids": ["x"]}, {"ids": []}],
)
def test_bulk_requeue_needs_ids_or_all(client: TestClient, payload: dict[str, Any]) -> None:
    assert_error(client.post(f"{ADMIN}/failed/requeue", json=payload), 422, "validation_error")


def test_cancel_a_scheduled_task(client: TestClient, store: redis.Redis) -> None:
    task_id = send(client, send_at=_later(minutes=10))
    assert store.zcard(KEYS.scheduled) == 1

    response = client.post(f"{ADMIN}/tasks/{task_id}/cancel")

    assert response.status_code == 200, response.text
    assert response.json() == {"task_id": task_id, "status": "cancelled"}
    shown = result(client, task_id)
    assert (shown["status"], shown["reason"], shown["attempts"]) == ("failed", "cancelled", 0)
    # Neither scheduled nor ready: no claim can reach it (tests/e2e checks nothing is sent).
    assert store.zcard(KEYS.scheduled) == 0
    assert all(ready_ids(store, lane) == [] for lane in ("high", "default", "low"))
    again = assert_error(client.post(f"{ADMIN}/tasks/{task_id}/cancel"), 409, "conflict")
    assert again["task_status"] == "failed"


def test_cancel_refuses_a_task_being_sent_or_unknown(client: TestClient, redis_url: str) -> None:
    task_id = send(client)
    assert claim_one(redis_url) == task_id

    busy = assert_error(client.post(f"{ADMIN}/tasks/{task_id}/cancel"), 409, "conflict")

    assert busy["task_status"] == "sending"
    assert result(client, task_id)["status"] == "pending"
    assert_error(client.post(f"{ADMIN}/tasks/{uuid.uuid4()}/cancel"), 404, "not_found")


# -- admin access ------------------------------------------------------------------------

# A fixed task id, not uuid4(): the ids of parametrized tests must be the same in every
# pytest process, or pytest-xdist's workers disagree on what they collected.
NO_SUCH_TASK = "5f0c6f4e-3c5b-4d2a-9e8f-0a1b2c3d4e5f"
ADMIN_CALLS = [
    ("GET", "/stats", None),
    ("GET", "/failed", None),
    ("POST", "/failed/requeue", {"all": True}),
    ("POST", f"/tasks/{NO_SUCH_TASK}/requeue", None),
    ("POST", f"/tasks/{NO_SUCH_TASK}/cancel", None),
]


def admin_call(client: TestClient, method: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return client.request(method, ADMIN + path, json=body, **kw)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_without_api_keys_only_loopback_clients_are_served(
    app: FastAPI, method: str, path: str, body: Any
) -> None:
    with TestClient(app) as remote:  # its peer is "testclient", not a loopback address
        refused = assert_error(admin_call(remote, method, path, body), 403, "forbidden")
    assert "API_KEYS" in refused["detail"]
    for peer in (LOOPBACK, ("::1", 50000)):
        with local_client(app, client=peer) as local:
            assert admin_call(local, method, path, body).status_code in (200, 404)


@pytest.mark.parametrize("peer", [("10.0.0.7", 4000), ("::ffff:192.168.1.2", 4000), ("", 0)])
def test_other_peers_are_refused_without_api_keys(app: FastAPI, peer: tuple[str, int]) -> None:
    with TestClient(app, client=peer) as remote:
        assert_error(remote.get(f"{ADMIN}/stats"), 403, "forbidden")


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_with_api_keys_every_client_needs_an_admin_key(
    make_settings: Callable[..., Settings], method: str, path: str, body: Any
) -> None:
    app = create_app(make_settings(api_keys=KEYS_SETTING))
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {ADMIN_KEY}"},
             {"Authorization": ADMIN_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}2"},
             {"Authorization": f"Bearer {hash_key(ADMIN_KEY)}"}]  # fmt: skip
    for peer in (LOOPBACK, ("testclient", 50000)):  # loopback earns nothing once keys exist
        with TestClient(app, client=peer) as client:
            for headers in wrong:
                response = admin_call(client, method, path, body, headers=headers)
                assert_error(response, 401, "unauthorized")
                assert response.headers["WWW-Authenticate"] == "Bearer"
            send_key = {"Authorization": f"Bearer {SEND_KEY}"}
            refused = assert_error(admin_call(client, method, path, body, headers=send_key),
                                   403, "forbidden")  # fmt: skip
            assert "admin key" in refused["detail"]
            right = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert admin_call(client, method, path, body, headers=right).status_code in (200, 404)


def test_admin_token_is_gone(make_settings: Callable[..., Settings]) -> None:
    assert "admin_token" not in Settings.model_fields
    settings = make_settings(admin_token="x")  # noqa: S106  # ignored, as any unknown name
    assert not hasattr(settings, "admin_token")
