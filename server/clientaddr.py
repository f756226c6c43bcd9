"""The client's address: the socket peer, or what a trusted proxy says it forwarded.

``TRUSTED_PROXIES`` alone decides. ``X-Forwarded-For`` is a list each proxy appends to, so
only its right end is written by proxies we trust; everything left of them may be whatever
the client sent. Walking from the right past our own proxies, the first address that is
not one of them is the client, as nginx's ``real_ip_recursive`` and Werkzeug's
``ProxyFix`` read it. From an untrusted peer the header is ignored: anyone can send it.

The ASGI server must not rewrite the peer first: uvicorn does by default for loopback
peers, which is why ``python -m server`` runs it with ``proxy_headers=False``. Should it
have happened anyway (``uvicorn server.main:app`` without ``--no-proxy-headers``), the
peer we are handed is one of the header's own hops; we cannot know the real one, so the
client is ``unknown``: every such request shares one budget instead of picking its own.
Under ``python -m server`` that cannot happen, and the check is not made: a client that
repeats its own address in the header would otherwise leave its budget for the shared one.

Every address leaves here in one canonical text form (or ``unknown``), so no free text from
a header reaches a Redis key or a log line.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re

from fastapi import Request

from emailq.netlists import IPNetwork, parse_networks
from server.deps import peer_is_socket, settings_of

log = logging.getLogger("emailq.api")

UNKNOWN = "unknown"  # no usable address: no peer, or a hop that is not an address
IPV6_LIMIT_PREFIX = 64  # one IPv6 subscriber is usually given a whole /64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# "[2001:db8::1]:443" and "[2001:db8::1]"; "203.0.113.7:51234"
_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d{1,5}))?$")
_V4_PORT = re.compile(r"^([0-9.]+):(\d{1,5})$")
_MAX_HOP = 100  # longer than any address with a port: garbage, not worth parsing
_CLIENT_STATE = "client_address"  # where a request keeps its client's address once known
# Headers a proxy adds, as the ASGI scope lists them (lower case, as Starlette reads them).
_FORWARDING = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


# Bounded, so hops a client makes up cannot grow it; a server sees the same few peers and
# proxies over and over, and ipaddress parses each in Python.
@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    """One address as a proxy or a socket writes it, with or without a port; None if it is
    not one. IPv4-mapped IPv6 becomes IPv4, and an IPv6 zone (``%eth0``) is dropped."""
    text = text.strip()
    if len(text) > _MAX_HOP:
        return None
    if (match := _BRACKETED.match(text) or _V4_PORT.match(text)) is not None:
        host, port = match.group(1), match.group(2)
        if port is not None and int(port) > 65535:
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:  # free text after '%': never let it into a key
            return ipaddress.IPv6Address(int(address))
    return address


def _trusted(address: IPAddress | None, proxies: tuple[IPNetwork, ...]) -> bool:
    return address is not None and any(address in network for network in proxies)


def _hops(forwarded_for: list[str]) -> list[str]:
    return [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]


def forwarded_client(peer: str, forwarded_for: list[str], proxies: tuple[IPNetwork, ...]) -> str:
    """The client behind ``peer``, given every ``X-Forwarded-For`` header value in order."""
    address = parse_address(peer)
    if address is None:
        return UNKNOWN
    if not _trusted(address, proxies):
        return str(address)
    for hop in reversed(_hops(forwarded_for)):
        hop_address = parse_address(hop)
        if hop_address is None:
            # Garbage where an address should be: the client is beyond it and unnamed. Not
            # the proxy: that would put everyone behind it in one budget, or make them local.
            return UNKNOWN
        if not _trusted(hop_address, proxies):
            return str(hop_address)
        address = hop_address
    return str(address)  # every hop is a proxy of ours: the left-most is as far as we can see


def rewritten_by_server(peer: str, forwarded_for: list[str]) -> bool:
    """Did the ASGI server replace the socket peer with a hop of ``X-Forwarded-For``?"""
    address = parse_address(peer)
    return address is not None and any(parse_address(h) == address for h in _hops(forwarded_for))


@functools.cache  # once per process, not once per request
def _warn_rewrite() -> None:
    log.warning("the server rewrote client addresses from X-Forwarded-For; they count as "
                "'unknown'. Run `python -m server`, or uvicorn with --no-proxy-headers, and "
                "list your proxies in TRUSTED_PROXIES")  # fmt: skip


def client_address(request: Request) -> str:
    """The client's address, canonical, or ``unknown`` (see the module doc).

    Worked out once per request: a send asks for it up to three times (the local-only
    check, its quota owner, its idempotency scope), and parsing addresses is not free."""
    state = request.scope.setdefault("state", {})
    known: str | None = state.get(_CLIENT_STATE)
    if known is None:
        known = state[_CLIENT_STATE] = _client_address(request)
    return known


# A peer that sent no X-Forwarded-For: its address depends on the peer and TRUSTED_PROXIES
# alone. Bounded; the peers of a server are few, and a key holds no header text.
@functools.lru_cache(maxsize=4096)
def _unforwarded(peer: str, trusted_proxies: str) -> str:
    return forwarded_client(peer, [], parse_networks(trusted_proxies))


def _client_address(request: Request) -> str:
    peer = request.client.host if request.client else UNKNOWN
    settings = settings_of(request)
    headers = request.headers.getlist("X-Forwarded-For")
    if not headers:
        return _unforwarded(peer, settings.trusted_proxies)
    proxies = parse_networks(settings.trusted_proxies)
    # From a trusted peer the walk below reads the header anyway; from any other, a peer
    # that is one of the header's hops was put there by the server, not by the socket.
    untrusted = not _trusted(parse_address(peer), proxies)
    if untrusted and not peer_is_socket(request) and rewritten_by_server(peer, headers):
        _warn_rewrite()
        return UNKNOWN
    return forwarded_client(peer, headers, proxies)


def limit_key(address: str) -> str:
    """What rate limits and auth-failure counts key on: the IPv4 address, or the IPv6 /64
    (one subscriber holds a whole /64 and could take a fresh address per request)."""
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, IPV6_LIMIT_PREFIX), strict=False))
    return address if parsed is not None else UNKNOWN


def client_key(request: Request) -> str:
    """``limit_key`` of the client's address: what its budgets are counted under."""
    return limit_key(client_address(request))


def arrived_through_proxy(request: Request) -> bool:
    """Does the request carry forwarding headers that no trusted proxy vouches for?

    A local reverse proxy not listed in TRUSTED_PROXIES makes every remote client look like
    loopback; the headers it adds give it away, so such a request is not a local one."""
    if not any(name in _FORWARDING for name, _ in request.scope["headers"]):
        return False
    peer = request.client.host if request.client else UNKNOWN
    settings = settings_of(request)
    return not _trusted(parse_address(peer), parse_networks(settings.trusted_proxies))
