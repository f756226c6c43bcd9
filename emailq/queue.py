"""The Redis queue and status store: the only module that knows key names.

Every key shares one hash tag, ``{<prefix>}``, so a Redis Cluster keeps them in one slot
and the Lua scripts below may touch several of them atomically::

    {emailq}:task:<id>         hash  status, to, attempts, reason, timestamps, attempt log,
                                     lane, request id, schedule/expiry, lease token, and
                                     the job until it is sent; its quota owner, and while
                                     it waits to be sent the job bytes charged ('bytes');
                                     the caller's metadata and tags ('labels', JSON)
    {emailq}:stored            hash  job bytes of every task waiting to be sent: 'total',
                                     and one field per quota owner (key:<id>,
                                     address:<client>, form:<id>), dropped at zero
    {emailq}:queue:<lane>      list  ready task ids, oldest first; lanes high/default/low
    {emailq}:scheduled         zset  task id -> due time (ms): send_at, and retries' backoff
    {emailq}:leases            zset  task id -> lease deadline (ms): tasks being sent
    {emailq}:wake              list  one token per ready task; idle workers BLPOP it
    {emailq}:failed            zset  task id -> failed at (ms): dead letters, newest last
    {emailq}:workers           zset  worker id -> last heartbeat (ms)
    {emailq}:fairness          str   claim counter that gives lower lanes their share
    {emailq}:stats:<s>:<min>   str   tasks finished with status s in that minute (2 h)
    {emailq}:done              pub/sub channel: a task id each time one finishes (sharded
                                     pub/sub, SPUBLISH, on a Redis Cluster)
    {emailq}:events            stream every state change of every task (EventType), written
                                     by the script that makes it; capped near
                                     EVENT_STREAM_MAXLEN entries
    {emailq}:webhooks:endpoints hash endpoint id -> its JSON (url, events, secrets, source,
                                     disabled state): WEBHOOKS_FILE's and the API's
    {emailq}:webhooks:delivery:<msg>  hash  one webhook delivery: endpoint, type, task id,
                                     payload, status, attempts, fencing token, log (final
                                     ones kept RESULT_TTL_SECONDS)
    {emailq}:webhooks:due      zset  delivery id -> next attempt due (ms), or the lease
                                     deadline of the attempt being made
    {emailq}:webhooks:index:<ep>   zset  delivery id -> created (ms): one endpoint's
    {emailq}:webhooks:failed:<ep>  zset  delivery id -> failed at (ms): its failed ones
    (consumer group 'webhooks' on {emailq}:events: where the dispatchers have read to)
    {emailq}:wait:fence        str   written before each WAIT (REDIS_WAIT_REPLICAS), so the
                               WAIT covers every earlier write, an idempotent replay's too
    {emailq}:relay:rate        hash  the relay's shared send rate (send_rate.lua): current
                                     rate, next free slot, last throttle cut (1 h)
    {emailq}:relay:worker:<id> str   one worker's circuit breaker state, JSON (3 leases)
    {emailq}:authfail:<addr>   str   failed API authentications from one client address in
                                     the current fixed window (expires with the window)
    {emailq}:idem:<scope>:<h>  hash  an Idempotency-Key's task id, request fingerprint and
                                     creation time (24 h); h = SHA-256 of the client's key.
                                     Contact forms use scope form:<id> and a key derived
                                     from client address + fields, kept 10 minutes

A job moves lane -> leases -> (done | scheduled -> lane). Scripts take their time from the
Redis server. Redis errors are converted to ``StoreUnavailable`` here, where they enter, and
a Redis at maxmemory (its OOM error) to ``StoreFull``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal, cast

from pydantic import ValidationError
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq import labels, redisconn, scriptcall
from emailq.errors import (
    NotConnected,
    QuotaExceeded,
    StoreFull,
    StoreOutcomeUnknown,
    StoreUnavailable,
    validation_message,
)
from emailq.models import (
    LANES,
    Attempt,
    ClaimedJob,
    Event,
    Job,
    LaneStats,
    MinuteCount,
    Priority,
    QueueGauges,
    QueueStats,
    RelayState,
    TaskRecord,
    WorkerRelay,
    WorkerStatus,
)  # fmt: skip
from emailq.rediscluster import ShardedListener
from emailq.redisconn import Client, Use
from emailq.settings import Settings
from emailq.startup import given_settings

Outcome = Literal["success", "retry", "failed"]
# What one queued task takes in Redis besides its job JSON (hash fields, lane entry,
# idempotency record): 1.4-1.8 KB measured with INFO memory on Redis 6.2 and 7.0
# (`python -m bench.memory`); the high end, for the headroom estimate.
TASK_OVERHEAD_BYTES = 1800
FAIR_EVERY = 10  # every 10th pop starts at a lower lane (see claim.lua)
EVENTS_MAXLEN = 100_000  # EVENT_STREAM_MAXLEN's default

_STATUS_FIELDS = (
    "status", "to", "attempts", "reason", "request_id", "created_at", "updated_at",
    "sent_at", "next_attempt_at", "lane", "scheduled_at", "expires_at", "log", "key_id",
    "labels",
)  # fmt: skip
IDEMPOTENCY_TTL_SECONDS = 24 * 3600  # how long an Idempotency-Key is remembered (as Stripe)
# One key, so no shared keys: count, and start the window's expiry with its first failure.
_AUTH_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""
_SCRIPTS = (
    "enqueue", "claim", "finish", "renew", "release", "cancel", "requeue", "stats", "guard",
    "gauges", "throughput", "workers",
)  # fmt: skip
NO_RELAY_STATE = "none"  # QueueGauges.relay's key for a live worker that published none
HISTORY_MINUTES = 120  # the per-minute counters are kept two hours (count_finished)


class Keys:
    """Key names under one hash-tagged prefix."""

    def __init__(self, prefix: str = "emailq") -> None:
        self.base = "{" + prefix + "}"
        self.task_prefix = f"{self.base}:task:"
        self.lane_prefix = f"{self.base}:queue:"
        self.stats_prefix = f"{self.base}:stats:"
        self.scheduled = f"{self.base}:scheduled"
        self.leases = f"{self.base}:leases"
        self.wake = f"{self.base}:wake"
        self.failed = f"{self.base}:failed"
        self.workers = f"{self.base}:workers"
        self.fairness = f"{self.base}:fairness"
        self.stored = f"{self.base}:stored"
        self.done_channel = f"{self.base}:done"
        self.events = f"{self.base}:events"
        self.relay_rate = f"{self.base}:relay:rate"
        self.wait_fence = f"{self.base}:wait:fence"
        self.relay_state_prefix = f"{self.base}:relay:worker:"
        self.webhook_endpoints = f"{self.base}:webhooks:endpoints"
        self.webhook_due = f"{self.base}:webhooks:due"
        self.webhook_delivery_prefix = f"{self.base}:webhooks:delivery:"
        self.webhook_index_prefix = f"{self.base}:webhooks:index:"
        self.webhook_failed_prefix = f"{self.base}:webhooks:failed:"
        self.webhook_group = "webhooks"  # the dispatchers' consumer group on the events

    def webhook_delivery(self, delivery_id: str) -> str:
        """One webhook delivery's hash."""
        return self.webhook_delivery_prefix + delivery_id

    def webhook_index(self, endpoint_id: str) -> str:
        """One webhook endpoint's deliveries, by creation time."""
        return self.webhook_index_prefix + endpoint_id

    def webhook_failed(self, endpoint_id: str) -> str:
        """One webhook endpoint's failed deliveries, by failure time."""
        return self.webhook_failed_prefix + endpoint_id

    def task(self, task_id: str) -> str:
        """The status hash of one task."""
        return self.task_prefix + task_id

    def lane(self, name: str) -> str:
        """The ready list of one priority lane."""
        return self.lane_prefix + name

    def relay_state(self, worker_id: str) -> str:
        """One worker's published circuit breaker state."""
        return self.relay_state_prefix + worker_id

    def idempotency(self, scope: str, client_key: str) -> str:
        """The record of one Idempotency-Key within one scope (an API key's id)."""
        # Hashed: the client's text never becomes part of a key name, and the name stays short.
        digest = hashlib.sha256(client_key.encode()).hexdigest()
        return f"{self.base}:idem:{scope}:{digest}"

    def auth_failures(self, client: str) -> str:
        """The failed-authentication counter of one client address."""
        return f"{self.base}:authfail:{client}"

    @property
    def rate_limit_prefix(self) -> str:
        """The prefix the ``limits`` storage puts before every rate-limit key it makes."""
        # limits appends ":<limit key>"; the hash tag keeps them in this prefix's slot.
        return f"{self.base}:ratelimit"

    def shared_keys(self) -> list[str]:
        """KEYS every script receives, in the order _prelude.lua reads them."""
        return [self.scheduled, self.leases, self.wake, self.failed, self.workers, self.fairness,
                self.stored, self.events]  # fmt: skip

    def shared_args(self, events_maxlen: int, publish: str = "PUBLISH") -> list[str | int]:
        """The first ARGV of every script: prefixes, the done channel, the event stream's
        cap, and the command that publishes on the done channel (SPUBLISH on a cluster)."""
        return [self.task_prefix, self.lane_prefix, self.stats_prefix, self.done_channel,
                events_maxlen, publish]  # fmt: skip


