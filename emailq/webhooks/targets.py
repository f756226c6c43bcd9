"""Which URLs and addresses a webhook may reach: no server-side request forgery.

An endpoint URL is checked twice. When it is registered (``check_url``): http or https,
no credentials, and a literal IP or ``localhost`` judged at once. When it is delivered to
(worker.webhooks.http), after DNS: every address the name resolves to is judged by
``refusal``, and the connection goes to an address that was judged, never to a second
resolution (DNS rebinding: a name that answers a public address to the check and a
private one to the connect).

Private, loopback and shared (CGNAT) addresses are refused unless WEBHOOK_ALLOW_PRIVATE;
link-local (169.254.169.254 is the cloud metadata service), multicast, unspecified and
reserved addresses always are. An IPv6 address that carries an IPv4 one (mapped,
IPv4-compatible, SIIT-translated, 6to4, Teredo, NAT64) is judged by the IPv4 address it
reaches. Python 3.11's ``is_global`` predates a few registry entries, which are named here.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from emailq.errors import EmailqError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: someone's inside
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d, IPv4-compatible (deprecated)
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (SIIT, RFC 6052)
# The local-use NAT64 prefix (RFC 8215): its IPv4 address may sit at any of RFC 6052's
# offsets, so what it reaches (the metadata service, say) cannot be judged: never.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
# Inside someone's network though Python 3.11 calls them global: the deprecated site-local
# prefix, still routed inside some sites.
_INTERNAL = (_SHARED, ipaddress.IPv6Network("fec0::/10"))
_IETF = ipaddress.IPv4Network("192.0.0.0/24")  # protocol assignments: no one's web server
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


class TargetRefused(EmailqError):
    """A webhook URL, or an address its host resolves to, may not be reached."""


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    # :: and ::1 are in ::/96 too, and are what they say, not 0.0.0.0 and 0.0.0.1.
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _never(ip: IPAddress) -> str | None:
    """Why no setting lets a webhook reach ``ip``, if none does."""
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address (such as the cloud metadata service)"
    if ip in _LOCAL_NAT64:
        return "a local-use NAT64 address (it may reach any IPv4 address)"
    return None


def refusal(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why a webhook may not connect to ``ip``, or None if it may."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return refusal(inner, allow_private=allow_private)
    never = _never(ip)
    if never:
        return never
    if ip in _IETF:
        return "a reserved address"
    internal = ip.is_loopback or ip.is_private or any(ip in net for net in _INTERNAL)
    if not internal and ip.is_global:
        return None
    if internal and allow_private:
        return None
    if ip.is_loopback:
        return "a loopback address (WEBHOOK_ALLOW_PRIVATE=false)"
    if internal:
        return "a private address (WEBHOOK_ALLOW_PRIVATE=false)"
    return "a reserved address"


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (without brackets or an IPv6 zone), or None."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _check_host(host: str, *, allow_private: bool) -> None:
    ip = parse_ip(host)
    if ip is not None:
        why = refusal(ip, allow_private=allow_private)
        if why:
            raise TargetRefused(f"{host} is {why}")
    elif (host == "localhost" or host.endswith(".localhost")) and not allow_private:
        raise TargetRefused(f"{host} is a loopback name (WEBHOOK_ALLOW_PRIVATE=false)")


def check_url(url: str, *, allow_private: bool) -> str:
    """``url`` if a webhook may be registered for it; ``TargetRefused`` saying why not."""
    if _UNSAFE.search(url):
        raise TargetRefused("the URL holds a space or control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("the URL must start with https:// or http://")
    host = parts.hostname or ""
    if not host:
        raise TargetRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and lists; a webhook proves itself by signature.
        raise TargetRefused("the URL may not hold a user name or password")
    if port == 0:
        raise TargetRefused("the URL's port must be 1 to 65535")
    _check_host(host, allow_private=allow_private)
    return url
