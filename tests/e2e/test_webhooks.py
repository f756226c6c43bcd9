"""Signed webhooks end to end, with real processes: the API, mail workers, the webhook
dispatcher (``python -m worker.webhooks``), aiosmtpd and a webhook receiver that verifies
every signature with the Standard Webhooks reference library (tests/helpers/webhooks.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from emailq.devtools.redis_server import RedisServer, free_port
from emailq.queue import Keys
from emailq.settings import Settings
from emailq.webhooks.signing import new_secret
from tests.helpers.api import Api, mail
from tests.helpers.polling import BOUND, wait_until
from tests.helpers.processes import Procs, read_log, settings_env, sigkill, wait_for_log
from tests.helpers.smtpd import SmtpServer
from tests.helpers.webhooks import Receiver, fail_first, receiving
from tests.helpers.workers import TrackingHandler

Factory = Callable[..., SmtpServer]
ADMIN = "/api/v1/admin/webhooks"
# Short waits between retries, one attempt per 2 s at most, and leases that lapse fast.
FAST_WEBHOOKS = {"webhook_allow_private": True, "webhook_retry_schedule": "0.1,0.2,0.2,0.3,0.3",
                 "webhook_timeout_seconds": 2, "webhook_lease_seconds": 3}  # fmt: skip


def webhooks_file(tmp_path: Path, url: str, secrets: list[str], **extra: Any) -> Path:
    path = tmp_path / "webhooks.json"
    entry = {"id": "app", "url": url, "secrets": secrets, **extra}
    path.write_text(json.dumps({"webhooks": [entry]}))
    return path


def log_lines(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """A process's JSON log lines so far (its other output left out)."""
    return [json.loads(line) for line in read_log(proc).splitlines() if line.startswith("{")]


def sent_events(receiver: Receiver) -> dict[str, list[dict[str, Any]]]:
    """Accepted email.sent payloads per webhook-id."""
    return {m: p for m, p in receiver.accepted().items() if p[0]["type"] == "email.sent"}


@pytest.mark.slow
def test_each_event_is_delivered_once_across_a_worker_and_a_dispatcher_killed(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Factory, tmp_path: Path
) -> None:
    count = 8
    secrets = [new_secret(), new_secret()]  # a rotation: both sign every delivery
    handler = TrackingHandler(delay=0.3)
    smtp = smtp_factory(handler=handler)
    with receiving(secrets, fail_first(3)) as receiver:
        settings = make_settings(
            smtp_port=smtp.port, job_lease_seconds=1, worker_concurrency=2,
            webhooks_file=webhooks_file(tmp_path, receiver.url, secrets,
                                        events=["email.sent", "email.failed"]),
            **FAST_WEBHOOKS,
        )  # fmt: skip
        api = Api(procs.api(settings))
        first_dispatcher = procs.dispatcher(settings)
        task_ids = api.enqueue(count)
        first_worker = procs.worker(settings)
        wait_until(lambda: handler.in_flight > 0, what="a send in DATA", proc=first_worker)
        sigkill(first_worker)  # mid-send: its lease lapses, another worker sends it
        procs.worker(settings)
        wait_until(lambda: len(receiver.requests) >= 3, what="first webhook attempts",
                   proc=first_dispatcher)  # fmt: skip
        sigkill(first_dispatcher)  # mid-run: failing deliveries wait for their retries
        procs.dispatcher(settings)
        wait_until(lambda: len(sent_events(receiver)) >= count, what="every email.sent",
                   timeout=60)  # fmt: skip
        deliveries = api.client.get(f"{ADMIN}/app/deliveries", params={"limit": 100}).json()

    accepted = sent_events(receiver)
    assert receiver.unverified == []  # every request verified, with each secret
    # One delivery (one webhook-id) per task, and each task's email.sent among them.
    assert sorted(p[0]["data"]["task_id"] for p in accepted.values()) == sorted(task_ids)
    assert len(accepted) == count
    for msg_id, payloads in accepted.items():
        data = payloads[0]["data"]
        assert data["status"] == "success"
        assert data["smtp_code"] == 250
        assert data["to"].endswith("@example.com")
        assert receiver.attempts()[msg_id] >= 4  # three 500s, then the 200
        assert len(receiver.bodies()[msg_id]) == 1  # the same body on every attempt
    # A dispatcher killed mid-attempt leaves that attempt to be made again (same id):
    # a duplicate is possible for those in flight only, and the receiver dedupes by id.
    duplicates = {m: len(p) - 1 for m, p in accepted.items() if len(p) > 1}
    print(f"webhook deliveries accepted twice (in flight at the kill): {duplicates}")
    assert sum(duplicates.values()) <= settings.webhook_concurrency
    assert {d["status"] for d in deliveries["deliveries"]} == {"succeeded"}
    assert len(deliveries["deliveries"]) == count
    # Every mail was sent too (the killed worker's one by the second worker).
    assert sorted(set(handler.task_ids())) == sorted(task_ids)


