"""Without API keys the API serves local requests only: real API and worker processes.

Local: a loopback client, a Host naming this machine, no other page's Origin. A remote
client is simulated with ``TRUSTED_PROXIES=127.0.0.1`` and the ``X-Forwarded-For`` a proxy
would add; 127.0.0.2 and other 127.x addresses are other local peers. What reached the
SMTP server and what Redis holds are counted after each refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis

from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import peer
from tests.helpers.polling import wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer

SEND = "/api/v1/email/received"
BATCH = "/api/v1/emails/batch"
STATS = "/api/v1/admin/stats"
KEYS = Keys()
REMOTE = {"X-Forwarded-For": "203.0.113.5"}  # what a trusted local proxy says


def mail(to: str = "user@example.com", body: str = "Hello") -> dict[str, Any]:
    return {"to": to, "subject": "Hi", "body": body}


def tasks(store: redis.Redis) -> int:
    return sum(1 for _ in store.scan_iter(KEYS.task("*")))


def refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "forbidden"
    assert reason in body["detail"]
    assert "API_KEYS" in body["detail"]


def test_only_local_requests_send_and_administer(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, store: redis.Redis
) -> None:
    settings = make_settings()  # no keys, no allow-list, loopback SMTP
    base = procs.api(settings)
    procs.worker(settings)
    port = base.rsplit(":", 1)[1]
    with peer(base) as local, peer(base, "127.0.0.2") as other_local:
        hostile: list[tuple[dict[str, str], str]] = [
            ({"Host": f"evil.example:{port}"}, "Host"),  # DNS rebinding
            ({"Host": f"localhost.evil.example:{port}"}, "Host"),
            ({"Origin": "http://evil.example"}, "cross-origin"),
            ({"Origin": f"http://localhost:{int(port) + 1}"}, "cross-origin"),
            ({"Sec-Fetch-Site": "cross-site"}, "cross-origin"),
            ({"X-Forwarded-For": "203.0.113.5"}, "TRUSTED_PROXIES"),  # an unlisted local proxy
        ]
        for headers, reason in hostile:
            refused(local.post(SEND, json=mail(body=str(headers)), headers=headers), reason)
            refused(local.post(BATCH, json={"messages": [mail()]}, headers=headers), reason)
            refused(local.get(STATS, headers=headers), reason)
        assert tasks(store) == 0
        accepted = [
            local.post(SEND, json=mail(body="plain curl")),
            other_local.post(SEND, json=mail(body="from 127.0.0.2"), headers={"Host": "localhost"}),
            local.post(SEND, json=mail(body="same-origin page"),
                       headers={"Origin": f"http://127.0.0.1:{port}"}),
            local.post(SEND, json=mail(body="ipv6 host"), headers={"Host": f"[::1]:{port}"}),
        ]  # fmt: skip
        assert [a.status_code for a in accepted] == [202] * 4
        assert local.get(STATS).status_code == 200
    wait_until(lambda: len(smtp.handler.received) >= 4, what="the four accepted mails")
    assert sorted(smtp.handler.task_ids()) == sorted(a.json()["task_id"] for a in accepted)
    assert tasks(store) == 4


def test_a_remote_client_is_refused_unless_the_operator_opts_out(
    procs: Procs, make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    closed = procs.api(make_settings(trusted_proxies="127.0.0.1"))
    with peer(closed) as proxy:
        refused(proxy.post(SEND, json=mail(), headers=REMOTE), "only clients on this machine")
        refused(proxy.post(BATCH, json={"messages": [mail()]}, headers=REMOTE), "only clients")
        refused(proxy.get(STATS, headers=REMOTE), "only clients on this machine")
        assert tasks(store) == 0
        # The same proxy forwarding a local client: served.
        assert proxy.post(SEND, json=mail(), headers={"X-Forwarded-For": "::1"}).status_code == 202
    opened = procs.api(make_settings(trusted_proxies="127.0.0.1", allow_open_relay=True))
    with peer(opened) as proxy:
        assert proxy.post(SEND, json=mail(), headers=REMOTE).status_code == 202
        # The opt-out is about sending: the admin endpoints still answer local requests only.
        refused(proxy.get(STATS, headers=REMOTE), "only clients on this machine")
    assert tasks(store) == 2


def test_idempotency_keys_are_per_client_and_a_conflict_names_no_task(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, store: redis.Redis
) -> None:
    settings = make_settings(trusted_proxies="127.0.0.1", allow_open_relay=True)
    base = procs.api(settings)
    procs.worker(settings)
    key = {"Idempotency-Key": "order-1"}
    alice = {**key, "X-Forwarded-For": "203.0.113.1"}
    mallory = {**key, "X-Forwarded-For": "203.0.113.2"}
    with peer(base) as proxy:
        first = proxy.post(SEND, json=mail("alice@example.com"), headers=alice)
        assert first.status_code == 202
        task_id = first.json()["task_id"]
        # Mallory guesses alice's key: that is mallory's own key, so a task of mallory's.
        theirs = proxy.post(SEND, json=mail("m@example.com"), headers=mallory)
        assert theirs.status_code == 202, theirs.text
        assert theirs.json()["task_id"] != task_id
        # Alice's retry replays; alice's other body is a conflict that names no task.
        again = proxy.post(SEND, json=mail("alice@example.com"), headers=alice)
        assert again.json()["task_id"] == task_id
        conflict = proxy.post(SEND, json=mail("x@example.com"), headers=alice)
        assert conflict.status_code == 409
        assert conflict.json()["error"] == "idempotency_conflict"
        assert task_id not in conflict.text
    wait_until(lambda: len(smtp.handler.received) >= 2, what="alice's and mallory's mail")
    assert sorted(r.rcpt_tos[0] for r in smtp.handler.received) == [
        "alice@example.com", "m@example.com"]  # fmt: skip
    assert tasks(store) == 2
