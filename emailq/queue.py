"""The Redis queue and status store: the only module that knows key names.

Every key shares one hash tag, ``{<prefix>}``, so a Redis Cluster keeps them in one slot
and the Lua scripts below may touch several of them atomically::

    {emailq}:task:<id>      hash  status, to, attempts, reason, timestamps, attempt log,
                                  lane, request id, lease token, and the job until sent
    {emailq}:queue:<lane>   list  ready task ids, oldest first ("default"; priority lanes
                                  are more lists, claimed highest first)
    {emailq}:scheduled      zset  task id -> due time (ms): retries waiting for backoff
    {emailq}:leases         zset  task id -> lease deadline (ms): tasks being sent
    {emailq}:wake           list  one token per ready task; idle workers BLPOP it

A job moves lane -> leases -> (done | scheduled -> lane). Scripts take their time from the
Redis server. Redis errors are converted to ``StoreUnavailable`` here, where they enter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq.errors import StoreUnavailable
from emailq.models import Attempt, ClaimedJob, Job, TaskRecord

LANES: tuple[str, ...] = ("default",)
Outcome = Literal["success", "retry", "failed"]

_STATUS_FIELDS = (
    "status", "to", "attempts", "reason", "request_id",
    "created_at", "updated_at", "sent_at", "next_attempt_at", "log",
)  # fmt: skip


class Keys:
    """Key names under one hash-tagged prefix."""

    def __init__(self, prefix: str = "emailq") -> None:
        self.base = "{" + prefix + "}"
        self.task_prefix = f"{self.base}:task:"
        self.lane_prefix = f"{self.base}:queue:"
        self.scheduled = f"{self.base}:scheduled"
        self.leases = f"{self.base}:leases"
        self.wake = f"{self.base}:wake"

    def task(self, task_id: str) -> str:
        """The status hash of one task."""
        return self.task_prefix + task_id

    def lane(self, name: str) -> str:
        """The ready list of one priority lane."""
        return self.lane_prefix + name


@dataclass(frozen=True)
class Claim:
    """What one claim call returned."""

    jobs: list[ClaimedJob]
    next_deadline_ms: int | None  # ms until the next retry or lease deadline, if any


def _load_script(name: str) -> str:
    lua = resources.files("emailq") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unavailable: {exc.__class__.__name__}") from exc


class Queue:
    """Enqueue, claim, renew, finish and read tasks. Takes a ready client; opens nothing."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "emailq",
        max_attempts: int = 3,
        result_ttl_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.max_attempts = max_attempts
        self.result_ttl_seconds = result_ttl_seconds
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(_load_script(name))
            for name in ("enqueue", "claim", "finish", "renew", "release")
        }

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float,
        read_timeout: float | None = None,
        max_connections: int = 64,
        **kwargs: Any,
    ) -> Queue:
        """Shortcut: a client for ``url`` with bounded connect and read times, then ``Queue``.

        One immediate retry replaces a pooled connection that died with a Redis restart;
        more retries (redis-py's default) would stretch the API's 503 past its bound.
        ``read_timeout`` must exceed any blocking wait the caller makes. The pool blocks
        (up to ``timeout``) when all connections are busy: redis-py's plain pool raises
        MaxConnectionsError at once instead, which would turn a burst into 503s.
        """
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=read_timeout or timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        return cls(aioredis.Redis(connection_pool=pool), **kwargs)

    async def close(self) -> None:
        """Close the client and its pool."""
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers."""
        with _store_errors():
            await self.redis.ping()

    async def enqueue(
        self, task_id: str, job: Job, *, request_id: str, lane: str = "default"
    ) -> int:
        """Store the task and its job and make it ready; returns the creation time (ms)."""
        keys = [self.keys.task(task_id), self.keys.lane(lane), self.keys.wake]
        args = [task_id, lane, job.to, job.model_dump_json(), request_id]
        with _store_errors():
            return int(await self._scripts["enqueue"](keys, args))

    async def get(self, task_id: str) -> TaskRecord | None:
        """The status of one task, or None if it is unknown or expired."""
        with _store_errors():
            values = await self.redis.hmget(self.keys.task(task_id), list(_STATUS_FIELDS))
        raw = dict(zip(_STATUS_FIELDS, values, strict=True))
        if raw["status"] is None:
            return None
        raw["log"] = json.loads(raw["log"] or "[]")
        return TaskRecord.model_validate(
            {"task_id": task_id, **{k: v for k, v in raw.items() if v is not None}}
        )

    async def claim(self, worker_id: str, count: int, lease_ms: int) -> Claim:
        """Claim up to ``count`` ready tasks under a lease, after moving due and lapsed work."""
        keys = [self.keys.scheduled, self.keys.leases, self.keys.wake]
        keys += [self.keys.lane(name) for name in LANES]
        args: list[str | int] = [
            self.keys.task_prefix, self.keys.lane_prefix, count, lease_ms, worker_id,
            self.max_attempts, self.result_ttl_seconds,
        ]  # fmt: skip
        with _store_errors():
            rows, next_ms = await self._scripts["claim"](keys, args)
        jobs = [
            ClaimedJob(
                task_id=task_id,
                token=token,
                attempt=int(attempt),
                request_id=request_id or None,
                job=Job.model_validate_json(payload),
            )
            for task_id, token, attempt, payload, request_id in rows
        ]
        return Claim(jobs, None if int(next_ms) < 0 else int(next_ms))

    async def wait_for_work(self, block_seconds: float) -> bool:
        """Block in Redis until a task may be ready or ``block_seconds`` pass; no polling."""
        with _store_errors():
            return await self.redis.blpop([self.keys.wake], timeout=block_seconds) is not None

    async def renew(self, held: Sequence[ClaimedJob], lease_ms: int) -> list[str]:
        """Extend the leases on ``held``; returns the ids whose lease was lost."""
        if not held:
            return []
        args: list[str | int] = [self.keys.task_prefix, lease_ms]
        for claimed in held:
            args += [claimed.task_id, claimed.token]
        with _store_errors():
            return list(await self._scripts["renew"]([self.keys.leases], args))

    async def release(self, unstarted: Sequence[ClaimedJob]) -> int:
        """Return claimed-but-unstarted tasks to the front of their lane, uncounted."""
        if not unstarted:
            return 0
        args: list[str | int] = [self.keys.task_prefix, self.keys.lane_prefix]
        for claimed in unstarted:
            args += [claimed.task_id, claimed.token]
        with _store_errors():
            return int(await self._scripts["release"]([self.keys.leases, self.keys.wake], args))

    async def finish(
        self,
        claimed: ClaimedJob,
        outcome: Outcome,
        attempt: Attempt,
        *,
        reason: str = "",
        retry_in_ms: int = 0,
    ) -> str:
        """Record one attempt's outcome. Returns the outcome applied, 'stale' or 'ignored'."""
        keys = [self.keys.task(claimed.task_id), self.keys.leases, self.keys.scheduled,
                self.keys.wake]  # fmt: skip
        entry = attempt.model_dump_json(exclude_none=True)
        args: list[str | int] = [
            claimed.task_id, claimed.token, outcome, entry, reason, retry_in_ms,
            self.result_ttl_seconds,
        ]  # fmt: skip
        with _store_errors():
            return str(await self._scripts["finish"](keys, args))
