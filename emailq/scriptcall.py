"""EVALSHA of one emailq script in one write, on a plain or Sentinel client.

redis-py's path for a script call (``AsyncScript`` -> ``execute_command`` -> its retry ->
``send_command`` -> ``pack_command``) was the worker's largest cost after the mail itself:
about 100 K instructions a call, most of it packing the same 17 arguments every time (the
SHA, the key count, the prelude's keys and arguments) through the encoder one by one, and
an ``asyncio.wait_for`` task around every write. A ``ScriptCall`` packs those once, packs
only the call's own arguments, writes the command with one ``write`` and reads the reply
with the connection's own ``read_response``.

What it keeps, and where from:

- the pool (``redisconn.Pool``/``SentinelPool``): a connection taken or made, a failure to
  get one raised as ``NotConnected`` (nothing sent); the connection given back after;
- the connection's reader: the socket timeout, READONLY raised as ``NotConnected`` and the
  connection dropped (``redisconn._ReadOnlyIsNotConnected``), Sentinel's own conversions,
  the connection dropped on any error or cancellation, the health check's clock;
- the connection's writer for what is rare: connecting, the PING health check every 30 s
  (``send_packed_command``, with its write timeout), a write that fills the socket buffer
  (drained under the socket timeout);
- the client's retry: once, on a new connection, after a ``ConnectionError`` (the closed
  transport included), none after a timeout, exactly as ``redisconn.connect`` configures
  redis-py's ``Retry``;
- NOSCRIPT (a Redis restarted, failed over or flushed): the script loaded, the call made
  once more.

A cluster client has its own routing and retries: ``lean_client`` returns None for it, and
for any client not built by ``redisconn`` (its pool's conversions are part of the contract),
and the caller keeps redis-py's path there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis._parsers.encoders import Encoder
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from emailq import redisconn
from emailq.errors import closed_transport_is_dropped

Arg = str | int | float


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# redis-py's own encoder (UTF-8 text, ``repr`` of a number, a bool refused), as the client
# this replaces writes every argument: the bytes Redis receives are the same on either path.
_ENCODER = Encoder("utf-8", "strict", decode_responses=False)  # type: ignore[no-untyped-call]


def encode_arg(value: Arg) -> bytes:
    """One argument as redis-py's client packs it."""
    encoded: bytes = _ENCODER.encode(value)  # type: ignore[no-untyped-call]
    return encoded


def pack_head(sha: str, keys: Sequence[str], shared: Sequence[Arg]) -> bytes:
    """EVALSHA, the SHA, the key count, the keys and the shared arguments, packed."""
    constant = [b"EVALSHA", sha.encode(), b"%d" % len(keys), *map(encode_arg, keys),
                *map(encode_arg, shared)]  # fmt: skip
    return b"".join(map(_bulk, constant))


class ScriptCall:
    """One script's EVALSHA with its constant part packed once (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        script: AsyncScript,
        keys: Sequence[str],
        shared: Sequence[Arg],
    ) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.script = script
        self.head = pack_head(script.sha, keys, shared)
        self.count = 3 + len(keys) + len(shared)

    def pack(self, args: Sequence[Arg]) -> bytes:
        """The whole command for ``args`` (after the shared ones), as one bytes object."""
        parts = [b"*%d\r\n" % (self.count + len(args)), self.head]
        for value in args:
            data = value.encode() if type(value) is str else encode_arg(value)
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        return b"".join(parts)

    async def __call__(self, args: Sequence[Arg]) -> Any:
        """The script's reply for ``args``; redis-py's errors as its own path raises them."""
        command = self.pack(args)
        try:
            return await self._on_a_connection(command)
        except NoScriptError:
            # Redis lost its script cache (restart, failover, SCRIPT FLUSH): as AsyncScript
            # does, load it (the SHA stays the text's) and run it once more.
            await self.client.script_load(self.script.script)
            return await self._on_a_connection(command)

    async def _on_a_connection(self, command: bytes) -> Any:
        conn = await self.pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                return await _exchange(conn, command)
            except RedisConnectionError:
                # redis-py's Retry(1, ConnectionError): the reader or writer has dropped the
                # connection, so the second try reconnects (and finds a new master).
                await conn.disconnect()
                return await _exchange(conn, command)
        finally:
            await self.pool.release(conn)


async def _exchange(conn: AbstractConnection, command: bytes) -> Any:
    """Write ``command`` and read its reply on ``conn``."""
    writer = conn._writer  # the pooled connection's stream, written directly
    interval = conn.health_check_interval
    ready = writer is not None and not writer.transport.is_closing()
    if not ready or (interval and asyncio.get_running_loop().time() > conn.next_health_check):
        # Connecting, or the periodic PING first: rare, so redis-py's own writer does it.
        await conn.send_packed_command(command)
    else:
        assert writer is not None
        try:
            with closed_transport_is_dropped():
                writer.write(command)
            if writer.transport.get_write_buffer_size():
                # The socket took less than all of it (a large batch): wait for room, as
                # redis-py does, within the socket timeout.
                await asyncio.wait_for(writer.drain(), conn.socket_timeout)
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await conn.disconnect(nowait=True)  # a half-written command must not be reused
            raise
    return await conn.read_response()


def lean_client(client: redisconn.Client) -> aioredis.Redis | None:
    """``client`` if ``ScriptCall`` can serve it: a plain or Sentinel client on a pool built
    by ``redisconn``, not bound to a single connection. None for a cluster, explicitly."""
    if not isinstance(client, aioredis.Redis) or client.single_connection_client:
        return None
    if not isinstance(client.connection_pool, redisconn.Pool | redisconn.SentinelPool):
        return None
    return client
