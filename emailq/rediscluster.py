"""Redis Cluster: ``REDIS_URL=redis+cluster://[user:password@]h1:7000,h2:7001/``.

Every key of one ``REDIS_KEY_PREFIX`` carries the hash tag ``{prefix}`` (see
``emailq.queue.Keys``), so it lives in one slot, on one shard: redis-py's asyncio
``RedisCluster`` sends every command, script and pipeline of the queue to that shard's
master, and finds the new one after a failover (a MOVED reply, a refused connection or
CLUSTERDOWN makes it read the slot map again). What this module adds to it:

* the URL: redis-py's ``from_url`` takes one host; the startup nodes are a list;
* the API's "not stored" versus "outcome unknown": ``NotConnected`` when no command of the
  call reached a socket or every one that did was answered with a refusal (CLUSTERDOWN
  while no master owns the slot, TRYAGAIN, a redirect loop), so nothing ran; an error after
  a command was sent and its reply never came stays a connection error, whose outcome is
  unknown. CLUSTERDOWN is a ``ResponseError`` to redis-py, an outage here;
* a bounded wait for a free connection, as ``emailq.queue._Pool`` waits (redis-py's cluster
  raises MaxConnectionsError at once, which would turn a burst into 503s);
* one retry, after the slot map is read again, on a connection error or CLUSTERDOWN, and
  none after a timeout (a stalled node times out again, and a retry could run twice);
* ``ShardedListener``: the done channel as sharded pub/sub (SSUBSCRIBE to the shard that
  owns ``{prefix}:done``; the scripts SPUBLISH to it), which keeps each notice on one shard
  instead of broadcasting it on the cluster bus to every node. Needs Redis 7.0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, ClusterPubSub, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq.errors import NotConnected, closed_transport_is_dropped

SCHEMES = ("redis+cluster", "rediss+cluster")  # rediss+: TLS to every node
_T = TypeVar("_T")

# A connection error, or the cluster refusing or failing to route a command.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterError, TryAgainError,
                RedisClusterException)  # fmt: skip


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster."""
    return url.partition("://")[0].lower() in SCHEMES


@dataclass(frozen=True)
class ClusterAddress:
    """What a ``redis+cluster://`` URL says: startup nodes, credentials, TLS."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_cluster_url(url: str) -> ClusterAddress:
    """The startup nodes and credentials of ``url``; ValueError (never quoting the
    password) when it is not ``redis+cluster://[user:password@]host:port[,host:port...]/``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"not a Redis Cluster URL (scheme must be one of {', '.join(SCHEMES)})")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only: leave the path empty")
    if parts.query:
        raise ValueError("a Redis Cluster URL takes no query options")
    nodes = tuple(_node(entry) for entry in hosts.split(",") if entry.strip())
    if not nodes:
        raise ValueError("a Redis Cluster URL names at least one node: host:port[,host:port]")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    return ClusterAddress(nodes, unquote(username) or None, unquote(password) or None,
                          tls=parts.scheme.lower() == "rediss+cluster")  # fmt: skip


def _node(entry: str) -> tuple[str, int]:
    host, colon, port = entry.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Redis Cluster node is host:port (got {entry.strip()!r})")
    return host.strip("[]"), int(port)


class NotACluster(NotConnected):
    """A startup node answered, but not in cluster mode: REDIS_URL says redis+cluster:// for
    a plain Redis. Its name is what the outage's log line and the CLI's error show."""


class _Call:
    """One command (or pipeline) as the client made it: did a reply go missing?"""

    lost = False  # a command was sent and its reply never came: it may have run


_CALL: ContextVar[_Call | None] = ContextVar("emailq_cluster_call", default=None)


@contextmanager
def _lost_on_error() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError):
        call = _CALL.get()
        if call is not None:
            call.lost = True
        raise


@contextmanager
def _closed_under_us() -> Iterator[None]:
    """redis-py's cluster client, on CLUSTERDOWN, closes every connection of every node,
    those other tasks are using included: their socket is then gone mid-call, which shows
    as an AttributeError on it. A lost connection, like any other; so is a write on a
    transport uvloop has closed (``closed_transport_is_dropped``)."""
    try:
        with closed_transport_is_dropped():
            yield
    except AttributeError as exc:
        raise RedisConnectionError("connection closed while in use") from exc


