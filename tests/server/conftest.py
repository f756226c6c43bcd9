"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app

MAX_BODY = 2048  # small, so 413 cases stay small
LOCAL_PEER = ("127.0.0.1", 50000)


def local_client(app: FastAPI, **kwargs: Any) -> TestClient:
    """A ``TestClient`` that is a local caller, as zero-config sends and admin calls need:
    a loopback peer, and ``Host: localhost`` (TestClient's own peer "testclient" and Host
    "testserver" are neither). Use it as a context manager, so the lifespan runs."""
    kwargs.setdefault("client", LOCAL_PEER)
    return TestClient(app, base_url="http://localhost", **kwargs)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(max_body_bytes=MAX_BODY)


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    """A direct view of Redis, to check what the API stored."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # As a context manager, so the lifespan opens (and closes) the Redis client.
    with local_client(create_app(settings)) as test_client:
        yield test_client


def mail(**fields: Any) -> dict[str, Any]:
    """A valid send request, with ``fields`` overriding the defaults."""
    return {"to": "user@example.com", "subject": "Hello", "body": "Hi {username}", **fields}
