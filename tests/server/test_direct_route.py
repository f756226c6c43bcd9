"""The send and batch routes' direct path (server/direct.py) answers every request exactly
as FastAPI's own handler does, and serves the ordinary ones itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from fastapi import Request, Response

from emailq.settings import Settings
from server.direct import DirectRoute
from server.lane import DirectLane
from server.main import create_app
from server.routes import batch, email
from tests.helpers.api import ALICE, API_KEYS, MAX_BODY, bearer, local_client, mail

Headers = dict[str, str | bytes]  # bytes: a value httpx would not encode (not ASCII)

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
JSON: Headers = {"Content-Type": "application/json"}
ORDINARY = json.dumps(mail()).encode()

# name: (headers, body). The ordinary ones first; the direct path takes only those.
DIRECT: dict[str, tuple[Headers, bytes]] = {
    "ordinary": (JSON, ORDINARY),
    "with an idempotency key": ({**JSON, "Idempotency-Key": "order-1"}, ORDINARY),
    "charset given": ({"Content-Type": "application/json; charset=utf-8"}, ORDINARY),
    "media type in capitals": ({"Content-Type": "Application/JSON"}, ORDINARY),
}
TO_FASTAPI: dict[str, tuple[Headers, bytes]] = {
    "vendor +json type": ({"Content-Type": "application/vnd.emailq+json"}, ORDINARY),
    "no content type": ({}, ORDINARY),
    "text/plain": ({"Content-Type": "text/plain"}, ORDINARY),
    "empty body": (JSON, b""),
    "invalid JSON": (JSON, b'{"to": '),
    "byte-order mark": (JSON, b"\xef\xbb\xbf" + ORDINARY),
    "UTF-16": (JSON, json.dumps(mail()).encode("utf-16")),
    "not UTF-8": (JSON, b'{"to": "user@example.com", "subject": "\xff", "body": "x"}'),
    "deeply nested": (JSON, b"[" * 5_000 + b"]" * 5_000),
    "an array": (JSON, b"[]"),
    "an unknown field": (JSON, json.dumps(mail(colour="red")).encode()),
    "a bad address": (JSON, json.dumps(mail(to="not an address")).encode()),
    "an empty idempotency key": ({**JSON, "Idempotency-Key": ""}, ORDINARY),
    "a long idempotency key": ({**JSON, "Idempotency-Key": "k" * 257}, ORDINARY),
    "a non-ASCII idempotency key": ({**JSON, "Idempotency-Key": b"caf\xe9"}, ORDINARY),
}
# Over the request-size limit: refused (413) by the first read, on either path.
TOO_LARGE: dict[str, tuple[Headers, bytes]] = {"too large": (JSON, b"[" * 100_000)}
# Bodies that reach the endpoint and are refused there: the same function on both paths.
REFUSED_BY_THE_ENDPOINT: dict[str, tuple[Headers, bytes]] = {
    "a line break in the subject": (JSON, json.dumps(mail(subject="a\nb")).encode()),
    "too many recipients": (
        JSON,
        json.dumps(
            mail(
                cc=[f"c{n}@example.com" for n in range(50)],
                bcc=[f"b{n}@example.com" for n in range(50)],
            )
        ).encode(),
    ),
}
BATCHES: dict[str, tuple[Headers, bytes]] = {
    "ordinary batch": (JSON, json.dumps({"messages": [mail(), mail(to="b@example.com")]}).encode()),
    "one bad message": (JSON, json.dumps({"messages": [mail(), {"to": "x"}]}).encode()),
    "no good message": (JSON, json.dumps({"messages": [{"to": "x"}, 7]}).encode()),
    "a 5,000-digit number": (JSON, b'{"messages": [' + b"9" * 5000 + b"]}"),
    "an empty batch": (JSON, b'{"messages": []}'),
    "not a list": (JSON, b'{"messages": {}}'),
    "batch, deeply nested": (JSON, b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}"),
    "batch, no content type": ({}, json.dumps({"messages": [mail()]}).encode()),
    "batch, a long idempotency key": (
        {**JSON, "Idempotency-Key": "k" * 257},
        json.dumps({"messages": [mail()]}).encode(),
    ),
}
VOLATILE_HEADERS = {"x-request-id", "x-process-time", "date", "ratelimit-reset"}


def _route_class(router: Any, endpoint: Any) -> type[DirectRoute]:
    (route,) = [r for r in router.routes if getattr(r, "endpoint", None) is endpoint]
    assert isinstance(route, DirectRoute)
    return type(route)


def _send_route_class() -> type[DirectRoute]:
    return _route_class(email.router, email.receive_email)


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether the direct path resolved each request (True) or left it to FastAPI."""
    route_class = _send_route_class()
    direct = route_class.resolve
    seen: list[bool] = []

    async def noting(request: Request, response: Response) -> dict[str, Any] | None:
        arguments = await direct(request, response)
        seen.append(arguments is not None)
        return arguments

    monkeypatch.setattr(route_class, "resolve", staticmethod(noting))
    return seen


