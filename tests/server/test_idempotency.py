"""Idempotency-Key on the send endpoint, against a real Redis: replay, conflict, scope, TTL."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.models import Job
from emailq.queue import IDEMPOTENCY_TTL_SECONDS, EnqueueItem, Idempotency, Keys, Queue
from tests.helpers.api import mail

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
KEYS = Keys()
HEADER = "Idempotency-Key"


def send(
    client: TestClient, key: str | bytes, body: dict[str, Any] | None = None
) -> httpx.Response:
    response: httpx.Response = client.post(SEND, json=body or mail(), headers={HEADER: key})
    return response


def task_keys(store: redis.Redis) -> list[str]:
    return [str(k) for k in store.scan_iter(match=KEYS.task_prefix + "*")]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]


# -- replay and conflict -----------------------------------------------------------------


def test_a_repeat_replays_the_first_answer_and_stores_nothing_new(
    client: TestClient, store: redis.Redis
) -> None:
    first = send(client, "order-42")
    again = send(client, "order-42")

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() == {"task_id": first.json()["task_id"], "status": "queued"}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert task_keys(store) == [KEYS.task(first.json()["task_id"])]
    assert store.llen(KEYS.lane("default")) == 1


def test_the_same_json_reserialized_is_the_same_request(
    client: TestClient, store: redis.Redis
) -> None:
    first = send(client, "k")
    # Other key order and whitespace: the fingerprint is of canonical JSON, not raw bytes.
    raw = (
        '{ "username": "Ada", "body": "Hi {username}",  "subject": "Hello", '
        '"to": "user@example.com" }'
    )
    headers = {"Idempotency-Key": "k", "Content-Type": "application/json"}
    again = client.post(SEND, content=raw, headers=headers)

    assert again.status_code == 202, again.text
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(task_keys(store)) == 1


def test_the_same_key_with_another_body_is_409_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    first = send(client, "order-42")
    before = sorted(store.keys())

    other = send(client, "order-42", mail(subject="Something else"))

    assert_error(other, 409, "idempotency_conflict")
    assert "Idempotent-Replayed" not in other.headers
    assert sorted(store.keys()) == before
    assert task_keys(store) == [KEYS.task(first.json()["task_id"])]


def test_different_keys_create_different_tasks(client: TestClient, store: redis.Redis) -> None:
    one, two = send(client, "a"), send(client, "b")

    assert one.json()["task_id"] != two.json()["task_id"]
    assert "Idempotent-Replayed" not in two.headers
    assert len(task_keys(store)) == 2


def test_without_the_header_every_request_is_new(client: TestClient, store: redis.Redis) -> None:
    one, two = client.post(SEND, json=mail()), client.post(SEND, json=mail())

    assert one.json()["task_id"] != two.json()["task_id"]
    assert not list(store.scan_iter(match="*:idem:*"))


def test_a_refused_first_request_does_not_use_up_the_key(
    client: TestClient, store: redis.Redis
) -> None:
    refused = send(client, "k", mail(subject="bad\r\nBcc: x@example.com"))
    accepted = send(client, "k")

    assert refused.status_code == 422
    assert accepted.status_code == 202
    assert "Idempotent-Replayed" not in accepted.headers


# -- the record ---------------------------------------------------------------------------


def test_the_record_is_keyed_by_a_hash_of_the_key_and_kept_24_hours(
    client: TestClient, store: redis.Redis
) -> None:
    key = "a key with {braces}:colons and * globs"
    task_id = send(client, key).json()["task_id"]

    # Without API keys the scope is the client's address (the client fixture's loopback peer).
    digest = hashlib.sha256(key.encode()).hexdigest()
    name = f"{{emailq}}:idem:anonymous@127.0.0.1:{digest}"
    assert name == KEYS.idempotency("anonymous@127.0.0.1", key)
    record = store.hgetall(name)
    assert record["task_id"] == task_id
    assert len(record["fingerprint"]) == 64
    assert int(record["created"]) == int(store.hget(KEYS.task(task_id), "created_at") or 0)
    assert IDEMPOTENCY_TTL_SECONDS == 24 * 3600
    assert IDEMPOTENCY_TTL_SECONDS - 60 < store.ttl(name) <= IDEMPOTENCY_TTL_SECONDS


# -- the header ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "x" * 257, "tab\tinside", "del\x7f", b"caf\xc3\xa9"],
    ids=["empty", "257-chars", "tab", "del", "non-ascii"],
)
def test_an_invalid_key_is_422_and_stores_nothing(
    client: TestClient, store: redis.Redis, key: str | bytes
) -> None:
    response = send(client, key)

    assert_error(response, 422, "validation_error")
    assert response.json()["fields"][0]["loc"] == ["header", "Idempotency-Key"]
    assert store.dbsize() == 0


def test_a_key_of_256_printable_characters_is_accepted(client: TestClient) -> None:
    key = "".join(chr(32 + i % 95) for i in range(256))
    assert send(client, key).status_code == 202
    assert send(client, key).headers["Idempotent-Replayed"] == "true"


def batch(client: TestClient, key: str, *bodies: str) -> httpx.Response:
    messages = [mail(body=text) for text in bodies] + [{"to": "not-an-address"}]
    return client.post(BATCH, json={"messages": messages}, headers={HEADER: key})


def test_a_repeated_batch_replays_its_task_ids_and_stores_nothing_new(
    client: TestClient, store: redis.Redis
) -> None:
    first = batch(client, "batch-1", "one", "two")
    again = batch(client, "batch-1", "one", "two")

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()  # same ids, same per-message rejection
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(task_keys(store)) == 2


def test_a_batch_key_reused_with_another_body_is_409_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    batch(client, "batch-2", "one")
    before = sorted(task_keys(store))

    conflict = batch(client, "batch-2", "one", "two", "three")

    assert_error(conflict, 409, "idempotency_conflict")
    assert sorted(task_keys(store)) == before


def test_batch_and_single_send_keys_do_not_collide(client: TestClient, store: redis.Redis) -> None:
    assert batch(client, "shared", "one").status_code == 202
    assert send(client, "shared").status_code == 202
    assert len(task_keys(store)) == 2


# -- the queue: scope and races ------------------------------------------------------------


async def test_identical_batches_racing_create_each_task_once(queue: Queue) -> None:
    """Two copies of one batch at once: each message is stored under its own record, so
    whichever copy gets there first creates it and the other gets its id back."""
    once = Idempotency(scope="batch:anonymous", key="race", fingerprint="f")
    jobs = [Job(to="user@example.com", subject=f"s{i}", text="t") for i in range(20)]

    async def one_copy() -> list[str]:
        items = [EnqueueItem(task_id=str(uuid.uuid4()), job=job, request_id="r") for job in jobs]
        assert await queue.guard_batch(once) in (None, True)
        replies = await queue.enqueue_many(items, once)
        return [r.task_id if r else item.task_id for item, r in zip(items, replies, strict=True)]

    first, second = await asyncio.gather(one_copy(), one_copy())

    assert first == second
    stored = [k async for k in queue.redis.scan_iter(match=queue.keys.task_prefix + "*")]
    assert len(stored) == 20


def item(task_id: str) -> EnqueueItem:
    return EnqueueItem(task_id, Job(to="u@example.com", subject="s", text="t"), "req")


async def test_keys_are_scoped(queue: Queue, store: redis.Redis) -> None:
    alice = Idempotency(scope="key-alice", key="k", fingerprint="f")
    bob = Idempotency(scope="key-bob", key="k", fingerprint="f")

    assert await queue.enqueue_once(item("t1"), alice) is None
    assert await queue.enqueue_once(item("t2"), bob) is None  # same key, other scope: new task
    replay = await queue.enqueue_once(item("t3"), alice)

    assert replay is not None
    assert replay.task_id == "t1"
    assert replay.same_request
    assert sorted(task_keys(store)) == [KEYS.task("t1"), KEYS.task("t2")]


async def test_racing_duplicates_store_one_task(queue: Queue, store: redis.Redis) -> None:
    once = Idempotency(scope="anonymous", key="k", fingerprint="f")

    replies = await asyncio.gather(*(queue.enqueue_once(item(f"t{i}"), once) for i in range(20)))

    winners = [i for i, reply in enumerate(replies) if reply is None]
    assert len(winners) == 1
    assert {r.task_id for r in replies if r is not None} == {f"t{winners[0]}"}
    assert task_keys(store) == [KEYS.task(f"t{winners[0]}")]
