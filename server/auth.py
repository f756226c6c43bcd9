"""Who is calling, and the guard against running as an open relay (what a caller may send
is decided with the rest of a send, in ``emailq.submit``).

``Authorization: Bearer <key>`` is hashed with SHA-256 and compared, in constant time, with
every configured ``API_KEYS`` digest. Only key ids are ever logged, never keys. Without
``API_KEYS`` every caller is the ``anonymous`` principal, and then, unless
``ALLOWED_RECIPIENTS`` limits where mail goes or ``ALLOW_OPEN_RELAY`` says anyone may send,
only local requests are served (``local_refusal``): a loopback client, naming this machine
in ``Host``, not sent by a page of another origin. The admin endpoints always need that
without keys. ``relay_guard`` refuses to start with a real SMTP server and none of the three.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import math
import re
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request

from emailq.apikeys import ANONYMOUS, ApiKey, hash_key
from emailq.apikeys import Principal as Principal  # the core's; routes import it from here
from emailq.errors import ConfigError
from emailq.netlists import split_list
from emailq.queue import Queue
from emailq.settings import Settings
from server.clientaddr import arrived_through_proxy, client_address, client_key
from server.deps import SettingsDep, header, queue_of, settings_of

log = logging.getLogger("emailq.api")

AUTH_FAILURE_WINDOW_MS = 60_000  # AUTH_FAILURE_LIMIT counts failures per fixed minute


class OpenRelayRefused(ConfigError, RuntimeError):
    """The configuration would let anyone who reaches the API send mail anywhere."""


# Asked twice per local send (the peer, the Host header), with the same few values each
# time; bounded, as the Host header is the caller's to choose.
@functools.lru_cache(maxsize=256)
def is_loopback(host: str | None) -> bool:
    """Is ``host`` this machine: ``localhost``, 127.0.0.0/8 or ::1 (also IPv4-mapped)?"""
    name = (host or "").strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:  # another name (TestClient's "testclient"), or no peer at all
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def relay_guard(settings: Settings) -> None:
    """Refuse a configuration in which anyone may send anywhere through a real SMTP server.

    Without keys or an allow-list the API serves local clients only (``local_refusal``),
    so loopback SMTP is safe to start with; ALLOW_OPEN_RELAY lifts that limit, so it warns
    whatever the SMTP host."""
    if settings.api_keys or settings.allowed_recipients:
        return
    if settings.allow_open_relay:
        log.warning("ALLOW_OPEN_RELAY=true: anyone who can reach this API can send mail "
                    "anywhere through %s", settings.smtp_host)  # fmt: skip
        return
    if is_loopback(settings.smtp_host):
        log.info("no API_KEYS or ALLOWED_RECIPIENTS: only clients on this machine may send")
        return
    raise OpenRelayRefused(
        f"refusing to start: SMTP_HOST={settings.smtp_host} is not a loopback host, and "
        "neither API_KEYS nor ALLOWED_RECIPIENTS is set, so anyone who can reach the API could "
        "send mail anywhere (an open relay). Set API_KEYS (create one with `emailq keygen`), "
        "or ALLOWED_RECIPIENTS (addresses and @domains), or, to accept that risk, "
        "ALLOW_OPEN_RELAY=true."
    )


# A Host header: "[::1]:8000", "localhost:8000", "127.0.0.1"
_HOST = re.compile(r"^(?:\[([0-9a-f:.]+)\]|([a-z0-9.-]+))(?::(\d{1,5}))?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (name without brackets or final dot, port or None); None if bad."""
    match = _HOST.match(value.strip().lower())
    if match is None:
        return None
    name = (match.group(1) or match.group(2) or "").rstrip(".")
    return (name, int(match.group(3)) if match.group(3) else None) if name else None


# Asked once per local send, with the few Host values a machine is called by; bounded, as
# the header is the caller's to choose.
@functools.lru_cache(maxsize=256)
def is_local_host(value: str | None) -> bool:
    """Does a ``Host`` header name this machine: localhost, ``*.localhost``, a loopback IP
    (``[::1]`` bracketed), with or without a port? A DNS-rebinding page sends its own name."""
    parts = _split_host(value or "")
    return parts is not None and (parts[0].endswith(".localhost") or is_loopback(parts[0]))


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """Is ``origin``, as a browser sends it, the origin this request was served under
    (``scheme`` of the connection, ``host`` from its Host header)?"""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:  # a port out of range, or not a number
        return False
    default = _DEFAULT_PORTS.get(scheme)
    served = _split_host(host)
    if parts.scheme != scheme or default is None or served is None or parts.hostname is None:
        return False
    return parts.hostname.rstrip(".") == served[0] and (port or default) == (served[1] or default)