def _fastapi_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the send and batch routes leave every request to FastAPI's own handler; returns
    the paths of the requests they left to it."""
    left: list[str] = []

    async def never(request: Request, response: Response) -> None:
        left.append(request.url.path)

    for route_class in (_send_route_class(), _route_class(batch.router, batch.send_batch)):
        monkeypatch.setattr(route_class, "resolve", staticmethod(never))
    return left


def _answer(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    body = response.json() if response.content else None
    if isinstance(body, dict):  # ids differ from request to request
        body = {k: v for k, v in body.items() if k not in ("request_id", "task_id")}
        for entry in body.get("results", []):
            entry.pop("task_id", None)
    headers = {k: v for k, v in response.headers.items() if k not in VOLATILE_HEADERS}
    return response.status_code, body, headers


# The paths a request can be served by: the ASGI lane (server/lane.py) as the app is built,
# the DirectRoute's own handler with the lane stepped over, and FastAPI's own handler.
PATHS = ("lane", "route", "fastapi")


def _past_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    async def through(self: DirectLane, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    monkeypatch.setattr(DirectLane, "__call__", through)


# name: (method, path, headers, body); a body of several parts is sent chunked.
Requests = dict[str, tuple[str, str, Headers, bytes | list[bytes]]]


def _by_each_path(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    store: redis.Redis,
    requests: Requests,
    fresh: bool = True,
) -> dict[str, list[Any]]:
    """Each request's answer by each of PATHS, in that order, from the same empty store each
    time (``fresh``), or each path's requests one after another from an empty store."""
    answers: dict[str, list[Any]] = {name: [] for name in requests}
    for served_by in PATHS:
        # FastAPI builds a route's handler at the app's first request to it, not when the
        # app is made: the patch must last while the app serves.
        with monkeypatch.context() as patched, local_client(create_app(settings)) as client:
            if served_by == "route":
                _past_the_lane(patched)
            left = _fastapi_only(patched) if served_by == "fastapi" else []
            store.flushdb()
            for name, (method, path, headers, body) in requests.items():
                if fresh:
                    store.flushdb()
                content = iter(body) if isinstance(body, list) else body
                sent = client.request(method, path, content=content, headers=headers,
                                      follow_redirects=False)  # fmt: skip
                answers[name].append(_answer(sent))
            # FastAPI served every request for the two routes, and the resolver was asked
            # once each (not again by the route after the lane declined it).
            routed = [path for method, path, _, _ in requests.values()
                      if method == "POST" and path.split("?")[0] in (SEND, BATCH)]  # fmt: skip
            assert len(left) == (len(routed) if served_by == "fastapi" else 0)
    return answers


def _both(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    store: redis.Redis,
    cases: dict[str, tuple[Headers, bytes]],
    extra_headers: Headers | None = None,
    path: str = SEND,
    fresh: bool = True,
) -> dict[str, list[Any]]:
    """``_by_each_path`` for POSTs of ``cases`` to ``path``."""
    requests: Requests = {name: ("POST", path, {**headers, **(extra_headers or {})}, body)
                          for name, (headers, body) in cases.items()}  # fmt: skip
    return _by_each_path(settings, monkeypatch, store, requests, fresh)


