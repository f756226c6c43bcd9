"""REDIS_URL and the REDIS_* settings: parsed once, refused in one line, never echoing a
password; REDIS_WAIT_REPLICAS and READONLY against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from emailq.devtools.redis_server import RedisServer
from emailq.errors import ConfigError, StoreFull, StoreOutcomeUnknown, StoreUnavailable
from emailq.logs import redact_url
from emailq.models import Job
from emailq.queue import EnqueueItem, Idempotency, Queue, Replicas, StoreLimits
from emailq.redisconn import SentinelTarget, parse_sentinel_url
from emailq.startup import load_settings
from tests.helpers.polling import wait_until

JOB = Job(to="a@example.com", subject="s", text="b")
SECRET = "pa55-w0rd"  # noqa: S105  # a test's, to look for in what is printed


def test_a_sentinel_url_names_its_sentinels_service_db_and_the_nodes_login() -> None:
    target = parse_sentinel_url(f"redis+sentinel://app:{SECRET}@s1:26380,s2/mymaster/2")
    assert target == SentinelTarget((("s1", 26380), ("s2", 26379)), "mymaster", 2, "app",
                                    SECRET, tls=False)  # fmt: skip
    assert parse_sentinel_url("rediss+sentinel://s1/cache").tls


@pytest.mark.parametrize(("url", "says"), [
    ("http://h:6379/0", "the scheme must be"),
    ("h:6379", "the scheme must be"),
    (f"redis://u:{SECRET}@h:port/0", "port must be a number"),
    (f"redis+sentinel://u:{SECRET}@s1:26379", "ends in /service_name"),
    (f"redis+sentinel://u:{SECRET}@s1:26379/mymaster/x", "must be a number"),
    (f"redis+sentinel://u:{SECRET}@s1:huh/mymaster", "is not host:port"),
    (f"redis+cluster://u:{SECRET}@h1:7000,h2:7001/3", "has database 0 only"),
    (f"redis+cluster://u:{SECRET}@h1,h2:7001", "node is host:port"),
])  # fmt: skip
def test_a_bad_url_is_one_line_naming_redis_url_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, redis_url=url)
    text = str(refused.value)
    assert text.startswith("REDIS_URL:")
    assert says in text
    assert SECRET not in text
    assert "\n" not in text


def test_queue_from_url_refuses_a_wrong_value_in_one_line_without_the_password() -> None:
    with pytest.raises(ConfigError) as refused:
        Queue.from_url(f"http://u:{SECRET}@h:6379/0", timeout=2)
    assert str(refused.value).startswith("REDIS_URL: the scheme must be")
    assert SECRET not in str(refused.value)
    with pytest.raises(ConfigError, match="REDIS_TIMEOUT_SECONDS: must be more than 0"):
        Queue.from_url("redis://h:6379/0", timeout=0)


def test_queue_from_url_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's REDIS_* stays out of a tool's client (this CA file would be refused).
    monkeypatch.setenv("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")
    monkeypatch.setenv("REDIS_VALIDATE_CERTS", "false")
    queue = Queue.from_url("rediss://h:6380/0", timeout=2)
    kwargs = queue.redis.connection_pool.connection_kwargs
    assert (kwargs.get("ssl_ca_certs"), kwargs["ssl_cert_reqs"]) == (None, ssl.CERT_REQUIRED)


def test_tls_files_are_checked_at_startup(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    cases = [
        ({"redis_tls_ca_file": tmp_path / "missing.pem"}, "REDIS_TLS_CA_FILE: no such file"),
        ({"redis_tls_cert_file": pem},
         "^REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE: set both or neither$"),
        # Each names the files set, not a setting that was not (it said REDIS_TLS_KEY_FILE).
        ({"redis_url": "redis://h/0", "redis_tls_ca_file": pem},
         r"^REDIS_TLS_CA_FILE set, but REDIS_URL does not use TLS \(rediss://"),
        ({"redis_url": "redis://h/0", "redis_tls_cert_file": pem, "redis_tls_key_file": pem},
         "^REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE set, but REDIS_URL does not use TLS"),
    ]  # fmt: skip
    for values, says in cases:
        values.setdefault("redis_url", "rediss://h:6380/0")
        with pytest.raises(ConfigError, match=says):
            load_settings(_env_file=None, **values)


def test_the_replica_wait_must_fit_in_the_redis_timeout() -> None:
    with pytest.raises(ConfigError, match="REDIS_WAIT_TIMEOUT_SECONDS: must be less than"):
        load_settings(_env_file=None, redis_wait_replicas=1, redis_wait_timeout_seconds=0.5)
    # Without replicas to wait for, the timeout is not used, so not checked.
    load_settings(_env_file=None, redis_timeout_seconds=0.1)


def test_redacted_urls_keep_the_hosts_and_drop_every_password() -> None:
    assert redact_url(f"redis+sentinel://u:{SECRET}@s1:26379,s2:26379/m/0") == \
        "redis+sentinel://***@s1:26379,s2:26379/m/0"  # fmt: skip
    assert SECRET not in redact_url(f"redis://h:6379/0?password={SECRET}&db=1")


async def test_too_few_replicas_is_outcome_unknown_though_stored(redis_url: str) -> None:
    # A lone node has no replica: WAIT 1 answers 0, and the caller must not take it as
    # stored-for-sure (nor as not stored: the master has it, and sends it).
    queue = Queue(Queue.from_url(redis_url, timeout=2).redis, replicas=Replicas(1, 0.05))
    try:
        with pytest.raises(StoreOutcomeUnknown, match="0 of 1 replicas"):
            await queue.enqueue("t1", JOB, request_id="r")
        assert (await queue.get("t1")) is not None
    finally:
        await queue.close()


def start_replica(master: RedisServer, tmp_path: Path) -> RedisServer:
    """A running replica of ``master`` (the caller stops it)."""
    replica = RedisServer(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1",
                                                            str(master.port)])  # fmt: skip
    replica.start()
    return replica


async def test_a_replica_answering_readonly_is_not_stored_not_unknown(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    # A client still connected to a demoted master: READONLY means it ran nothing.
    master = redis_factory()
    replica = start_replica(master, tmp_path)
    queue = Queue.from_url(replica.url, timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match="READONLY") as refused:
            await queue.enqueue("t1", JOB, request_id="r")
        assert not isinstance(refused.value, StoreOutcomeUnknown)
    finally:
        await queue.close()
        replica.stop()
    assert redis.Redis(port=master.port).exists("{emailq}:task:t1") == 0


async def test_a_refusal_under_the_replica_wait_is_a_refusal(redis_url: str) -> None:
    # Nothing was stored, so there is nothing for replicas to confirm: the client must hear
    # the 507 (or 429), not a 503 "may have been stored".
    base = Queue.from_url(redis_url, timeout=2).redis
    queue = Queue(base, replicas=Replicas(1, 0.05), limits=StoreLimits(max_stored_bytes=10))
    try:
        with pytest.raises(StoreFull):
            await queue.enqueue("t1", Job(to="a@example.com", subject="s", text="b" * 100),
                                request_id="r")  # fmt: skip
        assert (await queue.get("t1")) is None
    finally:
        await queue.close()


async def test_a_replay_waits_for_the_replica_like_the_first_try(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    # The first try was stored but no replica confirmed it (503, outcome unknown); the
    # client retries with its Idempotency-Key on another connection. The replay writes
    # nothing, and a WAIT with no write of its own would count the stalled replica as
    # caught up: a 202 for a mail the replica never got.
    master = redis_factory()
    replica = start_replica(master, tmp_path)
    assert replica.process is not None
    pid = replica.process.pid
    mail = JOB
    once = Idempotency("key", "retry-me", "f" * 64)
    first = Queue(Queue.from_url(master.url, timeout=2).redis, replicas=Replicas(1, 0.2))
    second = Queue(Queue.from_url(master.url, timeout=2).redis, replicas=Replicas(1, 0.2))
    # The confirmed first store gets a long wait: on a loaded machine a healthy replica can
    # take longer than 0.2 s to acknowledge, and that is not what this test is about.
    warm = Queue(Queue.from_url(master.url, timeout=2).redis, replicas=Replicas(1, 30))
    try:
        info = redis.Redis(port=master.port).info
        wait_until(lambda: info("replication").get("slave0", {}).get("state") == "online",
                   what="the replica in sync")  # fmt: skip
        await warm.enqueue_once(EnqueueItem("t1", mail, "r"), once)  # the replica confirms
        os.kill(pid, signal.SIGSTOP)  # connected, but acknowledges nothing more
        with pytest.raises(StoreOutcomeUnknown):
            await first.enqueue_once(EnqueueItem("t2", mail, "r"),
                                     Idempotency("key", "retry-me-2", "f" * 64))  # fmt: skip
        with pytest.raises(StoreOutcomeUnknown):
            await second.enqueue_once(EnqueueItem("t3", mail, "r"),
                                      Idempotency("key", "retry-me-2", "f" * 64))  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)
        await first.close()
        await second.close()
        await warm.close()
        replica.stop()


def test_a_write_on_a_transport_uvloop_closed_is_a_dropped_connection(redis_url: str) -> None:
    # Seen under a Sentinel failover: a reconnect's HELLO met the killed master's reset, and
    # uvloop's RuntimeError ("the handler is closed") stopped the worker's claim loop. It must
    # be a ConnectionError, which redis-py retries on a new connection and we convert.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[BaseException | None, bool]:
        client = Queue.from_url(redis_url, timeout=2).redis
        assert isinstance(client, redis.asyncio.Redis)
        try:
            await client.ping()
            conn = await client.connection_pool.get_connection()
            conn._writer.transport.abort()  # type: ignore[attr-defined]  # closed, as on a reset
            await asyncio.sleep(0.05)
            raised: BaseException | None = None
            try:
                await conn.send_command("PING")
            except BaseException as exc:  # which kind is the point
                raised = exc
            await client.connection_pool.release(conn)
            return raised, bool(await client.ping())  # the client goes on, newly connected
        finally:
            await client.aclose()

    raised, answered = uvloop.run(scenario())
    assert isinstance(raised, redis.exceptions.ConnectionError), repr(raised)
    assert answered