def test_410_disables_the_endpoint_and_replay_sends_the_same_webhook_id(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, tmp_path: Path
) -> None:
    secret = new_secret()
    gone = True

    def answer(_msg_id: str, _nth: int) -> int:
        return 410 if gone else 204

    with receiving([secret], answer) as receiver:
        settings = make_settings(webhooks_file=webhooks_file(tmp_path, receiver.url, [secret]),
                                 **FAST_WEBHOOKS)  # fmt: skip
        api = Api(procs.api(settings))
        procs.dispatcher(settings)
        procs.worker(settings)
        (first,) = api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 1, what="the first delivery")

        def endpoint() -> dict[str, Any]:
            body: dict[str, Any] = api.client.get(f"{ADMIN}/app").json()
            return body

        wait_until(lambda: endpoint()["disabled_at"] is not None, what="the endpoint disabled")
        assert endpoint()["disabled_reason"] == "answered 410 Gone"
        failed = api.client.get(f"{ADMIN}/app/deliveries", params={"status": "failed"}).json()
        (delivery,) = failed["deliveries"]
        assert delivery["reason"] == "the endpoint answered 410 Gone"
        assert delivery["attempts"] == 1
        assert delivery["payload"]["data"]["task_id"] == first
        # Times as every answer of the API gives them: RFC 3339 UTC, to the millisecond.
        (attempt,) = delivery["attempt_log"]
        assert (attempt["outcome"], attempt["status_code"]) == ("failed", 410)
        assert attempt["url"] == receiver.url  # where it went: an endpoint may move
        for moment in (attempt["at"], delivery["created_at"], delivery["updated_at"]):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", moment), moment

        # A later mail's delivery fails without a request: the endpoint is disabled.
        (second,) = api.enqueue(1)
        api.wait_terminal([second])

        def failed_count() -> int:
            page = api.client.get(f"{ADMIN}/app/deliveries", params={"status": "failed"})
            return len(page.json()["deliveries"])

        wait_until(lambda: failed_count() == 2, what="the second delivery failed")
        assert len(receiver.requests) == 1

        # Re-enabled and replayed: the same webhook-id and body, accepted this time.
        gone = False
        assert api.client.post(f"{ADMIN}/app/enable").status_code == 200
        replay = api.client.post(f"{ADMIN}/app/deliveries/{delivery['id']}/replay")
        assert replay.status_code == 202, replay.text
        wait_until(lambda: len(receiver.requests) == 2, what="the replayed delivery")

    assert receiver.unverified == []
    assert [r.msg_id for r in receiver.requests] == [delivery["id"]] * 2
    assert receiver.requests[0].body == receiver.requests[1].body