def _same(answers: list[Any]) -> bool:
    return all(answer == answers[0] for answer in answers)


def test_every_request_answers_as_fastapis_own_handler_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    cases = DIRECT | TO_FASTAPI | TOO_LARGE | REFUSED_BY_THE_ENDPOINT
    for name, answers in _both(settings, monkeypatch, store, cases).items():
        assert _same(answers), name
    assert _both(settings, monkeypatch, store, DIRECT)["ordinary"][0][0] == 202


def test_every_batch_answers_as_fastapis_own_handler_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    answers = _both(settings, monkeypatch, store, BATCHES, path=BATCH)
    for name, each in answers.items():
        assert _same(each), name
    assert answers["ordinary batch"][0][0] == 202
    assert answers["one bad message"][0][1]["rejected"] == 1


def test_only_ordinary_requests_take_the_direct_path(
    settings: Settings, resolved: list[bool]
) -> None:
    with local_client(create_app(settings)) as client:
        for name, (headers, body) in (DIRECT | TO_FASTAPI).items():
            resolved.clear()
            client.post(SEND, content=body, headers=headers)
            assert resolved == [name in DIRECT], name
        resolved.clear()
        headers, body = TOO_LARGE["too large"]
        assert client.post(SEND, content=body, headers=headers).status_code == 413
        assert resolved == []  # the read that would pass the limit raised, as before