@dataclass(frozen=True)
class Claim:
    """What one claim call returned."""

    jobs: list[ClaimedJob]
    next_deadline_ms: int | None  # ms until the next scheduled or lease deadline, if any
    unreadable: list[Unreadable] = field(default_factory=list)
    # The worker of each lease that had lapsed and was put back (or failed, out of
    # attempts) by this call: its worker died or lost Redis. One call's, said once.
    lapsed_from: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unreadable:
    """A claimed task whose stored job does not parse (say, written by an incompatible
    version). It can never be sent: the worker fails it (``Queue.fail_unreadable``) rather
    than crash on it, and the rest of its claim goes ahead."""

    task_id: str
    token: str
    attempt: int
    error: str


@dataclass(frozen=True)
class StoreLimits:
    """What new mail may take of Redis; enqueue.lua checks all three in the step that
    stores, so concurrent requests cannot overshoot together. 0 turns a limit off."""

    max_stored_bytes: int = 0  # job bytes of all mail waiting to be sent (MAX_STORED_BYTES)
    max_stored_bytes_per_key: int = 0  # the same per quota owner (MAX_STORED_BYTES_PER_KEY)
    memory_headroom: float = 0.0  # share of maxmemory kept for workers (REDIS_MEMORY_HEADROOM)
    # Redis memory one task takes besides its job (hash fields, attempt log, lane entry,
    # idempotency record), for the headroom estimate; measured (see the README).
    task_overhead_bytes: int = TASK_OVERHEAD_BYTES