def test_the_admin_api_registers_lists_and_deletes_endpoints(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    with receiving([], lambda _m, _n: 200) as receiver:
        settings = make_settings(**FAST_WEBHOOKS)
        api = Api(procs.api(settings))
        dispatcher = procs.dispatcher(settings)
        procs.worker(settings)
        created = api.client.post(ADMIN, json={"url": receiver.url, "events": ["email.sent"]})
        assert created.status_code == 201, created.text
        endpoint = created.json()
        assert endpoint["id"].startswith("ep_")
        assert endpoint["source"] == "api"
        (secret,) = endpoint["secrets"]  # generated, shown in full once here
        receiver.secrets = [secret]
        listed = api.client.get(ADMIN).json()["endpoints"]
        assert [e["id"] for e in listed] == [endpoint["id"]]
        assert listed[0]["secrets"] == [f"whsec_...{secret[-4:]}"]  # masked in lists

        (task_id,) = api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 1, what="the delivery")
        data = json.loads(receiver.requests[0].body)["data"]
        assert data["task_id"] == task_id
        assert (data["metadata"], data["tags"]) == (None, None)  # a mail without labels
        # The dispatcher's line for the attempt names the mail's task, as the others do.
        wait_until(lambda: any(line.get("task_id") == task_id and "attempt 1" in line["event"]
                               for line in log_lines(dispatcher)),
                   what="the attempt's line")  # fmt: skip
        # A mail's own metadata and tags ride in its webhook, as the result shows them.
        labelled = api.client.post("/api/v1/email/received", json=mail(
            metadata={"order_id": "1042"}, tags=["receipt"]))  # fmt: skip
        assert labelled.status_code == 202, labelled.text
        wait_until(lambda: len(receiver.requests) == 2, what="the labelled mail's delivery")
        data = json.loads(receiver.requests[1].body)["data"]
        assert data["task_id"] == labelled.json()["task_id"]
        assert (data["metadata"], data["tags"]) == ({"order_id": "1042"}, ["receipt"])

        assert api.client.delete(f"{ADMIN}/{endpoint['id']}").status_code == 204
        assert api.client.get(f"{ADMIN}/{endpoint['id']}").status_code == 404
    assert receiver.unverified == []


def test_a_rotated_secret_and_a_moved_url_apply_from_the_next_delivery(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    with receiving([], lambda _m, _n: 200) as old, receiving([], lambda _m, _n: 200) as new:
        settings = make_settings(**FAST_WEBHOOKS)
        api = Api(procs.api(settings))
        procs.dispatcher(settings)
        procs.worker(settings)
        endpoint = api.client.post(ADMIN, json={"url": old.url, "events": ["email.sent"]}).json()
        url = f"{ADMIN}/{endpoint['id']}"
        (first,) = old.secrets = endpoint["secrets"]
        api.enqueue(1)
        wait_until(lambda: len(old.requests) == 1, what="the delivery signed by the first secret")

        rotated = api.client.post(f"{url}/secrets/rotate").json()["secrets"]
        assert rotated[1] == first
        old.secrets = rotated  # the receiver checks each signs: both, during the rotation
        api.enqueue(1)
        wait_until(lambda: len(old.requests) == 2, what="the delivery signed by both")
        assert len(old.requests[1].headers["webhook-signature"].split()) == 2

        new.secrets = [rotated[0]]
        changed = api.client.patch(url, json={"url": new.url, "secrets": [rotated[0]]})
        assert changed.status_code == 200, changed.text
        api.enqueue(1)
        wait_until(lambda: len(new.requests) == 1, what="the delivery at the moved url")
        assert len(new.requests[0].headers["webhook-signature"].split()) == 1  # old one dropped
    assert len(old.requests) == 2  # nothing more went to the old url
    assert old.unverified == new.unverified == []


def test_a_dispatcher_started_before_its_redis_waits_then_registers_and_delivers(
    procs: Procs,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    redis_factory: Callable[..., RedisServer],
) -> None:
    # Containers start in any order: the dispatcher must wait for Redis as a worker does,
    # not exit with a traceback because WEBHOOKS_FILE could not be registered yet.
    port = free_port()
    secrets = [new_secret()]
    with receiving(secrets, lambda _m, _n: 200) as receiver:
        settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0",
                                 webhooks_file=webhooks_file(tmp_path, receiver.url, secrets),
                                 **FAST_WEBHOOKS)  # fmt: skip
        dispatcher = procs.dispatcher(settings, ready=False)
        wait_for_log(dispatcher, "waiting for Redis")
        assert dispatcher.poll() is None
        redis_factory(port=port)
        wait_for_log(dispatcher, "webhook dispatcher started")
        api = Api(procs.api(settings))
        procs.worker(settings)
        (task_id,) = api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 1, what="the delivery", proc=dispatcher)
    assert json.loads(receiver.requests[0].body)["data"]["task_id"] == task_id
    assert receiver.unverified == []
    assert "Traceback" not in read_log(dispatcher)