def test_a_refused_key_answers_the_same_on_both_paths(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    settings = make_settings(api_keys=API_KEYS)
    for key in ("", "eq_not-a-key-0123456789", ALICE):
        authorization: Headers = {**bearer(key)} if key else {}
        answers = _both(settings, monkeypatch, store, DIRECT | TO_FASTAPI, authorization)
        for name, each in answers.items():
            assert _same(each), (key, name)
        assert answers["ordinary"][0][0] == (202 if key == ALICE else 401)


def test_the_headers_a_send_sets_are_the_same_on_both_paths(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    settings = make_settings(max_body_bytes=MAX_BODY, rate_limit_per_key="100/minute")
    keyed: Headers = {**JSON, "Idempotency-Key": "order-1"}
    batch_body = json.dumps({"messages": [mail()]}).encode()
    answers = _both(settings, monkeypatch, store, {"first": (keyed, ORDINARY),
                    "replay": (keyed, ORDINARY)}, fresh=False)  # fmt: skip
    answers |= _both(settings, monkeypatch, store, {"batch": (keyed, batch_body),
                     "batch replay": (keyed, batch_body)}, path=BATCH, fresh=False)  # fmt: skip
    for name, each in answers.items():
        assert _same(each), name
        direct = each[0]
        if name != "batch replay":  # a batch's replay is not counted again
            assert direct[2]["ratelimit-limit"] == "100", name  # set by the endpoint
    assert answers["replay"][0][2]["idempotent-replayed"] == "true"
    assert answers["batch replay"][0][2]["idempotent-replayed"] == "true"


def _chunks(body: bytes, size: int = 7) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


# Requests for the two paths that are not plain POSTs of a body: each path must answer them
# alike (the lane passes all but the POSTs on; a chunked body reaches it in parts).
ODD: Requests = {
    "chunked": ("POST", SEND, JSON, _chunks(ORDINARY)),
    "chunked, too large": ("POST", SEND, JSON, _chunks(b"[" * 100_000, 4096)),
    "chunked, invalid": ("POST", SEND, JSON, _chunks(b'{"to": ')),
    "chunked batch": ("POST", BATCH, JSON, _chunks(json.dumps({"messages": [mail()]}).encode())),
    "a query string": ("POST", SEND + "?wait=10&x=%ff", JSON, ORDINARY),
    "a trailing slash": ("POST", SEND + "/", JSON, ORDINARY),
    "a spoofed X-Forwarded-For": ("POST", SEND, {**JSON, "X-Forwarded-For": "8.8.8.8"}, ORDINARY),
    "a foreign Host": ("POST", SEND, {**JSON, "Host": "evil.example"}, ORDINARY),
    "HEAD": ("HEAD", SEND, JSON, b""),
    "GET": ("GET", SEND, JSON, b""),
    "OPTIONS": ("OPTIONS", SEND, JSON, b""),
    "PUT": ("PUT", SEND, JSON, ORDINARY),
    "DELETE on the batch": ("DELETE", BATCH, JSON, b""),
    "an invented method": ("BREW", SEND, JSON, ORDINARY),
}


def test_odd_requests_answer_the_same_on_every_path(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    answers = _by_each_path(settings, monkeypatch, store, ODD)
    for name, each in answers.items():
        assert _same(each), name
    assert answers["chunked"][0][0] == 202
    assert answers["chunked, too large"][0][0] == 413
    assert answers["a query string"][0][0] == 202
    assert answers["a spoofed X-Forwarded-For"][0][0] == 403  # a proxy not in TRUSTED_PROXIES
    assert answers["a foreign Host"][0][0] == 403
    assert answers["GET"][0][0] == 405


def test_idempotency_conflicts_answer_the_same_on_every_path(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    keyed: Headers = {**JSON, "Idempotency-Key": "order-1"}
    other = json.dumps(mail(subject="another")).encode()
    answers = _by_each_path(settings, monkeypatch, store, {
        "first": ("POST", SEND, keyed, ORDINARY),
        "replay": ("POST", SEND, keyed, ORDINARY),
        "conflict": ("POST", SEND, keyed, other),
        "the key on a batch": ("POST", BATCH, keyed, json.dumps({"messages": [mail()]}).encode()),
    }, fresh=False)  # fmt: skip
    for name, each in answers.items():
        assert _same(each), name
    assert [answers[name][0][0] for name in ("first", "replay", "conflict")] == [202, 202, 409]


def test_a_refusal_after_the_store_answers_as_the_app_does(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, store: redis.Redis
) -> None:
    # Redis refuses writes (as when it is out of memory): raised after the request was
    # counted, answered by the app's registered handler on each path.
    store.config_set("maxmemory", 1)
    store.config_set("maxmemory-policy", "noeviction")
    try:
        answers = _both(settings, monkeypatch, store, {"ordinary": DIRECT["ordinary"]})
    finally:
        store.config_set("maxmemory", 0)
    (each,) = answers.values()
    # The detail names the bytes Redis uses now, which the requests before it change.
    assert _same([(status, body["error"], headers) for status, body, headers in each])
    assert each[0][0] == 507


def test_the_lane_serves_ordinary_requests_before_routing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings)
    routed: list[str] = []
    router_call = type(app.router).__call__

    async def noting(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            routed.append(scope["path"])
        await router_call(self, scope, receive, send)

    monkeypatch.setattr(type(app.router), "__call__", noting)
    with local_client(app) as client:
        for headers, body in DIRECT.values():
            assert client.post(SEND, content=body, headers=headers).status_code == 202
        assert (
            client.post(BATCH, content=BATCHES["ordinary batch"][1], headers=JSON).status_code
            == 202
        )
        assert routed == []
        client.post(SEND, content=b"[]", headers=JSON)
        assert routed == [SEND]  # declined: routed as before


def test_the_metrics_name_a_send_by_its_route_on_every_path(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = []
    for past_the_lane in (False, True):
        with monkeypatch.context() as patched, local_client(create_app(settings)) as client:
            if past_the_lane:
                _past_the_lane(patched)
            client.post(SEND, content=ORDINARY, headers=JSON)
            client.post(SEND, content=b"[]", headers=JSON)
            lines = client.get("/metrics").text.splitlines()
            texts.append([line for line in lines if line.startswith("emailq_http_requests")
                          and SEND in line])  # fmt: skip
    assert texts[0] == texts[1]
    assert len(texts[0]) == 2  # the 202 and the 422, under the route's template
