"""One webhook attempt over HTTP, to an address that was checked after DNS.

httpcore (httpx's transport) takes a network backend: ours resolves the host once, judges
every address it got (``emailq.webhooks.targets.refusal``) and connects to one of those
addresses, so nothing resolves the name a second time between the check and the connect
(DNS rebinding). TLS still verifies the certificate for, and sends SNI of, the URL's host.
No proxy from the environment (a proxy would resolve the name itself), no redirects (a 3xx
is a failure, as the spec asks), a bounded read of the answer, and one deadline per
attempt from DNS to the last byte.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore

from emailq import __version__
from emailq.webhooks.targets import TargetRefused, parse_ip, refusal

Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_ANSWER_BYTES = 64 * 1024  # read of a receiver's answer; the rest is not waited for
KEPT_ANSWER_CHARS = 200  # of it, kept in the delivery log
USER_AGENT = f"emailq-webhooks/{__version__}"
_FAILURES = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException,
             httpcore.UnsupportedProtocol, ssl.SSLError, OSError)  # fmt: skip


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the system resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses ``refusal`` allows, resolved once, here."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self.inner = inner or httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to try for ``host``; ``TargetRefused`` if any one is refused (a
        name with one bad address is a name an attacker may steer)."""
        literal = parse_ip(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise httpcore.ConnectError(f"DNS lookup of {host} failed: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            ip = parse_ip(address)
            why = "not an IP address" if ip is None else refusal(
                ip, allow_private=self.allow_private)  # fmt: skip
            if why:
                raise TargetRefused(f"{host} resolves to {address}, {why}")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve and check ``host``, then connect to the first checked address that
        answers."""
        error: Exception = httpcore.ConnectError(f"could not connect to {host}")
        for address in await self.resolve(host, port):
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address,
                                                    socket_options)  # fmt: skip
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        """Never: a webhook goes to a host and port."""
        raise TargetRefused("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        """The inner backend's sleep (httpcore's pool uses it)."""
        await self.inner.sleep(seconds)


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status (None when no answer came) or an error."""

    status: int | None
    duration_ms: float
    retry_after: float | None = None  # seconds, from a Retry-After header
    error: str | None = None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class DeliveryClient:
    """POSTs webhook bodies through one pool of checked connections."""

    def __init__(self, *, timeout: float, concurrency: int, backend: GuardedBackend) -> None:
        self.timeout = timeout
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(), max_connections=concurrency,
            keepalive_expiry=30.0, retries=0, network_backend=backend,
        )  # fmt: skip

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self.pool.aclose()

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """One attempt. Raises ``TargetRefused`` before any connection to a refused address;
        every other failure is an ``Answer`` with its error."""
        started = time.perf_counter()
        sent = [("content-type", "application/json"), ("user-agent", USER_AGENT),
                *headers.items()]  # fmt: skip
        limit = {"connect": self.timeout, "read": self.timeout, "write": self.timeout,
                 "pool": self.timeout}  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                async with self.pool.stream("POST", url, headers=sent, content=body,
                                            extensions={"timeout": limit}) as response:  # fmt: skip
                    kept = await _read_some(response)
        except TargetRefused:
            raise
        except TimeoutError:
            return Answer(None, _ms(started), error=f"no answer within {self.timeout:g} s")
        except _FAILURES as exc:
            return Answer(None, _ms(started), error=f"{exc.__class__.__name__}: {exc}"[:200])
        status = response.status
        error = None if 200 <= status < 300 else f"HTTP {status}: {kept}".strip()
        wait = retry_after(_header(response.headers, b"retry-after"))
        return Answer(status, _ms(started), retry_after=wait, error=error)


async def _read_some(response: httpcore.Response) -> str:
    """Up to MAX_ANSWER_BYTES of the answer (a receiver may stream forever); the start is
    kept, on one line, for the delivery log."""
    got = bytearray()
    async for chunk in response.aiter_stream():
        got += chunk
        if len(got) >= MAX_ANSWER_BYTES:
            break
    text = got[:KEPT_ANSWER_CHARS].decode("utf-8", "replace")
    return " ".join(text.split())


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