@dataclass(frozen=True)
class Replicas:
    """How many replicas must confirm a stored mail before it counts as stored, and how
    long to wait for them (REDIS_WAIT_REPLICAS, REDIS_WAIT_TIMEOUT_SECONDS). 0: no wait."""

    count: int = 0
    timeout_seconds: float = 0.25

    def check(self, confirmed: int) -> None:
        """``StoreOutcomeUnknown`` unless ``confirmed`` replicas are enough."""
        if confirmed < self.count:
            # Stored on the master, which sends it unless a failover loses it first.
            raise StoreOutcomeUnknown(
                f"stored on the Redis master, but {confirmed} of {self.count} replicas "
                f"(REDIS_WAIT_REPLICAS) confirmed it within {self.timeout_seconds}s: it may "
                "be sent, or lost if the master fails now"
            )


def _refusal(kind: str, need: int, held: int, limit: int) -> StoreFull | QuotaExceeded:
    """The error for a request enqueue.lua refused, naming the setting that refused it."""
    if kind == "memory":
        return StoreFull(
            f"Redis is nearly full ({held} of {limit} bytes used; REDIS_MEMORY_HEADROOM keeps "
            "the rest for sending queued mail); retry once queued mail is sent"
        )
    if kind == "total":
        return StoreFull(
            f"the queue holds {held} bytes of mail waiting to be sent, and this request needs "
            f"{need} more: over MAX_STORED_BYTES ({limit}); retry once queued mail is sent"
        )
    setting = f"MAX_STORED_BYTES_PER_KEY ({limit})"
    if need > limit:
        text = f"this request needs {need} bytes of storage, over {setting}; send it in parts"
    else:
        text = (
            f"this sender's mail waiting to be sent holds {held} bytes, and this request "
            f"needs {need} more: over {setting}; retry once some of it is sent"
        )
    return QuotaExceeded(text, need=need, held=held, limit=limit)


