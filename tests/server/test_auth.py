"""API keys, recipient limits, task privacy and the auth-failure limit, against a real Redis.

Tried as an attacker would, and what each attempt got:

* no ``Authorization`` header; ``Bearer`` with an empty, wrong, truncated or extended key;
  the right key under ``Basic`` or with no scheme; the configured SHA-256 *hash* sent as the
  key (someone who read ``.env``): 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``,
  and nothing stored in Redis.
* a domain-limited send key mailing another domain in To, in Cc only, in Bcc only, with an
  upper-case domain, and with a subdomain of the allowed one: 403 ``forbidden``, nothing
  stored; in a batch, that message alone is rejected (403 if none is left).
* a look-alike of a listed domain (``example.com`` with a Cyrillic a): 403; the same
  international domain in Unicode or IDNA form, in the list or the request: one domain.
* a send key calling each admin endpoint: 403; from a loopback address: still 401/403
  (loopback earns nothing once keys are configured).
* a send key reading another key's task, with and without ``wait=``: 404, answered at once,
  the same as an unknown id; the creator and an admin key read it.
* 21 wrong keys in a minute from one address: the 21st and later get 429 with
  ``Retry-After``; another address still gets 401, and a valid key still works (a shared
  proxy address must not let one attacker lock everyone out).
* the raw key in the logs: never, on failure or success (only the key id is logged).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from emailq.apikeys import ApiKey, hash_key, parse_api_keys
from emailq.cli import main as cli
from emailq.queue import Keys
from emailq.settings import Settings
from server.deps import state_of
from server.main import create_app
from server.routes.email import MAX_WAIT_SECONDS
from tests.helpers.api import (
    ADMIN,
    ALICE,
    API_KEYS,
    BOB,
    LIMITED,
    assert_error,
    bearer,
    local_client,
    mail,
    task_keys,
)

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
BATCH = "/api/v1/emails/batch"
KEYS = Keys()


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(api_keys=API_KEYS, auth_failure_limit=20)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def send(client: TestClient, key: str, **fields: Any) -> httpx.Response:
    return client.post(SEND, json=mail(**fields), headers=bearer(key))


# -- keys --------------------------------------------------------------------------------

WRONG = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer nope"},
    {"Authorization": f"Bearer {ALICE[:-1]}"},
    {"Authorization": f"Bearer {ALICE}x"},
    {"Authorization": f"Basic {ALICE}"},
    {"Authorization": ALICE},
    {"Authorization": f"Bearer {hash_key(ALICE)}"},  # the configured hash is not the key
]


@pytest.mark.parametrize("headers", WRONG)
def test_missing_or_wrong_key_is_401_and_stores_nothing(
    client: TestClient, store: redis.Redis, headers: dict[str, str]
) -> None:
    for path, body in ((SEND, mail()), (BATCH, {"messages": [mail()]})):
        response = client.post(path, json=body, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    result = client.get(RESULT, params={"task_id": str(uuid.uuid4())}, headers=headers)
    assert_error(result, 401, "unauthorized")
    assert task_keys(store) == []


def test_the_right_key_is_accepted_and_its_id_stored(
    client: TestClient, store: redis.Redis
) -> None:
    for key, key_id in ((ALICE, "alice"), (ADMIN, "ops"), (f"{BOB} ", "bob")):
        response = send(client, key)
        assert response.status_code == 202, response.text
        assert store.hget(KEYS.task(response.json()["task_id"]), "key_id") == key_id
    lower = client.post(SEND, json=mail(), headers={"Authorization": f"bearer {ALICE}"})
    assert lower.status_code == 202  # the scheme is case-insensitive (RFC 7235)


def test_key_id_is_set_on_request_state(settings: Settings) -> None:
    app = create_app(settings)
    seen: list[str] = []

    @app.middleware("http")
    async def spy(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        seen.append(getattr(request.state, "key_id", "unset"))
        return response

    with TestClient(app) as client:
        send(client, ALICE)
        client.get(RESULT, params={"task_id": str(uuid.uuid4())}, headers=bearer(BOB))
        client.get("/api/v1/admin/stats", headers=bearer(ADMIN))
    assert seen == ["alice", "bob", "ops"]


def test_without_api_keys_everyone_is_anonymous(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    with local_client(create_app(make_settings())) as client:
        response = client.post(SEND, json=mail(), headers=bearer("anything"))
        assert response.status_code == 202
        task_id = response.json()["task_id"]
        assert client.get(RESULT, params={"task_id": task_id}).status_code == 200
    assert store.hget(KEYS.task(task_id), "key_id") is None


# -- domain limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"to": "someone@evil.com"},
        {"cc": ["someone@evil.com"]},
        {"bcc": ["someone@evil.com"]},
        {"to": "user@sub.example.com"},  # subdomains are other domains
        {"bcc": ["ok@example.org", "x@example.org.evil.com"]},
    ],
)
def test_a_domain_limited_key_cannot_send_elsewhere(
    client: TestClient, store: redis.Redis, fields: dict[str, Any]
) -> None:
    body = assert_error(send(client, LIMITED, **fields), 403, "forbidden")
    assert "evil" in body["detail"] or "sub.example.com" in body["detail"]
    assert task_keys(store) == []


def test_a_domain_limited_key_sends_inside_its_domains(client: TestClient) -> None:
    fields = {"to": "User@EXAMPLE.com", "cc": ["a@example.org"], "bcc": ["b@example.com"]}
    assert send(client, LIMITED, **fields).status_code == 202


INTL = "eq_intl-test-key-0123456789"  # a test key, not a credential
HOMOGLYPH = "user@ex\u0430mple.com"  # example.com with a Cyrillic a: xn--exmple-4nf.com


@pytest.mark.parametrize("listed", ["bücher.example", "xn--bcher-kva.example"])
def test_an_international_domain_matches_in_either_spelling_and_a_look_alike_never(
    make_settings: Callable[..., Settings], store: redis.Redis, listed: str
) -> None:
    settings = make_settings(
        api_keys=f"intl:send:{hash_key(INTL)}:{listed},example.com",
        allowed_recipients=f"@{listed}, @example.com",
    )
    with TestClient(create_app(settings)) as client:
        taken = [send(client, INTL, to=to).status_code
                 for to in ("user@bücher.example", "user@XN--BCHER-KVA.example",
                            "user@\uff45xample.com")]  # fmt: skip
        look_alike = send(client, INTL, to=HOMOGLYPH)
        in_bcc = send(client, INTL, bcc=["user@xn--bcher-kva.com"])

    # The fullwidth e is example.com itself (IDNA maps it), so it is in the key's domains.
    assert taken == [202, 202, 202]
    assert "ALLOWED_RECIPIENTS" in assert_error(look_alike, 403, "forbidden")["detail"]
    assert_error(in_bcc, 403, "forbidden")
    assert len(task_keys(store)) == 3


def test_batch_rejects_only_the_messages_outside_the_key_domains(
    client: TestClient, store: redis.Redis
) -> None:
    messages = [mail(to="a@example.com"), mail(to="a@example.com", bcc=["x@evil.com"])]
    response = client.post(BATCH, json={"messages": messages}, headers=bearer(LIMITED))
    assert response.status_code == 202, response.text
    results = response.json()["results"]
    assert results[0]["status"] == "queued"
    assert results[1]["error"] == "forbidden"
    assert len(task_keys(store)) == 1

    refused = client.post(BATCH, json={"messages": messages[1:]}, headers=bearer(LIMITED))
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    assert refused.json()["results"][0]["error"] == "forbidden"
    assert len(task_keys(store)) == 1


# -- admin scope and task privacy --------------------------------------------------------


def test_admin_endpoints_need_the_admin_scope(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 5000)) as client:
        assert_error(client.get("/api/v1/admin/stats"), 401, "unauthorized")
        for key in (ALICE, LIMITED):
            assert_error(client.get("/api/v1/admin/stats", headers=bearer(key)), 403, "forbidden")
        assert client.get("/api/v1/admin/stats", headers=bearer(ADMIN)).status_code == 200


def test_a_task_is_readable_by_its_creator_and_admins_only(client: TestClient) -> None:
    task_id = send(client, ALICE).json()["task_id"]
    params = {"task_id": task_id}
    assert client.get(RESULT, params=params, headers=bearer(ALICE)).json()["task_id"] == task_id
    assert client.get(RESULT, params=params, headers=bearer(ADMIN)).status_code == 200
    other = client.get(RESULT, params=params, headers=bearer(BOB))
    body = assert_error(other, 404, "not_found")  # the answer an unknown id gets
    assert body["detail"] == f"no task {task_id} (unknown, or expired after its TTL)"


def test_waiting_on_another_keys_task_answers_404_at_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = send(client, ALICE).json()["task_id"]  # no worker: it stays pending
    # Not timed: the request must never reach the result waiter (waiting, then answering
    # 404, would reveal the task by its delay). The real waiter still serves every call.
    waiter = state_of(client.app).waiter
    waits: list[str] = []
    real_wait = waiter.wait

    async def recorded(task: str, seconds: float, **kwargs: Any) -> Any:
        waits.append(task)
        return await real_wait(task, seconds, **kwargs)

    monkeypatch.setattr(waiter, "wait", recorded)
    asked = {"task_id": task_id, "wait": MAX_WAIT_SECONDS}
    other = client.get(RESULT, params=asked, headers=bearer(BOB))

    assert_error(other, 404, "not_found")
    assert waits == []
    mine = client.get(RESULT, params={"task_id": task_id, "wait": 0.01}, headers=bearer(ALICE))
    assert (mine.status_code, waits) == (200, [task_id])  # the spy does see a real wait


def test_waiting_on_a_finished_task_reads_it_once(client: TestClient, store: redis.Redis) -> None:
    task_id = send(client, ALICE).json()["task_id"]
    # Finished as a worker would record it (no worker runs in these tests).
    store.hset(Keys().task(task_id), mapping={"status": "success", "sent_at": 1})

    def hmgets() -> int:
        return int(store.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    before = hmgets()
    mine = client.get(RESULT, params={"task_id": task_id, "wait": 5}, headers=bearer(ALICE))
    assert mine.json()["status"] == "success"
    assert hmgets() - before == 1  # the privacy check's read is the answer


# -- repeated failures -------------------------------------------------------------------


def test_repeated_failures_from_one_address_get_429(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"auth_failure_limit": 3}))
    with TestClient(app, client=("203.0.113.9", 4000)) as attacker:
        for _ in range(3):
            assert_error(attacker.post(SEND, json=mail(), headers=bearer("guess")), 401,
                         "unauthorized")  # fmt: skip
        for _ in range(2):
            limited = attacker.post(SEND, json=mail(), headers=bearer("guess"))
            detail = assert_error(limited, 429, "too_many_requests")["detail"]
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert detail.startswith("over AUTH_FAILURE_LIMIT (3/minute) of failed auth")
            assert detail.endswith(f"retry in {limited.headers['Retry-After']} s")
        # A valid key is never throttled: behind a proxy everyone shares one address.
        assert attacker.post(SEND, json=mail(), headers=bearer(ALICE)).status_code == 202
    with TestClient(app, client=("203.0.113.10", 4000)) as neighbour:
        assert_error(neighbour.post(SEND, json=mail(), headers=bearer("guess")), 401,
                     "unauthorized")  # fmt: skip


def test_the_failure_window_expires(settings: Settings, store: redis.Redis) -> None:
    app = create_app(settings.model_copy(update={"auth_failure_limit": 1}))
    with TestClient(app, client=("203.0.113.11", 4000), headers=bearer("guess")) as attacker:
        attacker.get(RESULT, params={"task_id": str(uuid.uuid4())})
        assert attacker.get(RESULT, params={"task_id": str(uuid.uuid4())}).status_code == 429
        counter = KEYS.auth_failures("203.0.113.11")
        assert 0 < store.pttl(counter) <= 60_000
        store.delete(counter)  # as when the window ends
        assert attacker.get(RESULT, params={"task_id": str(uuid.uuid4())}).status_code == 401


def test_a_request_with_no_key_is_no_failed_guess(
    settings: Settings, store: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The dashboard asks once without a key to learn whether it needs one: that is not a
    # guess to count against AUTH_FAILURE_LIMIT, nor one to warn the operator about.
    app = create_app(settings.model_copy(update={"auth_failure_limit": 1}))
    with TestClient(app, client=("203.0.113.12", 4000)) as visitor:
        for _ in range(3):
            assert_error(visitor.get("/api/v1/admin/permissions"), 401, "unauthorized")
        assert store.get(KEYS.auth_failures("203.0.113.12")) is None
        assert "authentication failed" not in caplog.text
        # A wrong key is a guess: counted, and the second one over the limit.
        assert visitor.get(RESULT, params={"task_id": "x"}, headers=bearer("a")).status_code == 401
        assert visitor.get(RESULT, params={"task_id": "x"}, headers=bearer("b")).status_code == 429
        assert "authentication failed" in caplog.text


# -- logs --------------------------------------------------------------------------------


def test_keys_never_appear_in_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = ALICE.replace("alice", "mallory")
    assert send(client, wrong).status_code == 401
    assert send(client, ALICE).status_code == 202
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "authentication failed" in text
    for secret in (ALICE, wrong, hash_key(ALICE)):
        assert secret not in text


# -- keygen ------------------------------------------------------------------------------


def test_keygen_output_round_trips(
    capsys: pytest.CaptureFixture[str], make_settings: Callable[..., Settings]
) -> None:
    assert cli.main(["keygen", "--id", "web", "--scope", "send", "--domains", "example.com"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    key, entry = lines["key"], lines["entry"]
    assert key.startswith("eq_")
    assert len(key) > 40
    parsed = ApiKey.parse(entry)
    assert (parsed.id, parsed.scope, parsed.domains) == ("web", "send", {"example.com"})
    assert parsed.digest == hash_key(key)

    assert cli.main(["keygen", "--scope", "admin", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert parse_api_keys(doc["entry"])[0].digest == hash_key(doc["key"])

    settings = make_settings(api_keys=f"{entry} {doc['entry']}")
    with TestClient(create_app(settings)) as client:
        assert send(client, key).status_code == 202
        assert send(client, key, to="x@elsewhere.com").status_code == 403
        assert client.get("/api/v1/admin/stats", headers=bearer(doc["key"])).status_code == 200


MALFORMED = ["a:send", "a:root:" + "0" * 64, "a:send:xyz", f"a:send:{'0' * 64} a:send:{'1' * 64}",
             f"anonymous:send:{'0' * 64}", f"a:send:{'0' * 64}:not_a_domain"]  # fmt: skip


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_api_keys_are_refused_at_startup(
    make_settings: Callable[..., Settings], value: str
) -> None:
    with pytest.raises(ValueError, match=r"API_KEYS|domain"):
        make_settings(api_keys=value)


def test_api_keys_accepts_a_json_list(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_keys=json.dumps([f"a:send:{'0' * 64}:x.com,y.com"]))
    assert settings.api_keys is not None
    assert settings.api_keys[0].domains == {"x.com", "y.com"}
