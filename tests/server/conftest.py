"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from emailq.settings import Settings

MAX_BODY = 2048  # small, so 413 cases stay small


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(max_body_bytes=MAX_BODY)


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    """A direct view of Redis, to check what the API stored."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