def _load_script(name: str) -> str:
    lua = resources.files("emailq") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a write because it is at maxmemory (noeviction)."""
    # redis-py maps a plain "-OOM" reply to OutOfMemoryError (a ResponseError); from inside a
    # script, Redis 6 wraps it as "ERR Error running script ...: -OOM command not allowed".
    if isinstance(exc, OutOfMemoryError):
        return True
    return isinstance(exc, ResponseError) and "OOM command not allowed" in str(exc)


FULL = "Redis is full (maxmemory reached); new mail is refused until queued mail is sent"


@contextmanager
def _store_errors(*, write: bool = False) -> Iterator[None]:
    """Redis errors as ``StoreUnavailable``. For a ``write``, an error after the command may
    have been sent (a timeout, a cut connection, a retry's reconnect) is
    ``StoreOutcomeUnknown`` instead: Redis may have run it, as a stalled one does when it
    resumes. A health-check PING failing counts as sent: unknown is the safe side."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        name = exc.__class__.__name__
        if write and not isinstance(exc, NotConnected):
            raise StoreOutcomeUnknown(f"Redis did not answer a write: {name}") from exc
        raise StoreUnavailable(f"Redis is unavailable: {redisconn.reason(exc)}") from exc
    except ResponseError as exc:
        if is_out_of_memory(exc):
            raise StoreFull(FULL) from exc
        raise


def _lane_stats(name: str, depth: int, oldest_ms: int, now_ms: int) -> LaneStats:
    age = None if oldest_ms < 0 else (now_ms - oldest_ms) / 1000
    return LaneStats(priority=Priority(name), depth=depth, oldest_age_seconds=age)


def _sliding(per_minute: list[int], minutes: int, now_ms: int) -> int:
    """Finished in the last ``minutes`` minutes, from per-clock-minute counters (newest first):
    the current partial minute, the full ones before it, and the share of the oldest one that
    still falls inside the window (the sliding-window estimate rate limiters use)."""
    elapsed = (now_ms % 60_000) / 60_000
    whole = sum(per_minute[:minutes])
    return round(whole + per_minute[minutes] * (1 - elapsed))


def _event(entry_id: str, fields: dict[str, str]) -> Event:
    values: dict[str, Any] = {k: v for k, v in fields.items() if v != ""}
    return Event.model_validate({"id": entry_id, **values})


# For emailq.webhooks.store, which reads the same stream under the same error rules.
store_errors = _store_errors
event_of = _event


def _record(task_id: str, raw: dict[str, Any]) -> TaskRecord:
    values = {k: v for k, v in raw.items() if v is not None}
    values["log"] = json.loads(values.get("log") or "[]")
    values.update(labels.decode(values.pop("labels", None)))
    if "lane" in values:
        values["priority"] = values.pop("lane")
    return TaskRecord.model_validate({"task_id": task_id, **values})


# A plain Redis (redis://, rediss://, unix://) or a Redis Cluster (emailq.rediscluster).


class Queue:
    """Enqueue, claim, renew, finish, read and manage tasks. Takes a ready client."""

    def __init__(
        self,
        redis: Client,
        *,
        prefix: str = "emailq",
        max_attempts: int = 3,
        result_ttl_seconds: int = 7 * 24 * 3600,
        success_ttl_seconds: int | None = None,
        limits: StoreLimits | None = None,
        events_maxlen: int = EVENTS_MAXLEN,
        replicas: Replicas | None = None,
    ) -> None:
        self.redis = redis
        self.replicas = replicas or Replicas()
        self.keys = Keys(prefix)
        self.max_attempts = max_attempts
        self.result_ttl_seconds = result_ttl_seconds
        # A success needs no requeue and is what most results are: keeping it for less
        # time is what frees memory after a drain (RESULT_TTL_SUCCESS_SECONDS).
        self.success_ttl_seconds = success_ttl_seconds or result_ttl_seconds
        self.limits = limits or StoreLimits()
        self.events_maxlen = events_maxlen
        # Sharded pub/sub keeps a cluster's notices on the shard that owns the channel; a
        # plain Redis keeps PUBLISH, which Redis before 7.0 also has.
        self.publish = "SPUBLISH" if isinstance(redis, RedisCluster) else "PUBLISH"
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(_load_script(name)) for name in _SCRIPTS
        }
        self._auth_failure = redis.register_script(_AUTH_FAILURE)
        # Script calls packed once and written directly where the client allows it (a plain
        # or Sentinel client from redisconn), by SHA; see emailq.scriptcall.
        self._lean_client = scriptcall.lean_client(redis)
        self._lean: dict[str, scriptcall.ScriptCall] = {}

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
        """Shortcut for tests and tools: a client for ``url`` (every other setting at its
        default, none read from the environment) with bounded connect and read times (see
        ``emailq.redisconn.connect``). ``url`` and ``timeout`` are validated as REDIS_URL and
        REDIS_TIMEOUT_SECONDS are: ``ConfigError`` names a wrong one."""
        settings = given_settings(redis_url=url, redis_timeout_seconds=timeout)
        use = Use(settings.redis_timeout_seconds, read_timeout, max_connections)
        return cls(redisconn.connect(settings, use), **kwargs)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, read_timeout: float | None = None, max_connections: int = 64
    ) -> Queue:
        """The queue ``settings`` describe: the one way an entry point builds it (the API,
        the worker, the CLI), so none can drift from the others on topology, prefix,
        attempts, result TTLs, storage limits or replicas to wait for. ``read_timeout`` and
        ``max_connections`` are how the caller uses it (see ``emailq.redisconn.connect``),
        not configuration."""
        use = Use(settings.redis_timeout_seconds, read_timeout, max_connections)
        return cls(
            redisconn.connect(settings, use),
            prefix=settings.redis_key_prefix,
            max_attempts=settings.max_attempts,
            result_ttl_seconds=settings.result_ttl_seconds,
            success_ttl_seconds=settings.result_ttl_success_seconds,
            events_maxlen=settings.event_stream_maxlen,
            limits=StoreLimits(
                settings.max_stored_bytes,
                settings.max_stored_bytes_per_key,
                settings.redis_memory_headroom,
            ),
            replicas=Replicas(settings.redis_wait_replicas, settings.redis_wait_timeout_seconds),
        )

    async def close(self) -> None:
        """Close the client and its pool."""
        await redisconn.close(self.redis)

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers."""
        with _store_errors():
            await self.redis.ping()

    async def unreachable(self) -> str | None:
        """Why Redis does not answer a PING now, or None if it does: for the line a program
        logs at start, so a wrong REDIS_URL is named at once, not by the first failure."""
        try:
            await self.ping()
        except StoreUnavailable as exc:
            return str(exc)
        except ResponseError as exc:  # an ACL user without PING: a start-up line, no more
            return f"Redis refused PING: {exc}"
        return None

    async def _run(self, script: str, *args: str | int | float, write: bool = False) -> Any:
        return await self.run_script(self._scripts[script], *args, write=write)

    async def run_script(
        self, script: AsyncScript, *args: str | int | float, write: bool = False
    ) -> Any:
        """Call a script made with ``_load_script`` (the prelude's shared keys and
        arguments first, then ``args``), with Redis errors converted (see _store_errors)."""
        call = self._lean.get(script.sha)
        if call is None and self._lean_client is not None:
            call = self._lean[script.sha] = scriptcall.ScriptCall(
                self._lean_client, script, self.keys.shared_keys(), self._shared_args()
            )
        with _store_errors(write=write):
            if call is not None:
                return await call(args)
            # A cluster (or a client not built by redisconn): redis-py's own path.
            return await script(self.keys.shared_keys(), [*self._shared_args(), *args])

    def _shared_args(self) -> list[str | int]:
        return self.keys.shared_args(self.events_maxlen, self.publish)

    # -- producing ----------------------------------------------------------------------

    def encode_task(self, item: EnqueueItem, once: Idempotency | None) -> str:
        """One task as the JSON array enqueue.lua decodes (see ``store_encoded``)."""
        keyed: list[str | int] = ["", "", 0]  # no idempotency key
        if once is not None:
            keyed = [self.keys.idempotency(once.scope, once.key), once.fingerprint,
                     once.ttl_seconds]  # fmt: skip
        job = item.job
        return json.dumps([item.task_id, item.lane, job.to, job.model_dump_json(),
                           item.request_id, item.send_at_ms, item.expires_at_ms, *keyed,
                           item.key_id, item.quota, item.labels])  # fmt: skip

    async def _enqueue_raw(self, encoded: Sequence[str], *, together: bool) -> list[Any]:
        limits = self.limits
        args = (limits.max_stored_bytes, limits.max_stored_bytes_per_key,
                repr(limits.memory_headroom), limits.task_overhead_bytes,
                "all" if together else "each", *encoded)  # fmt: skip
        if self.replicas.count:
            return list(await self._enqueue_replicated(args))
        # write: a failure says whether Redis may have stored them (_store_errors)
        return list(await self._run("enqueue", *args, write=True))

    async def _enqueue_replicated(self, args: Sequence[str | int]) -> Any:
        """enqueue.lua, then WAIT on the same connection (one pipeline, one round trip):
        WAIT counts the replicas that have this connection's writes so far."""
        script = self._scripts["enqueue"]
        keys = self.keys.shared_keys()
        argv = [*self.keys.shared_args(self.events_maxlen, self.publish), *args]
        replicas = self.replicas
        with _store_errors(write=True):
            for _ in range(2):  # a second time after loading the script (NOSCRIPT ran nothing)
                if isinstance(self.redis, RedisCluster):
                    await self.redis.initialize()  # the slot map, once; a no-op after that
                pipe = self.redis.pipeline(transaction=False)
                # execute_command: a cluster pipeline blocks its evalsha() helper, not this.
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
                # A replay writes nothing, and WAIT counts only this connection's writes:
                # one write here puts every earlier write (the replayed task's) under it.
                pipe.incr(self.keys.wait_fence)
                self._pipe_wait(pipe, replicas.count, max(1, int(replicas.timeout_seconds * 1000)))
                reply, _, confirmed = await pipe.execute(raise_on_error=False)
                if isinstance(reply, NoScriptError):
                    await self.redis.script_load(script.script)
                    continue
                return self._replicated(reply, confirmed)
            raise StoreOutcomeUnknown("Redis lost the enqueue script twice in a row")

    def _pipe_wait(self, pipe: Any, count: int, timeout_ms: int) -> None:
        if isinstance(self.redis, RedisCluster):
            # WAIT names no key: sent alone, the cluster client picks any node (and a
            # connection that wrote nothing "confirms" at once). Aimed at the node of the
            # slot, it rides the same connection as the writes before it in the pipeline.
            node = self.redis.get_node_from_key(self.keys.wait_fence)  # map read just before
            pipe.execute_command("WAIT", count, timeout_ms, target_nodes=node)
        else:
            pipe.wait(count, timeout_ms)

    def _replicated(self, reply: Any, confirmed: Any) -> Any:
        """enqueue.lua's reply once WAIT counted enough replicas; else the error it means."""
        if isinstance(reply, Exception):
            raise reply
        if all(isinstance(r, list) and r[0] == "refused" for r in reply):
            return reply  # nothing was stored: a refusal is the answer, replicas or not
        if isinstance(confirmed, Exception):
            # The script ran on a master that a failover demoted before the WAIT ("WAIT cannot
            # be used with replica instances"): its resync with the new master may drop it.
            demoted = StoreOutcomeUnknown(
                "stored on a Redis node that is a replica now (a failover?): it may be sent, "
                "or lost"
            )
            raise demoted from confirmed
        self.replicas.check(int(confirmed))
        return reply

    async def store_encoded(
        self, encoded: Sequence[str], *, together: bool = False
    ) -> list[Stored]:
        """``enqueue_all`` for tasks already passed through ``encode_task``: the coalescer
        encodes each task on its own, so one that cannot be encoded fails its request
        alone, not the others stored in the same call.

        Each task is a request of its own unless ``together``: then all are one request,
        stored all or none. Returns, per task, None if stored, the earlier task its
        idempotency key names, or the error its request was refused with (StoreFull,
        QuotaExceeded) when it did not fit the StoreLimits.
        """
        replies: list[Stored] = []
        for r in await self._enqueue_raw(encoded, together=together):
            if not isinstance(r, list):
                replies.append(None)
            elif r[0] == "refused":
                replies.append(_refusal(str(r[1]), int(r[2]), int(r[3]), int(r[4])))
            else:
                replies.append(Replay(task_id=str(r[0]), same_request=bool(r[1])))
        return replies

    async def enqueue_all(
        self, entries: Sequence[tuple[EnqueueItem, Idempotency | None]]
    ) -> list[Replay | None]:
        """Store several tasks in one atomic script call: no other client sees part of
        them, and a connection lost on the way cannot store part of them.

        Each entry's idempotency key is checked and recorded in the same step, so duplicates
        (concurrent, or within ``entries``) create one task. Returns, per entry, None if it
        was stored, or the earlier task its key names. Raises StoreFull or QuotaExceeded,
        having stored nothing, when the new tasks do not fit the StoreLimits together.
        """
        replies = await self.store_encoded([self.encode_task(i, o) for i, o in entries],
                                           together=True)  # fmt: skip
        stored: list[Replay | None] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            stored.append(reply)
        return stored

    async def enqueue(
        self,
        task_id: str,
        job: Job,
        *,
        request_id: str,
        lane: str = Priority.DEFAULT,
        send_at_ms: int = 0,
        expires_at_ms: int = 0,
        key_id: str = "",
    ) -> int:
        """Store the task and make it ready (or schedule it); returns its creation time."""
        item = EnqueueItem(task_id, job, request_id, lane, send_at_ms, expires_at_ms, key_id)
        (created,) = await self._enqueue_raw([self.encode_task(item, None)], together=True)
        if isinstance(created, list):  # refused: enqueue.lua stored nothing
            raise _refusal(str(created[1]), int(created[2]), int(created[3]), int(created[4]))
        return int(created)

    async def enqueue_once(
        self, item: EnqueueItem, idempotency: Idempotency | None
    ) -> Replay | None:
        """Enqueue unless ``idempotency``'s key was used in its scope: then store nothing and
        return the earlier task. Without a key it is a plain enqueue (returns None)."""
        (reply,) = await self.enqueue_all([(item, idempotency)])
        return reply

    async def enqueue_many(
        self, items: Sequence[EnqueueItem], idempotency: Idempotency | None = None
    ) -> list[Replay | None]:
        """Enqueue a batch in one atomic script call (see ``enqueue_all``).

        With ``idempotency`` (a batch's key, after ``guard_batch``), item *i* is stored only
        if ``<key>#<i>`` is new, so a repeated or concurrent identical batch creates each
        task once; returns, per item, None if stored or the earlier task."""
        return await self.enqueue_all([
            (item, None if idempotency is None
             else replace(idempotency, key=f"{idempotency.key}#{index}"))
            for index, item in enumerate(items)
        ])  # fmt: skip

    async def guard_batch(self, idempotency: Idempotency) -> bool | None:
        """Remember a batch's key: None if it is new, else whether the body matches the first."""
        record = self.keys.idempotency(idempotency.scope, idempotency.key)
        stored = await self._run("guard", record, idempotency.fingerprint, idempotency.ttl_seconds)
        return None if stored is None else stored == idempotency.fingerprint

    # -- reading ------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """The status of one task, or None if it is unknown or expired."""
        with _store_errors():
            values = await self.redis.hmget(self.keys.task(task_id), list(_STATUS_FIELDS))
        raw = dict(zip(_STATUS_FIELDS, values, strict=True))
        return None if raw["status"] is None else _record(task_id, raw)

    async def failed(self, *, offset: int = 0, limit: int = 50) -> list[TaskRecord]:
        """Dead letters, newest first."""
        with _store_errors():
            found = await self.redis.zrevrange(self.keys.failed, offset, offset + limit - 1)
            return await self._records([str(task_id) for task_id in found])

    async def _records(self, ids: list[str]) -> list[TaskRecord]:
        """The records of ``ids`` in order, leaving out any that expired meanwhile."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), list(_STATUS_FIELDS))
        rows = await pipe.execute()
        pairs = zip(ids, rows, strict=True)
        return [
            _record(t, dict(zip(_STATUS_FIELDS, row, strict=True))) for t, row in pairs if row[0]
        ]

    async def failed_matching(
        self, keep: Callable[[TaskRecord], bool], *, offset: int, limit: int, max_scan: int
    ) -> tuple[list[TaskRecord], int | None]:
        """Dead letters that ``keep`` accepts, newest first, read from position ``offset`` of
        the whole list: up to ``limit`` of them, reading at most ``max_scan`` entries (a
        rare label must not make one call read a week of dead letters). Returns them and the
        position to go on from, None once the list is read to its end."""
        found: list[TaskRecord] = []
        position, end = offset, offset + max_scan
        with _store_errors():
            total = int(await self.redis.zcard(self.keys.failed))
            while position < min(end, total) and len(found) < limit:
                stop = min(position + 500, end, total)
                ids = [str(t) for t in await self.redis.zrevrange(self.keys.failed, position,
                                                                  stop - 1)]  # fmt: skip
                if not ids:  # the list shrank meanwhile (expired or requeued dead letters)
                    total = position
                    break
                records = {r.task_id: r for r in await self._records(ids)}
                for task_id in ids:
                    position += 1
                    record = records.get(task_id)
                    if record is not None and keep(record):
                        found.append(record)
                        if len(found) == limit:
                            break
        return found, (position if position < total else None)

    async def failed_ids(self) -> list[str]:
        """Every dead letter's id, oldest first (for bulk requeue)."""
        with _store_errors():
            found = await self.redis.zrange(self.keys.failed, 0, -1)
        return [str(task_id) for task_id in found]

    async def stats(self, *, live_window_ms: int) -> QueueStats:
        """Depths, ages, workers and recent throughput, in one round trip."""
        reply = await self._run("stats", live_window_ms, self.keys.relay_state_prefix, *LANES)
        lanes, scheduled, in_flight, workers, failed, now, sent, failures, relay = reply
        return QueueStats(
            lanes=[_lane_stats(name, depth, oldest, now) for name, depth, oldest in lanes],
            scheduled=scheduled,
            in_flight=in_flight,
            live_workers=workers,
            failed=failed,
            sent_last_minute=_sliding(sent, 1, now),
            sent_last_hour=_sliding(sent, 60, now),
            failed_last_minute=_sliding(failures, 1, now),
            failed_last_hour=_sliding(failures, 60, now),
            relay=[WorkerRelay.model_validate_json(state) for state in relay],
        )

    async def gauges(self, *, live_window_ms: int) -> QueueGauges:
        """Depths, oldest ages, counts, stored bytes and live workers per relay state, in one
        round trip whose cost does not grow with the backlog (for /metrics)."""
        memory = 1 if self.limits.memory_headroom > 0 else 0
        reply = await self._run("gauges", memory, live_window_ms, self.keys.relay_state_prefix,
                                *LANES)  # fmt: skip
        now, lanes, scheduled, in_flight, failed, stored, states, used, maxmemory = reply
        relay = {str(state): 0 for state in (*RelayState, NO_RELAY_STATE)}
        for state in states:
            # Counted under a known name only: what becomes a label must not be Redis text.
            relay[state if state in relay else NO_RELAY_STATE] += 1
        return QueueGauges(
            lanes=[_lane_stats(name, depth, oldest, now) for name, depth, oldest in lanes],
            scheduled=scheduled, in_flight=in_flight, failed=failed, stored_bytes=stored,
            relay=relay,
            memory_used_bytes=None if int(used) < 0 else int(used),
            memory_max_bytes=None if int(maxmemory) < 0 else int(maxmemory),
        )  # fmt: skip

    async def throughput(self, minutes: int = HISTORY_MINUTES) -> list[MinuteCount]:
        """Tasks sent and failed per clock minute over the last ``minutes`` (at most the two
        hours the counters are kept), oldest first; the last one is the current minute."""
        minutes = max(1, min(minutes, HISTORY_MINUTES))
        now, sent, failed = await self._run("throughput", minutes)
        current = int(now) // 60_000
        return [
            MinuteCount(minute=(current - back) * 60_000, sent=int(s), failed=int(f))
            for back, s, f in reversed(list(zip(range(minutes), sent, failed, strict=True)))
        ]

    async def workers(self, *, live_window_ms: int) -> list[WorkerStatus]:
        """Workers heard from within ``live_window_ms``, most recent heartbeat first."""
        now, rows = await self._run("workers", live_window_ms, self.keys.relay_state_prefix)
        return [
            WorkerStatus(
                worker_id=worker_id, last_heartbeat=int(seen),
                heartbeat_age_seconds=max(0, int(now) - int(seen)) / 1000,
                relay=WorkerRelay.model_validate_json(state) if state else None,
            )
            for worker_id, seen, state in rows
        ]  # fmt: skip

    async def last_event_id(self, *, backlog: int = 0) -> str:
        """The id to read on after for what happens from now on ("0-0" while the stream is
        empty), or, with ``backlog``, for the last ``backlog`` events as well ("0-0" when
        there are no more than that)."""
        with _store_errors():
            newest: Any = await self.redis.xrevrange(self.keys.events, "+", "-", backlog + 1)
        return str(newest[backlog][0]) if len(newest) > backlog else "0-0"

    async def events(
        self, after_id: str = "0", *, count: int = 100, block_ms: int | None = None
    ) -> list[Event]:
        """Up to ``count`` events after stream entry ``after_id`` ("0": from the oldest
        kept), oldest first. Pass the last one's ``id`` to read on; nothing is lost between
        reads unless the stream's cap trims it first. With ``block_ms``, wait up to that long
        for one when there are none (the client's read timeout must allow for it)."""
        with _store_errors():
            if block_ms is None:
                reply: Any = await self.redis.xrange(self.keys.events, f"({after_id}", "+", count)
            else:
                reply = await self.redis.xread({self.keys.events: after_id}, count, block_ms)
                reply = reply[0][1] if reply else []
        # Entry ids and fields are str: the queue's client decodes responses.
        rows = cast("list[tuple[str, dict[str, str]]]", reply)
        return [_event(entry_id, fields) for entry_id, fields in rows]

    def done_listener(self) -> PubSub | ShardedListener:
        """A pub/sub connection for the channel that names each task as it finishes."""
        if isinstance(self.redis, RedisCluster):
            return ShardedListener(self.redis)
        return self.redis.pubsub(ignore_subscribe_messages=True)

    # -- working ------------------------------------------------------------------------

    def _claim_args(self, worker_id: str, count: int, lease_ms: int) -> list[str | int]:
        return [count, lease_ms, worker_id, self.max_attempts, self.result_ttl_seconds,
                FAIR_EVERY, *LANES]  # fmt: skip

    @staticmethod
    def _claimed(rows: list[Any], next_ms: Any, lapsed_from: list[Any] | None = None) -> Claim:
        claim = Claim([], None if int(next_ms) < 0 else int(next_ms),
                      lapsed_from=[str(w) for w in lapsed_from or ()])  # fmt: skip
        for task_id, token, attempt, payload, request_id, lane, expires_in in rows:
            try:
                job = Job.model_validate_json(payload or "")
            except ValidationError as exc:
                error = f"stored job is unreadable: {exc.error_count()} error(s), first: " \
                        f"{validation_message(exc.errors()[0])}"  # fmt: skip
                claim.unreadable.append(Unreadable(task_id, token, int(attempt), error))
                continue
            claim.jobs.append(ClaimedJob(task_id=task_id, token=token, attempt=int(attempt),
                                         request_id=request_id or None, job=job,
                                         lane=lane or None,
                                         expires_in_ms=None if int(expires_in) < 0
                                         else int(expires_in)))  # fmt: skip
        return claim

    async def claim(self, worker_id: str, count: int, lease_ms: int) -> Claim:
        """Claim up to ``count`` ready tasks under a lease, after moving due and lapsed work."""
        rows, next_ms, lapsed_from = await self._run(
            "claim", *self._claim_args(worker_id, count, lease_ms)
        )
        return self._claimed(rows, next_ms, lapsed_from)

    async def wait_for_work(self, block_seconds: float) -> bool:
        """Block in Redis until a task may be ready or ``block_seconds`` pass; no polling."""
        with _store_errors():
            return await self.redis.blpop([self.keys.wake], timeout=block_seconds) is not None

    async def renew(
        self, held: Sequence[ClaimedJob], lease_ms: int, *, worker_id: str
    ) -> list[str]:
        """Heartbeat, and extend the leases on ``held``; returns the ids whose lease was lost."""
        pairs = [value for c in held for value in (c.task_id, c.token)]
        return list(await self._run("renew", worker_id, lease_ms, *pairs))

    async def release(
        self, unstarted: Sequence[ClaimedJob], *, worker_id: str, retire: bool = True
    ) -> int:
        """Return unstarted tasks to their lane, uncounted; with ``retire``, also leave the
        live-worker list (a worker that is stopping)."""
        pairs = [value for c in unstarted for value in (c.task_id, c.token)]
        return int(await self._run("release", worker_id, "1" if retire else "0", *pairs))

    async def finish(
        self,
        claimed: ClaimedJob,
        outcome: Outcome,
        attempt: Attempt,
        *,
        reason: str = "",
        retry_in_ms: int = 0,
    ) -> str:
        """Record one attempt's outcome. Returns the outcome applied, 'stale' or 'ignored'
        (this call run again after its reply was lost answers as its first run did)."""
        [(applied, _)] = await self.finish_many([Finish(claimed, outcome, attempt, reason,
                                                        retry_in_ms)])  # fmt: skip
        return applied

    async def finish_and_claim(
        self,
        claimed: ClaimedJob,
        outcome: Outcome,
        attempt: Attempt,
        refill: Refill,
        *,
        reason: str = "",
        retry_in_ms: int = 0,
    ) -> tuple[str, Claim]:
        """``finish``, then ``claim`` for ``refill`` in the same script: one round trip."""
        done = Finish(claimed, outcome, attempt, reason, retry_in_ms, refill)
        [(applied, claim)] = await self.finish_many([done])
        assert claim is not None  # a refill always gets a Claim, if an empty one
        return applied, claim

    async def finish_many(self, finishes: Sequence[Finish]) -> list[tuple[str, Claim | None]]:
        """Record several outcomes in one script call, in order, then claim what their
        refills ask for in all. Each gets the outcome applied ('stale', 'ignored') and, if
        it asked for a refill, its share of the claimed jobs (fewer, or none, when the lanes
        run dry: the first in order are served first). A Redis error is every one's."""
        args: list[str | int] = [self.result_ttl_seconds, self.success_ttl_seconds,
                                 len(finishes)]  # fmt: skip
        for done in finishes:
            entry = done.attempt.model_dump_json(exclude_none=True)
            args += [done.held.task_id, done.held.token, done.outcome, entry, done.reason,
                     done.retry_in_ms]  # fmt: skip
        refills = [done.refill for done in finishes if done.refill is not None]
        if not refills:
            return [(str(applied), None) for applied in await self._run("finish", *args)]
        if len({(r.worker_id, r.lease_ms) for r in refills}) > 1:
            raise ValueError("one finish_many call claims for one worker under one lease")
        total = sum(r.count for r in refills)
        claim = self._claim_args(refills[0].worker_id, total, refills[0].lease_ms)
        applied, rows, next_ms, lapsed_from = await self._run("finish", *args, *claim)
        shares: list[tuple[str, Claim | None]] = []
        for done, outcome in zip(finishes, applied, strict=True):
            if done.refill is None:
                shares.append((str(outcome), None))
                continue
            share = self._claimed(rows[: done.refill.count], next_ms, lapsed_from)
            shares.append((str(outcome), share))
            rows = rows[done.refill.count :]
            lapsed_from = []  # the first share reports them; the rest would repeat it
        return shares

    async def fail_unreadable(self, lost: Unreadable) -> str:
        """Fail a claimed task whose job cannot be read: permanent, nothing was sent."""
        entry = Attempt(attempt=lost.attempt, outcome="failed", reply=lost.error)
        [(applied, _)] = await self.finish_many([Finish(lost, "failed", entry, lost.error)])
        return applied

    # -- managing -----------------------------------------------------------------------

    async def cancel(self, task_id: str) -> str:
        """Cancel a pending task: 'cancelled', 'sending', 'success', 'failed' or 'missing'."""
        return str(await self._run("cancel", task_id, self.result_ttl_seconds))

    async def note_auth_failure(self, client: str, window_ms: int) -> tuple[int, int]:
        """Count one failed authentication from ``client`` in its fixed window; returns the
        count so far and the ms until the window ends."""
        with _store_errors():
            count, left_ms = await self._auth_failure([self.keys.auth_failures(client)],
                                                      [window_ms])  # fmt: skip
        return int(count), max(int(left_ms), 0)

    async def requeue(self, task_ids: Sequence[str]) -> list[str]:
        """Send failed tasks again with fresh attempts; returns the ids requeued."""
        if not task_ids:
            return []
        return list(await self._run("requeue", *task_ids))


