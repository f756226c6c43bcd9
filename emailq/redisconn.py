"""How a Redis client is built from ``Settings``: the one place that knows the topologies.

``REDIS_URL`` takes one of::

    redis://[user:password@]host:port/db      a plain node (an ACL user, or a password only)
    rediss://[user:password@]host:port/db     the same over TLS (REDIS_TLS_* settings)
    unix:///path/redis.sock?db=0              a local socket
    redis+sentinel://[user:password@]h1:26379,h2:26379/service[/db]
                                              the master Sentinel names for ``service``;
                                              rediss+sentinel:// speaks TLS to both
    redis+cluster://h1:7000,h2:7001           Redis Cluster (emailq.rediscluster)

The user and password in the URL are the data nodes'; Sentinel's own are
REDIS_SENTINEL_USERNAME and REDIS_SENTINEL_PASSWORD. ``check_url`` runs when ``Settings``
is built, so a bad URL is one line at startup (never echoing the URL: it may hold a
password).

Every client's pool is a blocking pool whose own connect failures are ``NotConnected``: no
command was sent, which is how the API tells a 503 "not stored" from "outcome unknown". A
Sentinel pool asks the sentinels for the master at each new connection, so after a failover
the next connection goes to the new master with no restart. A node that answers READONLY
(a master demoted to replica, while clients still hold connections to it) is dropped the
same way, as ``NotConnected``: a replica ran nothing.
"""

from __future__ import annotations

import functools
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq import rediscluster
from emailq.errors import ConfigError, NotConnected, closed_transport_is_dropped

if TYPE_CHECKING:
    from emailq.settings import Settings

log = logging.getLogger("emailq.redis")

DIRECT_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_SENTINEL_PORT = 26379

Client = aioredis.Redis | RedisCluster  # what ``connect`` returns; Queue takes either


def reason(exc: BaseException) -> str:
    """Why Redis could not be used, in a few words: the error's name, and the settings to
    check when it is a configuration's fault (a login or TLS refused, no master known).
    Never the URL, nor anything of the password."""
    cause = exc.__cause__ if isinstance(exc, NotConnected) and exc.__cause__ else exc
    if isinstance(cause, AuthenticationError):
        return "login refused (check the user and password in REDIS_URL)"
    if isinstance(cause, MasterNotFoundError):
        return ("no master known (a failover under way; else check the sentinels and "
                "service in REDIS_URL, and REDIS_SENTINEL_USERNAME/PASSWORD)")  # fmt: skip
    if "SSL" in str(cause) or "certificate" in str(cause):
        return "TLS failed (check REDIS_TLS_CA_FILE, REDIS_TLS_CERT_FILE, REDIS_VALIDATE_CERTS)"
    if isinstance(cause, ResponseError) and _is_read_only(cause):
        return "READONLY (the node is a replica now: a failover?)"
    # redis-py's own texts name the host and port at most ("Error 111 connecting to ...").
    return f"{cause.__class__.__name__}: {cause}" if str(cause) else cause.__class__.__name__


