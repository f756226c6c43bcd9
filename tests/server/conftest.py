"""Fixtures shared by the API tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import MAX_BODY, local_client


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(max_body_bytes=MAX_BODY)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # As a context manager, so the lifespan opens (and closes) the Redis client.
    with local_client(create_app(settings)) as test_client:
        yield test_client