class _CountedConnection(Connection):
    """A node connection that tells its call when a command went out unanswered."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        with _closed_under_us():  # outside: a send without a socket sent nothing
            if not self.is_connected:  # a failure here sent nothing
                await self.connect_check_health(check_health=False)
            with _lost_on_error():
                await super().send_packed_command(command, check_health)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        with _lost_on_error(), _closed_under_us():
            return await super().read_response(*args, **kwargs)


class _CountedSSLConnection(SSLConnection, _CountedConnection):
    """``_CountedConnection`` over TLS."""


def _converted(exc: BaseException, call: _Call) -> BaseException:
    """The error a failed call raises: ``NotConnected`` when nothing can have run."""
    name = exc.__class__.__name__
    lost = RedisConnectionError(f"Redis Cluster: {name} after a reply was lost")
    if isinstance(exc, NotConnected):  # our own (NotACluster says more): kept, unless an
        return lost if call.lost else exc  # earlier attempt of the call may have run
    if not call.lost:
        return NotConnected(f"Redis Cluster: {name}: {exc}")
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return exc
    return lost  # a refusal after an earlier attempt's reply went missing


class QueueCluster(RedisCluster):
    """redis-py's asyncio ``RedisCluster`` with this project's error and pool semantics."""

    # Retried (once, see cluster_client) after the slot map is read again. Not a timeout:
    # a stalled node times out again, and the stalled command may still run.
    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # redis-py types its own 4-tuple
        RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # fmt: skip

    def __init__(self, *args: Any, pool_timeout: float, max_in_flight: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        counted = _CountedSSLConnection if kwargs.get("ssl") else _CountedConnection
        # redis-py fixes the node connection class; later nodes are made from this dict.
        self.connection_kwargs["connection_class"] = counted
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = counted
        self._pool_timeout = pool_timeout
        self._in_flight = asyncio.Semaphore(max_in_flight)

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._in_flight.acquire(), self._pool_timeout)
        except TimeoutError:
            raise NotConnected(f"no free Redis connection in {self._pool_timeout}s") from None
        try:
            yield
        finally:
            self._in_flight.release()

    async def accounted(self, run: Callable[[], Awaitable[_T]]) -> _T:
        """``run()``, with its Redis errors converted (see the module docstring)."""
        call = _Call()
        token = _CALL.set(call)
        try:
            async with self._slot():
                return await run()
        except _UNAVAILABLE as exc:
            raise _converted(exc, call) from exc
        finally:
            _CALL.reset(token)

    async def initialize(self, *args: Any, **kwargs: Any) -> QueueCluster:
        """Read the slot map from a startup node (see ``RedisCluster.initialize``); none
        reachable, or none in cluster mode, is ``NotConnected``: multi-key commands (DEL,
        EXISTS) call this before their pipeline, outside ``execute_command``."""
        try:
            await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            # redis-py says so only in words (CLUSTER SLOTS refused by a plain Redis).
            plain = "Cluster mode is not enabled" in str(exc)
            raise (NotACluster if plain else NotConnected)(f"Redis Cluster: {exc}") from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command on the node that owns its slot (see ``accounted``)."""
        return await self.accounted(lambda: super(QueueCluster, self).execute_command(
            *args, **kwargs))  # fmt: skip

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        """A pipeline (or MULTI, with ``transaction``) whose ``execute`` is accounted."""
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # As redis-py's own pipeline(): its stubs call an attribute set at runtime abstract.
        return _Pipeline(self, transaction)  # type: ignore[abstract]


class _Pipeline(ClusterPipeline):
    """A cluster pipeline whose errors ``QueueCluster.accounted`` converts."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
                      ) -> list[Any]:  # fmt: skip
        """Send the queued commands (see ``ClusterPipeline.execute``)."""
        client = self.cluster_client
        assert isinstance(client, QueueCluster)
        return await client.accounted(lambda: super(_Pipeline, self).execute(
            raise_on_error, allow_redirections))  # fmt: skip


def cluster_client(
    url: str, *, timeout: float, read_timeout: float, max_connections: int,
    tls: dict[str, Any] | None = None,
) -> QueueCluster:  # fmt: skip
    """A cluster client for ``url`` with the connect and read bounds of
    ``emailq.redisconn.connect``; at most ``max_connections`` calls in flight, each
    waiting up to ``timeout`` for its turn. ``tls``: redis-py's ssl_* options
    (REDIS_TLS_*), for a rediss+cluster:// URL."""
    address = parse_cluster_url(url)
    return QueueCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        **(tls or {}),
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=read_timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        # Per node: the calls in flight, and spare for the done channel's subscription.
        max_connections=max_connections + 2,
        pool_timeout=timeout,
        max_in_flight=max_connections,
    )


class ShardedListener:
    """The done channel as sharded pub/sub on the shard that owns it, with the methods
    ``emailq.waiting`` uses of a ``PubSub``. A failover, a moved slot or a lost connection
    ends it with a ``RedisConnectionError``; the waiter then makes a new one."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._pubsub: ClusterPubSub | None = None

    async def subscribe(self, channel: str) -> None:
        """SSUBSCRIBE on the current owner of ``channel``'s slot."""
        # A keyed read through the client first: it fails over to a fresh slot map if the
        # one cached points at a dead master, so the subscription goes to the live one.
        await self._cluster.exists(channel)
        self._pubsub = self._cluster.pubsub()
        with _as_connection_error():
            await self._pubsub.ssubscribe(channel)

    async def get_message(
        self,
        *,
        ignore_subscribe_messages: bool = True,
        timeout: float = 0.0,  # noqa: ASYNC109  # the name PubSub.get_message gives it
    ) -> dict[str, Any] | None:
        """The next notice, or None after ``timeout``."""
        if self._pubsub is None:
            raise RedisConnectionError("not subscribed")
        with _as_connection_error():
            message = await self._pubsub.get_sharded_message(timeout=timeout)
        if message is None or message["type"] == "ssubscribe":
            return None
        if message["type"] == "sunsubscribe":  # the server moved the slot away from us
            raise RedisConnectionError("shard channel unsubscribed by the server")
        return message

    async def aclose(self) -> None:
        """Drop the subscription and its connection."""
        if self._pubsub is not None:
            await self._pubsub.aclose()


@contextmanager
def _as_connection_error() -> Iterator[None]:
    """Routing errors of a subscription (MOVED, CLUSTERDOWN, no owner) as a lost one."""
    try:
        yield
    except (ClusterError, MovedError, TryAgainError, RedisClusterException) as exc:
        raise RedisConnectionError(f"Redis Cluster: {exc.__class__.__name__}") from exc