@dataclass(frozen=True)
class EnqueueItem:
    """One task for ``Queue.enqueue_many``."""

    task_id: str
    job: Job
    request_id: str
    lane: str = Priority.DEFAULT
    send_at_ms: int = 0
    expires_at_ms: int = 0
    key_id: str = ""  # the API key that created it; only it (and admin keys) may read it
    # Whose MAX_STORED_BYTES_PER_KEY budget it draws on: key:<id>, address:<client> without
    # API_KEYS, form:<id>; "" (the CLI) draws on the total only.
    quota: str = ""
    labels: str = ""  # metadata and tags as emailq.labels.encode stores them; '' for none


@dataclass(frozen=True)
class Refill:
    """A claim made along with a finish: for whom, how many, and under what lease."""

    worker_id: str
    count: int
    lease_ms: int


@dataclass(frozen=True)
class Finish:
    """One attempt's outcome for ``Queue.finish_many``, and the claim to make with it."""

    held: ClaimedJob | Unreadable
    outcome: Outcome
    attempt: Attempt
    reason: str = ""
    retry_in_ms: int = 0
    refill: Refill | None = None  # claim this slot's next job(s) in the same call


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key, the scope it is unique in, and a fingerprint of its request."""

    scope: str
    key: str  # as the client sent it; Keys.idempotency hashes it
    fingerprint: str
    ttl_seconds: int = IDEMPOTENCY_TTL_SECONDS  # contact forms' duplicate window is shorter


@dataclass(frozen=True)
class Replay:
    """An Idempotency-Key seen before: the task it created, and whether the request matched."""

    task_id: str
    same_request: bool


Stored = Replay | None | StoreFull | QuotaExceeded  # one task's answer from enqueue.lua
