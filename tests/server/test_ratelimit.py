"""Rate limits, client addresses behind trusted proxies, and CORS, against a real Redis.

Attacks tried, and what they get:

* more sends than RATE_LIMIT_PER_KEY with one key: 429 with Retry-After and RateLimit-*,
  and nothing stored for the refused send; another key keeps its own budget.
* a batch as a way around the limit: each queued message counts; over it, the whole batch
  is 429 and nothing is queued.
* spreading requests over two API replicas: one budget, kept in the shared Redis.
* a forged X-Forwarded-For from an untrusted peer, to get a fresh budget per request or to
  dodge the auth-failure limit: ignored; the socket address counts.
* an X-Forwarded-For chain with a forged left part, sent through a trusted proxy: the
  right-most untrusted hop counts, the forged part does not.
* a forged Origin (an allowed one) with no key or a wrong key: 401, as without it.
* a preflight from an origin not in CORS_ORIGINS: no Access-Control-Allow-Origin.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from starlette.responses import PlainTextResponse

from emailq.devtools.redis_server import RedisServer
from emailq.netlists import parse_networks
from emailq.queue import Keys
from emailq.settings import Settings
from server.clientaddr import forwarded_client
from server.cors import ApiCorsMiddleware
from server.main import create_app
from server.ratelimit import check_form_rate
from tests.helpers.api import (
    ADMIN,
    ALICE,
    API_KEYS,
    BOB,
    assert_error,
    bearer,
    local_client,
    mail,
    task_keys,
)

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
RESULT = "/api/v1/email/result"
KEYS = Keys()
PROXY = ("10.0.0.1", 1234)  # a peer inside TRUSTED_PROXIES below


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(api_keys=API_KEYS, rate_limit_per_key="3/minute")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def send(client: TestClient, key: str | None = ALICE, **headers: str) -> httpx.Response:
    return client.post(SEND, json=mail(), headers={**(bearer(key) if key else {}), **headers})


def assert_limited(response: httpx.Response, limit: int, remaining: int = 0) -> None:
    assert_error(response, 429, "too_many_requests")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == str(remaining)
    assert 0 <= int(response.headers["RateLimit-Reset"]) <= 60


# -- per key -----------------------------------------------------------------------------


def test_over_the_limit_is_429_with_headers_and_stores_nothing(
    client: TestClient, store: redis.Redis
) -> None:
    for remaining in (2, 1, 0):
        response = send(client)
        assert response.status_code == 202, response.text
        assert response.headers["RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Remaining"] == str(remaining)
        assert 0 <= int(response.headers["RateLimit-Reset"]) <= 60
    assert_limited(send(client), 3)
    assert len(task_keys(store)) == 3  # the refused send stored nothing
    # Its keys live under the one hash-tagged prefix, like every other key.
    assert all(k.startswith(KEYS.rate_limit_prefix + ":") for k in store.scan_iter("*ratelim*"))
    assert send(client, BOB).status_code == 202  # another key, its own budget


def test_a_429_names_the_setting_its_window_and_whose_budget(client: TestClient) -> None:
    for _ in range(3):
        assert send(client).status_code == 202
    refused = send(client)
    detail = assert_error(refused, 429, "too_many_requests")["detail"]
    match = re.fullmatch(r"over RATE_LIMIT_PER_KEY \(3/minute\) for key 'alice'; retry in (\d+) s",
                         detail)  # fmt: skip
    assert match is not None, detail
    assert match.group(1) == refused.headers["Retry-After"]


def test_the_default_lets_a_notification_burst_through(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    # The old default (120/minute) refused the 121st mail of a burst: the queue exists to
    # absorb one, and MAX_STORED_BYTES_PER_KEY bounds what a key may hold.
    default = Settings.model_fields["rate_limit_per_key"].default  # make_settings sets its own
    with TestClient(
        create_app(make_settings(api_keys=API_KEYS, rate_limit_per_key=default))
    ) as client:
        for _ in range(2):
            batch = client.post(BATCH, json={"messages": [mail()] * 100}, headers=bearer(ALICE))
            assert batch.status_code == 202, batch.text
            assert "RateLimit-Limit" not in batch.headers
        assert send(client).status_code == 202
    assert len(task_keys(store)) == 201


def test_a_batch_counts_its_messages(client: TestClient, store: redis.Redis) -> None:
    two = client.post(BATCH, json={"messages": [mail(), mail()]}, headers=bearer(ALICE))
    assert two.status_code == 202, two.text
    assert two.headers["RateLimit-Remaining"] == "1"
    again = client.post(BATCH, json={"messages": [mail(), mail()]}, headers=bearer(ALICE))
    assert_limited(again, 3, remaining=1)  # one left, but this batch needs two
    assert len(task_keys(store)) == 2  # all or nothing: no part of the refused batch queued
    assert send(client).status_code == 202  # the one left
    huge = client.post(BATCH, json={"messages": [mail()] * 4}, headers=bearer(BOB))
    detail = assert_error(huge, 429, "too_many_requests")["detail"]
    assert detail.startswith("over RATE_LIMIT_PER_KEY (3/minute) for key 'bob': this request "
                             "counts 4 against a limit of 3")  # fmt: skip


def test_refused_requests_do_not_count(client: TestClient) -> None:
    for _ in range(5):
        assert_error(client.post(SEND, json={"to": "x"}, headers=bearer(ALICE)), 422,
                     "validation_error")  # fmt: skip
        assert_error(send(client, key="wrong"), 401, "unauthorized")
    assert send(client).headers["RateLimit-Remaining"] == "2"


def test_replicas_share_the_budget(settings: Settings) -> None:
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        assert send(one).status_code == 202
        assert send(two).status_code == 202
        assert send(one).status_code == 202
        assert_limited(send(two), 3)
        assert_limited(send(one), 3)


def test_without_keys_the_budget_is_per_address(make_settings: Callable[..., Settings]) -> None:
    # ALLOW_OPEN_RELAY: without it only loopback clients may send at all.
    app = create_app(make_settings(rate_limit_per_key="2/minute", allow_open_relay=True))
    with TestClient(app, client=("203.0.113.1", 1)) as first:
        assert send(first, key=None).status_code == 202
        assert send(first, key=None).status_code == 202
        limited = send(first, key=None)
        assert_limited(limited, 2)
        assert "for this address;" in limited.json()["detail"]  # no key to name
        # A forged X-Forwarded-For from an untrusted peer is no way to a fresh budget.
        assert_limited(send(first, key=None, **{"X-Forwarded-For": "198.51.100.7"}), 2)
    with TestClient(app, client=("203.0.113.2", 1)) as second:
        assert send(second, key=None).status_code == 202


def test_an_empty_limit_is_off(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_keys=API_KEYS, rate_limit_per_key="")
    with TestClient(create_app(settings)) as client:
        for _ in range(5):
            response = send(client)
            assert response.status_code == 202
            assert "RateLimit-Limit" not in response.headers


@pytest.mark.parametrize("value", ["lots", "3/fortnight", "-1/minute", "1/second; 9/hour"])
def test_a_malformed_limit_is_refused_at_startup(
    make_settings: Callable[..., Settings], value: str
) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        make_settings(rate_limit_per_key=value)


# -- per form address --------------------------------------------------------------------


def form_app(settings: Settings) -> FastAPI:
    """The app with a stand-in form endpoint, as the contact-form routes call the check."""
    app = create_app(settings)

    @app.post("/test-form/{form_id}")
    async def submit(form_id: str, request: Request, response: Response) -> dict[str, str]:
        await check_form_rate(request, form_id, response)
        return {"status": "ok"}

    return app


def test_form_submissions_are_limited_per_address_per_form(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(rate_limit_per_form_address="2/minute", trusted_proxies="10.0.0.0/8")
    app = form_app(settings)
    with TestClient(app, client=PROXY) as proxy:
        visitor = {"X-Forwarded-For": "198.51.100.1"}
        for _ in range(2):
            assert proxy.post("/test-form/contact", headers=visitor).status_code == 200
        limited = proxy.post("/test-form/contact", headers=visitor)
        assert_limited(limited, 2)
        assert limited.json()["detail"].startswith(
            "over RATE_LIMIT_PER_FORM_ADDRESS (2/minute) for form 'contact' from this address; "
            "retry in "
        )
        assert proxy.post("/test-form/other", headers=visitor).status_code == 200
        neighbour = {"X-Forwarded-For": "198.51.100.2"}
        ok = proxy.post("/test-form/contact", headers=neighbour)
        assert ok.status_code == 200
        assert ok.headers["RateLimit-Remaining"] == "1"


# -- client address ----------------------------------------------------------------------


def test_forwarded_for_counts_only_from_a_trusted_proxy(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(rate_limit_per_key="1/minute", trusted_proxies="10.0.0.0/8, ::1",
                             allow_open_relay=True)  # fmt: skip
    app = create_app(settings)
    with TestClient(app, client=PROXY) as proxy:
        # Through our proxy, each visitor is its own client.
        for visitor in ("198.51.100.1", "198.51.100.2"):
            assert send(proxy, key=None, **{"X-Forwarded-For": visitor}).status_code == 202
        assert_limited(send(proxy, key=None, **{"X-Forwarded-For": "198.51.100.1"}), 1)
        # A forged left part does not make a new client: the right-most untrusted hop counts.
        forged = {"X-Forwarded-For": "192.0.2.99, 198.51.100.1, 10.0.0.7"}
        assert_limited(send(proxy, key=None, **forged), 1)
    with TestClient(app, client=("203.0.113.5", 1)) as direct:
        assert send(direct, key=None, **{"X-Forwarded-For": "198.51.100.3"}).status_code == 202
        # The header was ignored: the socket address spent its budget, not 198.51.100.3.
        assert_limited(send(direct, key=None, **{"X-Forwarded-For": "198.51.100.4"}), 1)
    with TestClient(app, client=PROXY) as proxy:
        assert send(proxy, key=None, **{"X-Forwarded-For": "198.51.100.3"}).status_code == 202


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.1"], "198.51.100.1"),  # right-most untrusted
        ("10.0.0.1", ["198.51.100.1", "10.0.0.2"], "198.51.100.1"),  # several headers
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # all ours: the left-most
        ("10.0.0.1", [], "10.0.0.1"),  # no header: the proxy itself
        ("10.0.0.1", ["1.1.1.1, not-an-ip"], "unknown"),  # garbage: neither a key nor the proxy
        ("::ffff:10.0.0.1", ["2001:db8::1"], "2001:db8::1"),  # IPv4-mapped peer
    ],
)
def test_forwarded_client(peer: str, header: list[str], expected: str) -> None:
    assert forwarded_client(peer, header, parse_networks("10.0.0.0/8")) == expected


def test_malformed_trusted_proxies_are_refused(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        make_settings(trusted_proxies="10.0.0.0/8 proxy.internal")


def test_the_auth_failure_limit_uses_the_forwarded_address(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    settings = make_settings(api_keys=API_KEYS, auth_failure_limit=2, trusted_proxies="10.0.0.1")
    app = create_app(settings)
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    with TestClient(app, client=PROXY) as proxy:
        for _ in range(2):
            assert_error(send(proxy, key="guess", **attacker), 401, "unauthorized")
        assert_error(send(proxy, key="guess", **attacker), 429, "too_many_requests")
        assert store.exists(KEYS.auth_failures("198.51.100.66"))
        assert not store.exists(KEYS.auth_failures("10.0.0.1"))
        # Others behind the same proxy are not locked out by the attacker.
        other = {"X-Forwarded-For": "198.51.100.67"}
        assert_error(send(proxy, key="guess", **other), 401, "unauthorized")
    with TestClient(app, client=("198.51.100.66", 1)) as untrusted:
        # Claiming to be someone else from an untrusted peer changes nothing.
        spoof = {"X-Forwarded-For": "198.51.100.99"}
        assert_error(send(untrusted, key="guess", **spoof), 429, "too_many_requests")


def test_admin_loopback_check_sees_through_a_trusted_proxy(
    make_settings: Callable[..., Settings],
) -> None:
    # A reverse proxy on the same machine must not make every visitor "local".
    app = create_app(make_settings(trusted_proxies="127.0.0.1"))
    with local_client(app) as proxy:
        remote = proxy.get("/api/v1/admin/stats", headers={"X-Forwarded-For": "198.51.100.1"})
        assert_error(remote, 403, "forbidden")
        assert proxy.get("/api/v1/admin/stats").status_code == 200


# -- CORS --------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"


@pytest.fixture
def cors_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(api_keys=API_KEYS, cors_origins=f"{ORIGIN}, https://b.example.com")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def preflight(client: TestClient, origin: str, path: str = SEND) -> httpx.Response:
    return client.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })  # fmt: skip


def test_preflight_from_an_allowed_origin(cors_client: TestClient) -> None:
    response = preflight(cors_client, ORIGIN)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed
    assert "content-type" in allowed
    assert "Access-Control-Allow-Credentials" not in response.headers
    sent = send(cors_client, **{"Origin": ORIGIN})
    assert sent.status_code == 202
    assert sent.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "RateLimit-Remaining" in sent.headers["Access-Control-Expose-Headers"]


def refused_preflight(response: httpx.Response) -> dict[str, Any]:
    """The one error shape, as CORS answers it before the request layer: its id made there,
    so no X-Process-Time (assert_error's other check)."""
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail", "request_id"}
    assert body["error"] == "cors_refused"
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def test_a_disallowed_origin_gets_no_cors_headers(cors_client: TestClient) -> None:
    for origin in ("https://evil.example", "https://app.example.com.evil.example", "null"):
        response = preflight(cors_client, origin)
        assert "Access-Control-Allow-Origin" not in response.headers
        error = refused_preflight(response)
        expected = f"CORS preflight refused: origin {origin!r} is not in CORS_ORIGINS"
        assert error["detail"] == expected
        sent = send(cors_client, **{"Origin": origin})
        assert "Access-Control-Allow-Origin" not in sent.headers


def test_a_preflight_for_a_method_or_header_not_allowed_says_which(
    cors_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE",
             "Access-Control-Request-Headers": "x-evil"}  # fmt: skip
    error = refused_preflight(cors_client.options(SEND, headers=asked))
    assert error["detail"] == (
        "CORS preflight refused: method 'DELETE' is not one of GET, POST; header 'x-evil' is "
        "not one of accept, accept-language, authorization, content-language, content-type, "
        "idempotency-key, x-request-id"
    )
    # An empty header name (a trailing comma, an empty list) is refused, and said so.
    for listed in ("authorization,", "", " , "):
        odd = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": listed}  # fmt: skip
        said = refused_preflight(cors_client.options(SEND, headers=odd))["detail"]
        assert said.startswith("CORS preflight refused: header '' is not one of accept, ")
    # Counted by its code, and told in the log with the request id it answered.
    metrics = cors_client.get("/metrics", headers=bearer(ADMIN)).text
    assert 'emailq_rejections_total{error="cors_refused"} 4.0' in metrics
    assert f"request_id': '{error['request_id']}'" in str(
        [r.__dict__ for r in caplog.records if r.getMessage() == error["detail"]]
    )


def test_without_cors_origins_there_are_no_cors_headers(client: TestClient) -> None:
    assert "Access-Control-Allow-Origin" not in preflight(client, ORIGIN).headers
    assert "Access-Control-Allow-Origin" not in send(client, **{"Origin": ORIGIN}).headers


def test_contact_form_paths_are_left_to_their_own_cors() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("inner")(scope, receive, send)

    app = ApiCorsMiddleware(inner, origins=[ORIGIN], prefix="/api/v1", exclude=["/api/v1/forms/"])
    client = TestClient(app)  # not as a context manager: the stand-in has no lifespan
    assert preflight(client, ORIGIN).headers["Access-Control-Allow-Origin"] == ORIGIN
    for path in ("/api/v1/forms/contact", "/health"):
        response = preflight(client, ORIGIN, path=path)
        assert response.text == "inner"  # passed through, for the form's own CORS
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("headers", [{}, bearer("guess"), {"Authorization": "Origin"}])
def test_a_forged_origin_is_no_credential(
    cors_client: TestClient, store: redis.Redis, headers: dict[str, str]
) -> None:
    forged: dict[str, Any] = {**headers, "Origin": ORIGIN, "Referer": ORIGIN + "/"}
    response = cors_client.post(SEND, json=mail(), headers=forged)
    assert_error(response, 401, "unauthorized")
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN  # readable, still refused
    assert_error(cors_client.get("/api/v1/admin/stats", headers=forged), 401, "unauthorized")
    assert task_keys(store) == []


@pytest.mark.parametrize("value", ["https://app.example.com/path", "app.example.com"])
def test_malformed_cors_origins_are_refused(
    make_settings: Callable[..., Settings], value: str
) -> None:
    with pytest.raises(ValueError, match="CORS_ORIGINS"):
        make_settings(cors_origins=value)


# -- Redis down --------------------------------------------------------------------------


def test_redis_down_during_a_limit_check_is_503(
    make_settings: Callable[..., Settings], redis_factory: Callable[..., RedisServer]
) -> None:
    server = redis_factory()
    settings = make_settings(redis_url=server.url, api_keys=API_KEYS, trusted_proxies="10.0.0.1",
                             rate_limit_per_key="3/minute")  # fmt: skip
    with TestClient(form_app(settings), client=PROXY) as client:
        assert send(client).status_code == 202
        server.stop()
        for response in (send(client), client.post("/test-form/contact")):
            assert_error(response, 503, "service_unavailable")
            assert response.headers["Retry-After"] == "1"
