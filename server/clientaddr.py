"""The client's address: the socket peer, or what a trusted proxy says it forwarded.

``X-Forwarded-For`` is a list each proxy appends to, so only its right end is written by
proxies we trust; everything left of them may be whatever the client sent. Walking from the
right past our own proxies, the first address that is not one of them is the client, as
nginx's ``real_ip_recursive`` and Werkzeug's ``ProxyFix`` read it. From an untrusted peer
the header is ignored: anyone can send it.
"""

from __future__ import annotations

import ipaddress

from fastapi import Request

from emailq.netlists import IPNetwork, parse_networks, split_list
from emailq.settings import Settings

UNKNOWN = "unknown"  # no peer at all (some ASGI test transports)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(text: str, proxies: tuple[IPNetwork, ...]) -> bool:
    address = _ip(text)
    return address is not None and any(address in network for network in proxies)


def forwarded_client(peer: str, forwarded_for: list[str], proxies: tuple[IPNetwork, ...]) -> str:
    """The client behind ``peer``, given every ``X-Forwarded-For`` header value in order."""
    if not _trusted(peer, proxies):
        return peer
    hops = [hop for value in forwarded_for for hop in split_list(value.replace(",", " "))]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            address = _ip(hop)
            # Garbage where an address should be: stop there, at the last hop we can name,
            # rather than let free text become a rate-limit key.
            return str(address) if address is not None else peer
        peer = hop
    return peer  # every hop is a proxy of ours: the left-most is as far as we can see


def client_address(request: Request) -> str:
    """The address rate limits and auth-failure counting key on (see the module doc)."""
    peer = request.client.host if request.client else UNKNOWN
    settings: Settings = request.app.state.settings
    if not settings.trusted_proxies:
        return peer
    headers = request.headers.getlist("X-Forwarded-For")
    return forwarded_client(peer, headers, parse_networks(settings.trusted_proxies))
