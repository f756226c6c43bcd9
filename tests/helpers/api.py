"""The API seen from outside: valid requests, the one error shape, test keys, and a client
of an API process."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from emailq.apikeys import hash_key
from emailq.queue import Keys
from tests.helpers.polling import wait_until

MAX_BODY = 2048  # MAX_BODY_BYTES of the API tests: small, so 413 cases stay small
TERMINAL = {"success", "failed"}
SETTLE_TIMEOUT = 30.0  # bounds a failing test only

# Test keys, not credentials.
ALICE = "eq_alice-test-key-0123456789"
BOB = "eq_bob-test-key-0123456789"
LIMITED = "eq_limited-test-key-0123456789"
ADMIN = "eq_admin-test-key-0123456789"
API_KEYS = (f"alice:send:{hash_key(ALICE)} bob:send:{hash_key(BOB)};"
            f"limited:send:{hash_key(LIMITED)}:example.com,Example.org "
            f"ops:admin:{hash_key(ADMIN)}")  # fmt: skip


def mail(**fields: Any) -> dict[str, Any]:
    """A valid send request (the original's four fields), with ``fields`` overriding the
    defaults."""
    return {"to": "user@example.com", "subject": "Hello", "body": "Hi {username}",
            "username": "Ada", **fields}  # fmt: skip


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def task_keys(store: redis.Redis) -> list[str]:
    """Every task hash in Redis."""
    return [str(k) for k in store.scan_iter(Keys().task("*"))]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The one error shape, tied to the response's request id header."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) - {"fields", "task_status"} == {"error", "detail", "request_id"}
    assert body["error"] == code
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "X-Process-Time" in response.headers
    return body


class Api:
    """An API process seen through HTTP: enqueue and read results."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=5.0)

    def post(self, n: int = 0) -> httpx.Response:
        body = {"to": f"user{n}@example.com", "subject": f"fault {n}", "body": "hello"}
        return self.client.post("/api/v1/email/received", json=body)

    def enqueue(self, count: int) -> list[str]:
        """POST ``count`` mails; every one must be accepted (202)."""
        ids = []
        for n in range(count):
            response = self.post(n)
            assert response.status_code == 202, response.text
            ids.append(response.json()["task_id"])
        return ids

    def result(self, task_id: str) -> dict[str, Any]:
        response = self.client.get("/api/v1/email/result", params={"task_id": task_id})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def results(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {task_id: self.result(task_id) for task_id in ids}

    def wait_terminal(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Poll until every task is success or failed; returns the final results."""
        done: dict[str, dict[str, Any]] = {}

        def settled() -> bool:
            for task_id in ids:
                if task_id not in done:
                    result = self.result(task_id)
                    if result["status"] not in TERMINAL:
                        return False
                    done[task_id] = result
            return True

        wait_until(settled, what=f"{len(ids)} tasks terminal", timeout=SETTLE_TIMEOUT)
        return done


LOCAL_PEER = ("127.0.0.1", 50000)


def local_client(app: FastAPI, **kwargs: Any) -> TestClient:
    """A ``TestClient`` that is a local caller, as zero-config sends and admin calls need:
    a loopback peer, and ``Host: localhost`` (TestClient's own peer "testclient" and Host
    "testserver" are neither). Use it as a context manager, so the lifespan runs."""
    kwargs.setdefault("client", LOCAL_PEER)
    return TestClient(app, base_url="http://localhost", **kwargs)


def outcomes(result: dict[str, Any]) -> list[str]:
    """The outcome of each attempt in a task's result, in order."""
    return [entry["outcome"] for entry in result["attempt_log"]]


def all_succeeded(results: dict[str, dict[str, Any]]) -> None:
    """Assert that every task of ``results`` (task id -> result) ended in success."""
    failed = {tid: r for tid, r in results.items() if r["status"] != "success"}
    assert not failed, failed


def peer(base: str, source: str = "127.0.0.1") -> httpx.Client:
    """A client of the API at ``base`` whose socket comes from ``source`` (any 127.x address
    is this machine, and a different peer to the API)."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=base, timeout=10, transport=transport)