def _lose_the_group(loss: str, server: RedisServer, keys: Keys, make: Callable[..., RedisServer],
                   tmp_path: Path) -> None:  # fmt: skip
    if loss == "restart empty":  # no persistence, or a node replaced
        server.stop()
        make(port=server.port, data_dir=tmp_path / "empty-redis")
        return
    client = redis.Redis.from_url(server.url)
    try:
        if loss == "flushall":
            client.flushall()
        else:
            for key in client.scan_iter(keys.webhook_delivery_prefix + "*"):
                client.delete(key)  # expired, as RESULT_TTL_SECONDS would have them
            client.xgroup_destroy(keys.events, keys.webhook_group)
    finally:
        client.close()


@pytest.mark.parametrize("loss", ["restart empty", "flushall", "group destroyed"])
def test_a_group_lost_under_a_running_dispatcher_is_made_again_without_resending(
    procs: Procs,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    redis_factory: Callable[..., RedisServer],
    loss: str,
) -> None:
    # A Redis back without its data took the consumer group and WEBHOOKS_FILE's endpoints
    # with it: the dispatcher's next read got NOGROUP and it exited with a traceback (an
    # operator's walkthrough). FLUSHALL while it waits in XREADGROUP answers "UNBLOCKED the
    # stream key no longer exists", which it did not take for a lost group either. And a
    # group made again from "0" sent every event still in the stream whose delivery record
    # had expired a second time.
    server = redis_factory()
    secrets = [new_secret()]
    with receiving(secrets, lambda _m, _n: 200) as receiver:
        settings = make_settings(redis_url=server.url,
                                 webhooks_file=webhooks_file(tmp_path, receiver.url, secrets),
                                 **FAST_WEBHOOKS)  # fmt: skip
        dispatcher = procs.dispatcher(settings)
        api = Api(procs.api(settings))
        procs.worker(settings)
        (first,) = api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 1, what="the first delivery")
        _lose_the_group(loss, server, Keys(settings.redis_key_prefix), redis_factory, tmp_path)
        wait_for_log(dispatcher, "registering it and WEBHOOKS_FILE's endpoints again")
        (second,) = api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 2, what="a delivery after the loss",
                   proc=dispatcher)  # fmt: skip
        time.sleep(1)  # room for a third, resent, delivery to show up (none may)
    assert [json.loads(r.body)["data"]["task_id"] for r in receiver.requests] == [first, second]
    assert receiver.unverified == []
    assert dispatcher.poll() is None
    assert "Traceback" not in read_log(dispatcher)


def test_webhooks_file_errors_stop_the_dispatcher_with_one_line(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = webhooks_file(tmp_path, "http://10.0.0.1/hook", [new_secret()])
    settings = make_settings(webhooks_file=path)
    proc = subprocess.run([sys.executable, "-m", "worker.webhooks"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "webhook 'app', field url: 10.0.0.1 is a private address" in proc.stderr
    assert proc.stdout == ""


def test_a_dispatcher_that_stops_cleanly_leaves_the_consumer_group(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, tmp_path: Path,
    store: redis.Redis,
) -> None:  # fmt: skip
    secret = new_secret()
    with receiving([secret], lambda _msg_id, _nth: 204) as receiver:
        settings = make_settings(webhooks_file=webhooks_file(tmp_path, receiver.url, [secret]),
                                 **FAST_WEBHOOKS)  # fmt: skip
        api = Api(procs.api(settings))
        dispatcher = procs.dispatcher(settings)
        procs.worker(settings)
        api.enqueue(1)
        wait_until(lambda: len(receiver.requests) == 1, what="the delivery", proc=dispatcher)
        keys = Keys(settings.redis_key_prefix)

        def members() -> list[Any]:
            return list(store.xinfo_consumers(keys.events, keys.webhook_group))

        assert len(members()) == 1  # it joined when it read its first event
        dispatcher.send_signal(signal.SIGTERM)
        assert dispatcher.wait(timeout=BOUND) == 0
    # Each process joins under a new name: one that left nothing pending leaves no name.
    assert members() == []