def _cross_origin(request: Request, settings: Settings) -> bool:
    """Sent by a page of another origin? Browsers send ``Origin`` on every POST and on
    cross-origin requests, and ``Sec-Fetch-Site`` on everything; curl sends neither."""
    origin = header(request, b"origin")
    if origin is not None:
        listed = origin in split_list(settings.cors_origins)  # the operator allowed that page
        served = _same_origin(origin, request.url.scheme, header(request, b"host") or "")
        return not (listed or served)
    site = header(request, b"sec-fetch-site")
    return site is not None and site not in ("none", "same-origin")


def local_refusal(request: Request, settings: Settings) -> str | None:
    """Why this request is not a local one (see the module doc), or None if it is."""
    if arrived_through_proxy(request):
        return "the request came through a proxy that is not in TRUSTED_PROXIES (list it there)"
    # Behind a TRUSTED_PROXIES proxy on loopback, the forwarded client decides, not the proxy.
    if not is_loopback(client_address(request)):
        return "only clients on this machine are served while API_KEYS is unset"
    if not is_local_host(header(request, b"host")):
        return "the Host header must name this machine (localhost) while API_KEYS is unset"
    if _cross_origin(request, settings):
        return "cross-origin requests are refused while API_KEYS is unset"
    return None


def _local_only(request: Request, settings: Settings) -> None:
    """403 unless the request is a local one."""
    refusal = local_refusal(request, settings)
    if refusal is not None:
        log.warning("refused: %s", refusal, extra={"request_id": request.state.request_id})
        raise HTTPException(403, f"{refusal}; configure API_KEYS to call it from elsewhere")


def _match(given: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    digest = hash_key(given).encode()
    found = None
    # Every entry is compared, each in constant time: the time taken says nothing about
    # which entry, or how much of one, matched.
    for key in keys:
        if hmac.compare_digest(digest, key.digest.encode()):
            found = key
    return found


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


_KEY_REQUIRED = "a valid API key is required: 'Authorization: Bearer <key>'"


def _missing() -> HTTPException:
    return HTTPException(401, _KEY_REQUIRED, headers={"WWW-Authenticate": "Bearer"})


async def _refuse(request: Request, settings: Settings, queue: Queue) -> HTTPException:
    """401 for a key that is not one, or 429 once this address has offered too many in the
    current window."""
    # The socket's peer, or the address a TRUSTED_PROXIES proxy forwarded for.
    client = client_key(request)
    count, left_ms = await queue.note_auth_failure(client, AUTH_FAILURE_WINDOW_MS)
    log.warning("authentication failed from %s (%d this minute)", client, count,
                extra={"request_id": request.state.request_id})  # fmt: skip
    if count > settings.auth_failure_limit:
        retry_after = max(1, math.ceil(left_ms / 1000))
        detail = (f"over AUTH_FAILURE_LIMIT ({settings.auth_failure_limit}/minute) of failed "
                  f"authentications from this address; retry in {retry_after} s")  # fmt: skip
        return HTTPException(429, detail, headers={"Retry-After": str(retry_after)})
    return _missing()


async def authenticate(request: Request) -> Principal:
    """The caller's principal; 401 (or 429 after repeated failures) without a valid key."""
    settings = settings_of(request)
    if not settings.api_keys:
        # Sending anywhere, unlimited, is for this machine only, unless the operator said
        # otherwise: an allow-list bounds where mail goes; ALLOW_OPEN_RELAY opens it to all.
        if not (settings.allowed_recipients or settings.allow_open_relay):
            _local_only(request, settings)
        principal = ANONYMOUS
    else:
        given = _bearer(request)
        if given is None:
            # No key offered is no guess: not counted against AUTH_FAILURE_LIMIT, nor logged
            # as a failure (the dashboard asks once without one, to learn if it needs one).
            raise _missing()
        key = _match(given, settings.api_keys)
        if key is None:
            # A valid key is never throttled: without TRUSTED_PROXIES everyone behind one
            # proxy shares an address, and guessing a 256-bit key is hopeless anyway.
            raise await _refuse(request, settings, queue_of(request))
        principal = Principal(key.id, key.scope, key.domains, senders=key.senders)
    # Read by other parts (idempotency scopes its keys by it): set on every request we see.
    request.state.key_id = principal.key_id
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


async def require_admin(request: Request, principal: PrincipalDep, settings: SettingsDep) -> None:
    """Admin access: an admin key when keys are configured, else local requests only."""
    if settings.api_keys:
        if not principal.is_admin:
            detail = f"key {principal.key_id!r} has scope {principal.scope}; admin endpoints need"
            raise HTTPException(403, detail + " an admin key")
        return
    _local_only(request, settings)


AdminDep = Depends(require_admin)
