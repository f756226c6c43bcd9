"""The API's /metrics in-process (real Redis): who may read it, what its labels may hold,
what each way of sending counts, and an answer while Redis is down.

Tried as an attacker would: reading it from another machine without keys; with a send key;
with a wrong or no token; using the metrics token on the admin and send endpoints; a raw
path with a task id and an invented HTTP method, each of which would otherwise make a
series of its own per request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import ValidationError

from emailq.errors import ConfigError
from emailq.settings import Settings
from emailq.startup import load_settings
from server.main import create_app
from server.metrics import route_template
from tests.helpers.api import ADMIN, ALICE, API_KEYS, assert_error, bearer, local_client, mail
from tests.helpers.forms import FORM, FORMS_TOML, SITE, VISITOR
from tests.helpers.metrics import Samples, family, parse
from tests.helpers.ports import refused_redis_url

TOKEN = "m" * 40  # a test token, not a credential
SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
REMOTE = ("203.0.113.9", 40000)


def metrics(client: TestClient, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def accepted(samples: Samples) -> dict[str, float]:
    found = family(samples, "emailq_mails_accepted_total")
    return {key.split('"')[1]: value for key, value in found.items()}


# -- who may read it ------------------------------------------------------------------------


def test_without_keys_only_local_requests_read_it_and_nothing_is_stored(
    settings: Settings, store: redis.Redis
) -> None:
    app = create_app(settings)
    with local_client(app) as client:
        assert metrics(client)["emailq_redis_up"] == 1
    before = sorted(store.keys())
    with TestClient(app, base_url="http://localhost", client=REMOTE) as remote:
        assert_error(remote.get("/metrics"), 403, "forbidden")
        # A token means nothing while METRICS_TOKEN is unset.
        assert_error(remote.get("/metrics", headers=bearer(TOKEN)), 403, "forbidden")
    with TestClient(app, base_url="http://evil.example", client=("127.0.0.1", 5000)) as rebound:
        assert_error(rebound.get("/metrics"), 403, "forbidden")  # a DNS-rebinding page
    assert sorted(store.keys()) == before


def test_with_keys_an_admin_key_or_the_metrics_token_reads_it(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(api_keys=API_KEYS, metrics_token=TOKEN))
    with TestClient(app, base_url="http://localhost", client=REMOTE) as client:
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert_error(client.get("/metrics", headers=bearer("m" * 39)), 401, "unauthorized")
        assert_error(client.get("/metrics", headers=bearer(ALICE)), 403, "forbidden")
        assert metrics(client, **bearer(ADMIN))["emailq_redis_up"] == 1
        assert metrics(client, **bearer(TOKEN))["emailq_redis_up"] == 1
        # The token opens /metrics and nothing else.
        assert_error(client.get("/api/v1/admin/stats", headers=bearer(TOKEN)), 401,
                     "unauthorized")  # fmt: skip
        assert_error(client.post(SEND, json=mail(), headers=bearer(TOKEN)), 401, "unauthorized")
        # A scheme other than Bearer is not the token.
        assert_error(client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}), 401,
                     "unauthorized")  # fmt: skip


@pytest.mark.parametrize("token", ["short", "x" * 31, "with space " + "y" * 30, "z" * 31 + "\n"])
def test_a_weak_or_unprintable_metrics_token_is_refused(token: str) -> None:
    with pytest.raises(ValidationError, match="METRICS_TOKEN"):
        Settings(_env_file=None, metrics_token=token)  # type: ignore[call-arg]


def test_a_refused_metrics_token_is_not_echoed_in_the_error() -> None:
    weak = "hunter2-but-longer"  # a test value, not a credential
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, metrics_token=weak)
    assert "METRICS_TOKEN" in str(refused.value)
    assert weak not in str(refused.value)


def test_an_empty_metrics_token_is_unset() -> None:
    assert Settings(_env_file=None, metrics_token="").metrics_token is None  # type: ignore[call-arg]


# -- labels ----------------------------------------------------------------------------------


def test_labels_hold_route_templates_and_known_methods_never_request_text(
    client: TestClient,
) -> None:
    task_id = str(uuid.uuid4())
    assert client.get("/api/v1/email/result", params={"task_id": task_id}).status_code == 404
    assert client.post(f"/api/v1/admin/tasks/{task_id}/cancel").status_code == 404
    assert client.request("BREW", "/health").status_code == 405
    assert client.get(f"/{task_id}").status_code == 404
    text = client.get("/metrics").text
    samples = parse(text)
    assert task_id not in text
    assert "BREW" not in text
    count = "emailq_http_requests_total"
    assert samples[f'{count}{{method="POST",route="/api/v1/admin/tasks/{{task_id}}/cancel",'
                   'status="404"}'] == 1  # fmt: skip
    assert samples[f'{count}{{method="GET",route="/api/v1/email/result",status="404"}}'] == 1
    assert samples[f'{count}{{method="other",route="/health",status="405"}}'] == 1
    assert samples[f'{count}{{method="GET",route="unmatched",status="404"}}'] == 1
    assert family(samples, "emailq_rejections_total") == {
        'emailq_rejections_total{error="not_found"}': 3,
        'emailq_rejections_total{error="method_not_allowed"}': 1,
    }


def test_a_route_template_puts_back_the_prefix_of_the_router_it_was_included_with() -> None:
    # An included router's route knows only its own path; the prefix comes from the request.
    async def endpoint(task_id: str) -> None:
        return None

    route = APIRoute("/tasks/{task_id}/cancel", endpoint)
    assert route_template(route, "/api/v1/tasks/abc/cancel") == "/api/v1/tasks/{task_id}/cancel"
    assert route_template(route, "/tasks/abc/cancel") == "/tasks/{task_id}/cancel"
    assert route_template(None, "/anything") == "unmatched"


@pytest.fixture
def app_routes(settings: Settings) -> FastAPI:
    app = create_app(settings)

    async def boom(n: int) -> None:
        raise RuntimeError(f"bug {n}")

    app.add_api_route("/boom/{n}", boom)
    return app


def test_an_error_that_escapes_the_app_is_counted_as_500_internal_error(
    app_routes: FastAPI,
) -> None:
    with local_client(app_routes, raise_server_exceptions=False) as client:
        answer = client.get("/boom/1")
        assert (answer.status_code, answer.json()["error"]) == (500, "internal_error")
        samples = metrics(client)
    assert samples['emailq_http_requests_total{method="GET",route="/boom/{n}",status="500"}'] == 1
    assert samples['emailq_rejections_total{error="internal_error"}'] == 1


# -- what each way of sending counts -----------------------------------------------------------


def test_single_sends_count_once_by_lane_and_replays_not_at_all(client: TestClient) -> None:
    assert accepted(metrics(client)) == {"high": 0, "default": 0, "low": 0}
    once = {"Idempotency-Key": "order-1"}
    assert client.post(SEND, json=mail(priority="low"), headers=once).status_code == 202
    replay = client.post(SEND, json=mail(priority="low"), headers=once)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert client.post(SEND, json=mail(priority="high")).status_code == 202
    assert client.post(SEND, json=mail(to="nobody")).status_code == 422
    samples = metrics(client)
    assert accepted(samples) == {"high": 1, "default": 0, "low": 1}
    assert samples['emailq_rejections_total{error="validation_error"}'] == 1


def test_a_batch_counts_its_stored_messages_and_a_repeated_batch_nothing(
    client: TestClient,
) -> None:
    body = {"messages": [mail(), mail(priority="high"), mail(to="nobody"), mail()]}
    once = {"Idempotency-Key": "batch-1"}
    assert client.post(BATCH, json=body, headers=once).json()["queued"] == 3
    assert client.post(BATCH, json=body, headers=once).headers["Idempotent-Replayed"] == "true"
    assert accepted(metrics(client)) == {"high": 1, "default": 2, "low": 0}


def test_a_contact_form_counts_a_submission_once_and_not_its_duplicate(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "forms.toml"
    path.write_text(FORMS_TOML)
    app = create_app(make_settings(forms_file=path))
    headers = {"Origin": SITE, "Accept": "application/json"}
    with local_client(app) as client:
        for _ in range(2):  # the second is the same submission: not stored again
            assert client.post(FORM, data=VISITOR, headers=headers).status_code == 202
        assert accepted(metrics(client)) == {"high": 0, "default": 1, "low": 0}


# -- Redis down ------------------------------------------------------------------------------


def test_with_redis_down_it_still_answers_and_says_so(
    make_settings: Callable[..., Settings],
) -> None:
    with refused_redis_url() as url, local_client(create_app(make_settings(redis_url=url))) as c:
        assert c.post(SEND, json=mail()).status_code == 503
        samples = metrics(c)
    assert samples["emailq_redis_up"] == 0
    assert family(samples, "emailq_queue_depth") == {}
    assert samples['emailq_rejections_total{error="service_unavailable"}'] == 1
