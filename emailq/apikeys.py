"""API keys and recipient allow-lists as configured: parsing and hashing (matching an
address against them is ``emailq.addresses``'s); and the ``Principal`` a request is sent as.

An ``API_KEYS`` entry is ``<id>:<scope>:<sha256 hex of the key>[:<domains>[:<senders>]]``:
``<domains>`` (``a.com,b.com``) limits the recipients' domains, ``<senders>``
(``shop@a.com,@b.com``) the ``from`` addresses the key may use; either may be empty
(``id:send:<sha256>::@shop.example.com``: any recipient, one sender domain). Entries are
separated by whitespace or ``;`` (commas belong to the lists), or the whole value is a JSON
list of entry strings. Only hashes are configured: a leaked
``.env`` does not leak a usable key. ``emailq keygen`` prints a new key and its entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from emailq.addresses import ascii_domain

KEY_PREFIX = "eq_"  # makes a leaked key easy to recognise (and to grep for) in a paste
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
_ADDRESS = re.compile(r"^[^@\s,;]+@[^@\s,;]+$")


class Scope(StrEnum):
    """What a key may do."""

    SEND = "send"  # send mail (optionally to listed domains only) and read its own tasks
    ADMIN = "admin"  # send to anyone, read any task, use the admin endpoints


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its id (safe to log), scope, SHA-256 digest and domain limit."""

    id: str
    scope: Scope
    digest: str
    domains: frozenset[str] = frozenset()  # empty: any recipient domain
    senders: frozenset[str] = frozenset()  # addresses and @domains for `from`; empty: no limit

    @classmethod
    def parse(cls, entry: str) -> ApiKey:
        """One ``id:scope:sha256[:domains[:senders]]`` entry; raises ``ValueError`` naming
        the problem."""
        parts = entry.strip().split(":")
        if len(parts) not in (3, 4, 5):
            raise ValueError(f"API_KEYS entry {parts[0]!r}: expected "
                             "id:scope:sha256[:domains[:senders]]")  # fmt: skip
        key_id, scope, digest = parts[0], parts[1], parts[2].lower()
        if not _ID.match(key_id) or key_id == "anonymous":
            raise ValueError(
                f"API_KEYS entry {key_id!r}: the id must match [A-Za-z0-9_.-]{{1,64}}"
                " and not be 'anonymous' (the caller when keys are not configured)"
            )
        if scope not in set(Scope):
            raise ValueError(f"API_KEYS entry {key_id!r}: scope must be 'send' or 'admin'")
        if not _HEX.match(digest):
            raise ValueError(f"API_KEYS entry {key_id!r}: expected a SHA-256 hex digest")
        domains, senders = frozenset[str](), frozenset[str]()
        if len(parts) == 4 or (len(parts) == 5 and parts[3]):  # "id:send:<sha>::<senders>"
            domains = parse_domains(parts[3])
        if len(parts) == 5:
            senders = parse_address_list(parts[4], f"API_KEYS entry {key_id!r}: senders")
        return cls(key_id, Scope(scope), digest, domains, senders)

    def entry(self) -> str:
        """This key as an ``API_KEYS`` entry."""
        tail = ":" + ",".join(sorted(self.domains)) if self.domains else ""
        if self.senders:
            tail = f":{tail[1:]}:" + ",".join(sorted(self.senders))
        return f"{self.id}:{self.scope}:{self.digest}{tail}"


@dataclass(frozen=True)
class Principal:
    """The caller: a configured key, or ``anonymous`` when no keys are configured."""

    key_id: str
    scope: Scope
    domains: frozenset[str] = frozenset()  # recipient domains it may send to; empty: any
    anonymous: bool = False
    senders: frozenset[str] = frozenset()  # `from` addresses and @domains; empty: no own limit

    @property
    def is_admin(self) -> bool:
        """May read any task and use the admin endpoints."""
        return self.scope == Scope.ADMIN and not self.anonymous

    @property
    def may_read_all(self) -> bool:
        """May read every task (no keys configured, or an admin key)."""
        return self.anonymous or self.is_admin

    def may_read(self, owner: str | None) -> bool:
        """May this caller see a task created by the key ``owner``?"""
        return self.may_read_all or owner == self.key_id

    @property
    def owner(self) -> str:
        """What a task created by this caller stores as ``key_id`` ('' when anonymous)."""
        return "" if self.anonymous else self.key_id


ANONYMOUS = Principal("anonymous", Scope.SEND, anonymous=True)


def parse_domains(text: str) -> frozenset[str]:
    """``a.com,b.com`` as a set of lower-case domain names (IDNA form: see
    ``emailq.addresses.domain_of``)."""
    domains = frozenset(ascii_domain(d.strip().lower().rstrip(".")) for d in text.split(",")
                        if d.strip())  # fmt: skip
    bad = sorted(d for d in domains if not _DOMAIN.match(d))
    if bad or not domains:
        raise ValueError(f"not a list of domain names: {text!r}")
    return domains


def split_entries(value: str, separators: str) -> list[str]:
    """A setting's entries: a JSON list, or text split on whitespace and ``separators``."""
    text = value.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("expected a JSON list of strings")
        return [i.strip() for i in items if i.strip()]
    return [part for part in re.split(rf"[\s{re.escape(separators)}]+", text) if part]


def parse_api_keys(value: str) -> tuple[ApiKey, ...]:
    """The ``API_KEYS`` setting; ids must be unique, since logs and task ownership use them."""
    keys = tuple(ApiKey.parse(entry) for entry in split_entries(value, ";"))
    ids = [key.id for key in keys]
    if len(set(ids)) != len(ids):
        raise ValueError("API_KEYS: every key needs its own id")
    # One key under two entries would be authenticated as whichever matches last, and so
    # could carry either entry's scope: a send key that is also an admin key.
    first: dict[str, str] = {}
    for key in keys:
        if key.digest in first:
            raise ValueError(f"API_KEYS: {first[key.digest]!r} and {key.id!r} have the same "
                             "SHA-256 digest, so one key; give each entry its own key")  # fmt: skip
        first[key.digest] = key.id
    return keys


def parse_address_list(value: str, setting: str) -> frozenset[str]:
    """Lower-case addresses and ``@domain`` entries, comma-, ``;``- or space-separated (or a
    JSON list); ``setting`` names the list in errors."""
    entries = frozenset(_entry(e.lower()) for e in split_entries(value, ",;"))
    for entry in entries:
        ok = _DOMAIN.match(entry[1:]) if entry.startswith("@") else _ADDRESS.match(entry)
        if not ok:
            raise ValueError(f"{setting}: {entry!r} is neither an address nor @domain")
    if not entries and not value.strip().startswith("["):
        raise ValueError(f"{setting}: expected addresses or @domains, got {value!r}")
    return entries


def parse_allowed_recipients(value: str) -> frozenset[str]:
    """The ``ALLOWED_RECIPIENTS`` setting: lower-case addresses and ``@domain`` entries."""
    return parse_address_list(value, "ALLOWED_RECIPIENTS") if value.strip() else frozenset()


def parse_allowed_senders(value: str) -> frozenset[str]:
    """The ``ALLOWED_SENDERS`` setting: lower-case addresses and ``@domain`` entries."""
    return parse_address_list(value, "ALLOWED_SENDERS") if value.strip() else frozenset()


def hash_key(key: str) -> str:
    """The SHA-256 hex digest configured for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random key: 256 bits from the OS's CSPRNG, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _entry(entry: str) -> str:
    local, at, domain = entry.rpartition("@")
    return f"{local}{at}{ascii_domain(domain)}"
