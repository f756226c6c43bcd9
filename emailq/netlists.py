"""Parsing of list-valued settings: comma or space separated, and IP networks."""

from __future__ import annotations

import functools
import ipaddress
import re

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def split_list(value: str) -> list[str]:
    """The non-empty entries of a comma- or whitespace-separated setting."""
    return [part for part in re.split(r"[,\s]+", value) if part]


@functools.lru_cache(maxsize=16)
def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """IPs and CIDRs (``10.0.0.0/8``, ``::1``); a bare IP is a one-address network."""
    networks: list[IPNetwork] = []
    for entry in split_list(value):
        try:
            # strict=False: "10.1.2.3/8" means the network around it, as nginx reads it.
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR") from None
    return tuple(networks)