# -- parsing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None  # the data nodes' ACL user and password (the URL's user info)
    password: str | None
    tls: bool


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ('' if it has none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def _user_info(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts) of a netloc; empty parts are None."""
    if "@" not in netloc:
        return None, None, netloc
    info, _, hosts = netloc.rpartition("@")
    user, _, password = info.partition(":")
    return unquote(user) or None, unquote(password) or None, hosts


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        # Only the host list is quoted: the user info (a password) never is.
        raise ConfigError(f"REDIS_URL: {text!r} is not host:port")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, service and db of a ``redis+sentinel://`` URL, or ``ConfigError``."""
    scheme = scheme_of(url)
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    username, password, hosts = _user_info(netloc)
    sentinels = tuple(_host_port(h.strip(), DEFAULT_SENTINEL_PORT)
                      for h in hosts.split(",") if h.strip())  # fmt: skip
    if not sentinels:
        raise ConfigError("REDIS_URL: a redis+sentinel:// URL needs at least one sentinel "
                          "host:port")  # fmt: skip
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts or len(parts) > 2:
        raise ConfigError("REDIS_URL: a redis+sentinel:// URL ends in /service_name or "
                          "/service_name/db (as named in `sentinel monitor`)")  # fmt: skip
    db = parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        raise ConfigError(f"REDIS_URL: the database after the service name must be a number "
                          f"(got {db[:20]!r})")  # fmt: skip
    return SentinelTarget(sentinels, unquote(parts[0]), int(db), username, password,
                          tls=scheme.startswith("rediss"))  # fmt: skip


def _check_direct(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
        aioredis.connection.parse_url(url)
    except ValueError as exc:
        # redis-py's message may quote the URL: say what is wrong without it.
        bad_port = "port" in str(exc).lower()
        what = "its port must be a number from 1 to 65535" if bad_port else "it does not parse"
        raise ConfigError(f"REDIS_URL: {what}") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("REDIS_URL: no host")


def check_url(url: str) -> str:
    """``url`` if it names a topology this build connects to, else ``ConfigError`` in one
    line that never quotes the URL's user info."""
    scheme = scheme_of(url)
    if scheme in DIRECT_SCHEMES:
        _check_direct(url)
    elif scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme in CLUSTER_SCHEMES:
        try:
            rediscluster.parse_cluster_url(url)
        except ValueError as exc:  # its messages never quote the password
            raise ConfigError(f"REDIS_URL: {exc}") from None
    else:
        shown = repr(scheme) if scheme else "none"
        raise ConfigError(
            f"REDIS_URL: the scheme must be redis://, rediss://, unix://, redis+sentinel:// "
            f"or redis+cluster:// (got {shown})"
        )
    return url


# -- TLS ----------------------------------------------------------------------------------


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's ssl_* options for REDIS_TLS_* and REDIS_VALIDATE_CERTS."""
    options: dict[str, Any] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if settings.redis_validate_certs else ssl.CERT_NONE,
        "ssl_check_hostname": settings.redis_validate_certs,
    }
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None:
        options["ssl_certfile"] = str(settings.redis_tls_cert_file)
        options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return options


def uses_tls(url: str) -> bool:
    """Whether ``url`` speaks TLS (rediss:// or rediss+sentinel://)."""
    return scheme_of(url).startswith("rediss")


@functools.cache
def _warn_unverified(url: str, verify: bool) -> None:
    # Once per process and URL, though the API builds two clients (queue, rate limits).
    if uses_tls(url) and not verify:
        log.warning("REDIS_VALIDATE_CERTS=false: the Redis server's certificate is not "
                    "checked, so anyone on the network path can pose as Redis")  # fmt: skip


# -- pools --------------------------------------------------------------------------------


def _is_read_only(exc: ResponseError) -> bool:
    # Redis 7 answers READONLY (redis-py's ReadOnlyError), from inside a script too; Redis 6
    # wraps a script's as "ERR Error running script ...: -READONLY ...".
    return isinstance(exc, ReadOnlyError) or "-READONLY" in str(exc)


class _ClosedTransportIsDropped(AbstractConnection):
    """A write on a transport uvloop has closed is a dropped connection, as it is on
    asyncio's loop: redis-py's retry and our store errors then treat it like any other,
    instead of a RuntimeError stopping the worker's claim loop."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        with closed_transport_is_dropped():  # redis-py has already dropped the connection
            await super().send_packed_command(command, check_health)


class _ReadOnlyIsNotConnected(_ClosedTransportIsDropped):
    """A reply of READONLY means this node is a replica now (a failover demoted it): nothing
    ran. Drop the connection, so the next one finds the master (Sentinel asks again; a plain
    URL resolves its name again), and say ``NotConnected`` so the call retries once."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not _is_read_only(exc):
                raise
            await self.disconnect()
            raise NotConnected("Redis answered READONLY: it is a replica now") from exc


class _TcpConnection(_ReadOnlyIsNotConnected, Connection):
    pass


class _TlsConnection(_ReadOnlyIsNotConnected, SSLConnection):
    pass


class _UnixConnection(_ReadOnlyIsNotConnected, UnixDomainSocketConnection):
    pass


# SentinelManagedConnection turns redis-py's ReadOnlyError into a plain ConnectionError
# (outcome unknown for a write); ours, after it in the MRO, answers first with NotConnected.
class _SentinelConnection(SentinelManagedConnection, _ReadOnlyIsNotConnected, Connection):
    pass


class _SentinelTlsConnection(SentinelManagedSSLConnection, _TlsConnection):
    pass


class _MarksNotConnected(aioredis.BlockingConnectionPool):
    """A blocking pool whose own failures are ``NotConnected``. redis-py takes the
    connection before it sends, outside its retries, so such a failure sent nothing.

    An idle connection is taken and given back directly when nobody waits for one: the
    blocking pool's condition, timer and telemetry cost about as much as a script call's
    packing did, every call. Whenever the pool's own path has something to decide (none
    idle, a waiter, maintenance, a connection to reconnect or re-authenticate), it does."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if not args and not kwargs and self._available_connections and self._quiet():
                return await self._take_idle()
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if isinstance(exc, NotConnected):
                raise
            raise NotConnected(f"{exc.__class__.__name__}: {exc}") from exc

    def _quiet(self) -> bool:
        # asyncio.Condition keeps its waiters there: one woken by a release must get the
        # connection it was woken for, so while any waits the pool's own path serves.
        waiters = self._condition._waiters
        return not waiters and not self._in_maintenance

    async def _take_idle(self) -> AbstractConnection:
        connection: AbstractConnection = self._available_connections.pop()
        self._in_use_connections.add(connection)
        try:
            try:  # as ensure_connection: connected, nothing unread (a dropped one reads EOF)
                ready = connection.is_connected and not await connection.can_read()
            except (RedisConnectionError, OSError):
                ready = False
            if not ready:
                await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        reauth = getattr(connection, "_re_auth_token", None) is not None
        if not self._quiet() or reauth or connection.should_reconnect():  # type: ignore[no-untyped-call]
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)


class Pool(_MarksNotConnected):
    """redis-py's blocking pool for one node, marking its own failures ``NotConnected``."""


class SentinelPool(_MarksNotConnected, SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master Sentinel names, in a blocking pool marking its failures ``NotConnected``
    (MasterNotFoundError included: while no master is known, nothing can be sent)."""

    sentinel_manager: Sentinel


@dataclass(frozen=True)
class Use:
    """How a caller uses its client (not configuration): see ``connect``."""

    timeout: float
    read_timeout: float | None = None
    max_connections: int = 64
    decode_responses: bool = True


def _common(use: Use) -> dict[str, Any]:
    return {
        "max_connections": use.max_connections,
        "timeout": use.timeout,
        "decode_responses": use.decode_responses,
        "socket_connect_timeout": use.timeout,
        "socket_timeout": use.read_timeout or use.timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "health_check_interval": 30,
    }


_CONNECTION_CLASSES: dict[str, type[AbstractConnection]] = {
    "redis": _TcpConnection, "rediss": _TlsConnection, "unix": _UnixConnection,
}  # fmt: skip


def _direct(settings: Settings, use: Use) -> aioredis.Redis:
    url = settings.redis_url
    scheme = scheme_of(url)
    options = _common(use)
    if scheme == "rediss":
        options.update(tls_options(settings))
    # The URL's own query options (?db=, ?ssl_cert_reqs=) win, as in redis-py's from_url;
    # the connection class is ours, for READONLY.
    options.update(aioredis.connection.parse_url(url))
    options["connection_class"] = _CONNECTION_CLASSES[scheme]
    return aioredis.Redis(connection_pool=Pool(**options))


def _sentinel(settings: Settings, use: Use) -> aioredis.Redis:
    target = parse_sentinel_url(settings.redis_url)
    tls = tls_options(settings) if target.tls else {}
    secret = settings.redis_sentinel_password
    # Asking the sentinels must stay as bounded as a command: no retries with backoff
    # (redis-py's default for a client), each one tried once within the timeout.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # unannotated in redis-py
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": use.timeout, "socket_connect_timeout": use.timeout,
            "retry": Retry(NoBackoff(), 0), "username": settings.redis_sentinel_username,
            "password": secret.get_secret_value() if secret else None,
            **({"ssl": True, **tls} if target.tls else {}),
        },
    )  # fmt: skip
    options = _common(use)
    options.update(tls)
    client: aioredis.Redis = sentinel.master_for(
        target.service,
        connection_pool_class=SentinelPool,
        connection_class=_SentinelTlsConnection if target.tls else _SentinelConnection,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return client


def connect(settings: Settings, use: Use) -> Client:
    """A client for REDIS_URL, whatever its topology, with ``use``'s bounds.

    One immediate retry replaces a pooled connection that died with a Redis restart or a
    failover; more retries (redis-py's default) would stretch the API's 503 past its bound,
    and so would a retry after a timeout (a stalled Redis times out again), which could
    also leave a second copy of the command waiting in the stalled Redis's socket.
    ``read_timeout`` must exceed any blocking wait the caller makes. The pool blocks (up to
    ``timeout``) when all connections are busy: redis-py's plain pool raises
    MaxConnectionsError at once instead, which would turn a burst into 503s.
    """
    check_url(settings.redis_url)
    _warn_unverified(settings.redis_url, settings.redis_validate_certs)
    scheme = scheme_of(settings.redis_url)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel(settings, use)
    if scheme in CLUSTER_SCHEMES:
        tls = tls_options(settings) if uses_tls(settings.redis_url) else {}
        return rediscluster.cluster_client(
            settings.redis_url, timeout=use.timeout, read_timeout=use.read_timeout or use.timeout,
            max_connections=use.max_connections, tls=tls,
        )  # fmt: skip
    return _direct(settings, use)


async def close(client: Client) -> None:
    """Close ``client``, its pool, and for Sentinel the connections to the sentinels."""
    if isinstance(client, RedisCluster):
        await client.aclose()  # its node pools with it
        return
    pool = client.connection_pool
    await client.aclose()
    await pool.disconnect()
    if isinstance(pool, SentinelPool):
        await pool.sentinel_manager.aclose()
