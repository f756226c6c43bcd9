"""``redis+cluster://``: the URL, and the queue's error semantics on a real Redis Cluster
(3 masters, 3 replicas from the redis-server on PATH): what is "not stored" (503, safe to
retry) and what is "outcome unknown" when nodes are down or the cluster has no majority."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from emailq.errors import StoreOutcomeUnknown, StoreUnavailable
from emailq.logs import redact_url
from emailq.models import Attempt, Job
from emailq.queue import Queue
from emailq.rediscluster import QueueCluster, ShardedListener, parse_cluster_url
from emailq.relay import RelayStore
from emailq.startup import describe
from emailq.waiting import ResultWaiter
from emailq.webhooks.models import EndpointSpec, WebhookEvent
from emailq.webhooks.store import WebhookStore
from tests.helpers.cluster import LocalCluster, cluster_skip_reason
from tests.helpers.polling import wait_until
from tests.helpers.ports import refused_port

needs_cluster = pytest.mark.skipif(bool(cluster_skip_reason()), reason=cluster_skip_reason())
JOB = Job.model_validate({"to": "user@example.com", "subject": "s", "text": "hello"})


def test_url_names_startup_nodes_credentials_and_tls() -> None:
    address = parse_cluster_url("redis+cluster://app:p%40ss@h1:7000,[::1]:7001/")
    assert address.nodes == (("h1", 7000), ("::1", 7001))
    assert (address.username, address.password, address.tls) == ("app", "p@ss", False)
    assert parse_cluster_url("rediss+cluster://h1:7000").tls
    assert parse_cluster_url("redis+cluster://:pw@h1:7000/").username is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://u:hunter2@h1:7000,h2/", "host:port (got 'h2')"),
        ("redis+cluster://u:hunter2@/", "at least one node"),
        ("redis+cluster://u:hunter2@h1:7000/3", "database 0 only"),
        ("redis+cluster://u:hunter2@h1:99999/", "host:port"),
        ("redis+cluster://u:hunter2@h1:7000/?db=1", "no query options"),
    ],
)
def test_a_bad_url_is_one_line_at_startup_without_the_password(url: str, says: str) -> None:
    from pydantic import ValidationError

    from emailq.settings import Settings

    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
    line = describe(caught.value)
    assert line.startswith("REDIS_URL: ")
    assert says in line
    assert "hunter2" not in line


def test_logs_show_a_cluster_url_without_its_password() -> None:
    url = "redis+cluster://app:hunter2@h1:7000,h2:7001/"
    assert redact_url(url) == "redis+cluster://***@h1:7000,h2:7001/"


async def test_no_node_reachable_is_not_stored_for_writes_and_reads() -> None:
    with refused_port() as one, refused_port() as two:
        ports = [one.getsockname()[1], two.getsockname()[1]]
        queue = Queue.from_url(f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/",
                               timeout=0.5)  # fmt: skip
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await queue.enqueue("t1", JOB, request_id="r")
            assert not isinstance(caught.value, StoreOutcomeUnknown)  # nothing was sent
            with pytest.raises(StoreUnavailable):
                await queue.get("t1")
            with pytest.raises(StoreUnavailable):  # DEL reads the slot map outside a command
                await RelayStore(queue).retire("w")
        finally:
            await queue.close()


async def test_a_plain_redis_behind_a_cluster_url_is_named_in_the_error(redis_url: str) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    queue = Queue.from_url(f"redis+cluster://127.0.0.1:{port}/", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable, match="NotACluster"):
            await queue.enqueue("t1", JOB, request_id="r")
    finally:
        await queue.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if cluster_skip_reason():
        pytest.skip(cluster_skip_reason())
    started = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture
async def cluster_queue(shared_cluster: LocalCluster) -> AsyncIterator[Queue]:
    queue = Queue.from_url(shared_cluster.url(), timeout=2, max_connections=4)
    for node in shared_cluster.live():
        with node.client() as client:
            if client.info("replication")["role"] == "master":
                client.flushall()
    yield queue
    await queue.close()


@needs_cluster
async def test_scripts_pipelines_streams_and_the_waiter_on_the_slots_master(
    cluster_queue: Queue, shared_cluster: LocalCluster
) -> None:
    queue = cluster_queue
    assert isinstance(queue.redis, QueueCluster)
    assert queue.publish == "SPUBLISH"
    await queue.enqueue("t1", JOB, request_id="r1")
    waiter = ResultWaiter(queue)
    await waiter.start()
    try:
        assert await queue.wait_for_work(0.5)  # BLPOP on the wake list
        claim = await queue.claim("w1", 1, 30_000)
        [claimed] = claim.jobs
        finished = asyncio.create_task(waiter.wait("t1", 20))
        await asyncio.sleep(0.2)  # the waiter registers and re-reads first
        assert not finished.done()
        await queue.finish(claimed, "success", Attempt(attempt=1, outcome="success"))
        record = await asyncio.wait_for(finished, 20)  # woken by the SPUBLISHed notice
        assert record is not None
        assert record.status == "success"
    finally:
        await waiter.stop()
    types = [e.type for e in await queue.events()]
    assert types[0] == "accepted"
    assert types[-1] == "sent"
    # Every key is on the master that owns {emailq}'s slot, none elsewhere.
    owner = shared_cluster.master_of("{emailq}")
    with owner.client() as client:
        assert client.exists(queue.keys.task("t1"))


@needs_cluster
async def test_webhook_store_transactions_and_consumer_group_on_a_cluster(
    cluster_queue: Queue,
) -> None:
    store = WebhookStore(cluster_queue)
    spec = EndpointSpec(url="https://example.com/hook", events=[WebhookEvent.SENT])
    endpoint = await store.add_endpoint(spec, "ep1")
    assert endpoint is not None
    assert [e.id for e in await store.endpoints()] == ["ep1"]
    assert await store.delete_endpoint("ep1") == "deleted"  # MULTI/EXEC on one slot
    assert await store.endpoints() == []


@needs_cluster
async def test_a_full_pool_waits_for_its_turn_then_says_not_stored(
    shared_cluster: LocalCluster,
) -> None:
    queue = Queue.from_url(shared_cluster.url(), timeout=0.3, read_timeout=5, max_connections=1)
    try:
        await queue.ping()
        blocked = asyncio.create_task(queue.wait_for_work(2))  # holds the only turn
        await asyncio.sleep(0.1)
        with pytest.raises(StoreUnavailable) as caught:
            await queue.enqueue("t2", JOB, request_id="r")
        assert not isinstance(caught.value, StoreOutcomeUnknown)
        await blocked
        await queue.enqueue("t2", JOB, request_id="r")  # its turn came
    finally:
        await queue.close()


@needs_cluster
async def test_a_write_sent_as_the_master_died_is_unknown_the_next_not_stored(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        cluster.start()
        queue = Queue.from_url(cluster.url(), timeout=0.5)
        await queue.enqueue("t0", JOB, request_id="r")  # a pooled connection to the master
        cluster.kill(cluster.master_of("{emailq}"))
        # Sent on that connection before this process has read its end: no reply, and the
        # retry finds no master. It may have run, as far as anyone here can know.
        with pytest.raises(StoreOutcomeUnknown):
            await queue.enqueue("t1", JOB, request_id="r")
        with pytest.raises(StoreUnavailable) as caught:  # refused to connect: sent nothing
            await queue.enqueue("t2", JOB, request_id="r")
        assert not isinstance(caught.value, StoreOutcomeUnknown)
        await queue.close()
    finally:
        cluster.stop()


@needs_cluster
async def test_no_majority_is_503_not_stored_and_the_listener_ends(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        cluster.start()
        queue = Queue.from_url(cluster.url(), timeout=0.5)
        await queue.enqueue("t1", JOB, request_id="r")
        listener = queue.done_listener()
        assert isinstance(listener, ShardedListener)
        await listener.subscribe(queue.keys.done_channel)
        # Two of three masters gone, one of them {emailq}'s: no majority to promote anyone,
        # and the survivor refuses every command (CLUSTERDOWN) once it notices.
        owner = cluster.master_of("{emailq}")
        [survivor, other] = [n for n in cluster.master_nodes() if n.port != owner.port]
        elsewhere = Queue.from_url(cluster.url(), timeout=0.5,
                                   prefix=cluster.prefix_on(survivor))  # fmt: skip
        await elsewhere.ping()
        cluster.kill(owner)
        cluster.kill(other)
        wait_until(lambda: survivor.cluster_info().get("cluster_state") == "fail",
                   what="the survivor in cluster_state:fail")  # fmt: skip
        for each in (queue, elsewhere):  # the dead owner's slot, and the survivor's
            with pytest.raises(StoreUnavailable) as caught:
                await each.enqueue("x1", JOB, request_id="r")
            assert not isinstance(caught.value, StoreOutcomeUnknown), caught.value
            with pytest.raises(StoreUnavailable):
                await each.get("t1")
        with pytest.raises(RedisConnectionError):  # it says so, it does not hang
            await read_until_error(listener)
        await listener.aclose()
        await elsewhere.close()
        await queue.close()
    finally:
        cluster.stop()


async def read_until_error(listener: ShardedListener) -> None:
    for _ in range(100):  # bounded: 100 quiet reads would mean the loss went unnoticed
        await listener.get_message(timeout=0.1)
