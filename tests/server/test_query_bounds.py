"""Integer and number query parameters of the admin and result routes: out of range is 422
in the one error shape, never a 500 from Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import assert_error, local_client

FAILED = "/api/v1/admin/failed"
RESULT = "/api/v1/email/result"
INT64_MAX = 2**63 - 1


@pytest.fixture
def operator(settings: Settings) -> Iterator[TestClient]:
    # Loopback: the admin endpoints answer it while API_KEYS is unset.
    with local_client(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "query",
    [f"offset={INT64_MAX}", "offset=99999999999999999999999", "offset=1000000001", "offset=-1",
     f"limit={INT64_MAX}", "limit=0", "limit=501", f"offset={INT64_MAX}&limit=500"],
)  # fmt: skip
def test_out_of_range_paging_is_422(operator: TestClient, query: str) -> None:
    body = assert_error(operator.get(f"{FAILED}?{query}"), 422, "validation_error")
    assert body["fields"][0]["loc"][0] == "query"


def test_the_largest_offset_allowed_answers_an_empty_page(operator: TestClient) -> None:
    response = operator.get(FAILED, params={"offset": 1_000_000_000, "limit": 500})
    assert response.status_code == 200, response.text
    assert response.json() == {"tasks": [], "offset": 1_000_000_000, "limit": 500}


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "-1", "31", "1e309", f"{INT64_MAX}"])
def test_out_of_range_wait_is_422(operator: TestClient, wait: str) -> None:
    response = operator.get(RESULT, params={"task_id": str(uuid.uuid4()), "wait": wait})
    assert_error(response, 422, "validation_error")
