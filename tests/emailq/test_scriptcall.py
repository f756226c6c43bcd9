"""The lean EVALSHA path (emailq.scriptcall) against real redis-servers: the same bytes as
redis-py's, NOSCRIPT reloaded, and each failure the store error it is on redis-py's path."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from emailq import scriptcall
from emailq.devtools.redis_server import RedisServer, free_port
from emailq.errors import StoreOutcomeUnknown, StoreUnavailable
from emailq.models import Job
from emailq.queue import Queue

JOB = Job(to="a@example.com", subject="s", text="b")


async def test_a_command_is_packed_as_redis_py_packs_it(redis_url: str) -> None:
    queue = Queue.from_url(redis_url, timeout=2)
    try:
        assert isinstance(queue.redis, redis.asyncio.Redis)
        script = queue._scripts["claim"]
        keys, shared = queue.keys.shared_keys(), queue.keys.shared_args(7, "PUBLISH")
        call = scriptcall.ScriptCall(queue.redis, script, keys, shared)
        args: list[str | int | float] = [3, 1.5, "w-1", "ünïcode", -2, ""]
        conn = queue.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        expected = conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *shared, *args)
        assert call.pack(args) == b"".join(expected)
        with pytest.raises(redis.exceptions.DataError):
            call.pack([True])
    finally:
        await queue.close()


async def test_only_clients_built_by_redisconn_and_no_cluster_take_the_lean_path(
    redis_url: str,
) -> None:
    ours = Queue.from_url(redis_url, timeout=2)
    plain = redis.asyncio.Redis.from_url(redis_url)
    cluster = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", free_port())])
    try:
        assert scriptcall.lean_client(ours.redis) is ours.redis
        assert scriptcall.lean_client(plain) is None  # its pool marks nothing NotConnected
        assert scriptcall.lean_client(cluster) is None  # redis-py's cluster path, explicitly
    finally:
        await ours.close()
        await plain.aclose()
        await cluster.aclose()


async def test_a_flushed_script_cache_is_loaded_again_and_the_call_goes_on(
    redis_url: str,
) -> None:
    queue = Queue.from_url(redis_url, timeout=2)
    direct = redis.Redis.from_url(redis_url)
    try:
        await queue.enqueue("t1", JOB, request_id="r")
        direct.script_flush()  # as a restart or a failover to a fresh node would
        await queue.enqueue("t2", JOB, request_id="r")
        direct.script_flush()
        claim = await queue.claim("w", 5, 60_000)
        assert sorted(j.task_id for j in claim.jobs) == ["t1", "t2"]
    finally:
        direct.close()
        await queue.close()


async def test_a_redis_that_never_started_is_unavailable_not_unknown() -> None:
    queue = Queue.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await queue.enqueue("t1", JOB, request_id="r")
        assert not isinstance(refused.value, StoreOutcomeUnknown)
    finally:
        await queue.close()


async def test_a_redis_killed_during_a_write_leaves_its_outcome_unknown(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory()
    assert server.process is not None
    queue = Queue.from_url(server.url, timeout=5)
    try:
        await queue.enqueue("t0", JOB, request_id="r")  # a pooled, loaded connection
        os.kill(server.process.pid, signal.SIGSTOP)  # it takes the command, runs nothing
        call = asyncio.create_task(queue.enqueue("t1", JOB, request_id="r"))
        await asyncio.sleep(0.3)
        assert not call.done()
        os.kill(server.process.pid, signal.SIGKILL)
        with pytest.raises(StoreOutcomeUnknown):
            await call
    finally:
        await queue.close()


async def test_a_stalled_redis_times_out_unknown_for_a_write_unavailable_for_a_read(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory()
    assert server.process is not None
    queue = Queue.from_url(server.url, timeout=0.5)
    try:
        await queue.claim("w", 1, 1000)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreOutcomeUnknown):
                await queue.enqueue("t1", JOB, request_id="r")
            with pytest.raises(StoreUnavailable) as read:
                await queue.stats(live_window_ms=1000)
            assert not isinstance(read.value, StoreOutcomeUnknown)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert (await queue.stats(live_window_ms=1000)) is not None  # a new connection
    finally:
        await queue.close()


async def test_a_restarted_redis_is_reached_again_on_the_next_call(
    redis_factory: Callable[..., RedisServer],
) -> None:
    # The pooled connections died with the server: the next call must not fail for it.
    server = redis_factory()
    queue = Queue.from_url(server.url, timeout=2)
    try:
        await queue.enqueue("t1", JOB, request_id="r")
        server.stop()
        again = redis_factory(server.port, server.data_dir)
        await queue.enqueue("t2", JOB, request_id="r")  # a new server: NOSCRIPT, reloaded
        claim = await queue.claim("w", 5, 60_000)
        assert {j.task_id for j in claim.jobs} == {"t1", "t2"}
        assert again.port == server.port
    finally:
        await queue.close()
