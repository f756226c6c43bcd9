"""Configuration, read once by each entry point and passed down.

Nothing else in the project reads ``os.environ``: the API, the worker and the CLI each
build one ``Settings`` and hand it to the parts they compose. Tests build ``Settings(...)``
directly. Names match the original service's ``.env`` (``SMTP_HOST`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import limits
from pydantic import Field, SecretStr, ValidationInfo, field_serializer, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from emailq.apikeys import ApiKey, parse_allowed_recipients, parse_api_keys
from emailq.netlists import parse_networks, split_list

_LIST_PARSERS: dict[str | None, Callable[[str], object]] = {
    "api_keys": parse_api_keys,
    "allowed_recipients": parse_allowed_recipients,
}


class SmtpSecurity(StrEnum):
    """How the worker protects its SMTP connection."""

    STARTTLS = "starttls"  # plain connect, then upgrade (port 587)
    TLS = "tls"  # implicit TLS from the first byte (port 465)
    NONE = "none"  # no encryption: local relays and capture servers only


class Settings(BaseSettings):
    """Every setting of the API and the worker, with its default."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    redis_key_prefix: str = Field(default="emailq", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_timeout_seconds: float = Field(default=0.5, gt=0)

    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_pass: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.STARTTLS
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    smtp_validate_certs: bool = True
    smtp_ca_file: Path | None = None
    smtp_idle_seconds: float = Field(default=30.0, gt=0)

    mail_from: str = "emailq@localhost"
    max_attempts: int = Field(default=3, ge=1, le=25)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=300.0, ge=0)
    worker_concurrency: int = Field(default=8, ge=1, le=512)
    job_lease_seconds: float = Field(default=10.0, ge=1)
    worker_shutdown_grace_seconds: float = Field(default=25.0, ge=0)
    result_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # API keys (see emailq.apikeys for the format). None: no authentication, and the admin
    # endpoints answer loopback clients only. NoDecode: the value is our format, not JSON.
    api_keys: Annotated[tuple[ApiKey, ...] | None, NoDecode] = None
    # Addresses and @domains every send is limited to, whatever the key. None: no limit.
    allowed_recipients: Annotated[frozenset[str] | None, NoDecode] = None
    # Start even though anyone who reaches the API may send anywhere (see server.auth).
    allow_open_relay: bool = False
    # Failed authentications per client address per minute before it gets 429.
    auth_failure_limit: int = Field(default=20, ge=1)
    # Sends per API key id (per client address while API_KEYS is unset), in the `limits`
    # notation ("120/minute", "10/second; 1000/hour"); a batch counts its messages. "": off.
    rate_limit_per_key: str = "120/minute"
    # Contact-form submissions per client address per form. "": off.
    rate_limit_per_form_address: str = "5/minute"
    # Reverse proxies (IPs and CIDRs, comma or space separated) whose X-Forwarded-For is
    # believed. Empty: the socket peer is the client, whatever the header says.
    trusted_proxies: str = ""
    # Origins (comma separated, e.g. "https://app.example.com") allowed to call the API from
    # a browser. Empty: no CORS headers. CORS only; never a credential.
    cors_origins: str = ""

    # Contact forms (see emailq.forms): a TOML file, or JSON by extension. Empty: no forms.
    forms_file: Path | None = None
    # Serve the static contact-form test page at /dev/contact (`emailq dev` turns it on).
    dev_pages: bool = False

    log_level: str = "INFO"

    # -- When the relay fails (see "When the relay fails" in the README) ------------------
    # How long a mail may wait on a relay that is unreachable or throttling before it fails.
    # Counted per mail from its first relay-level failure (stored on the task, so restarts
    # do not reset it). Hours, not seconds: an outage is not the mail's fault, and relays
    # come back; a mail that waited this long is probably no longer wanted.
    smtp_outage_max_seconds: float = Field(default=4 * 3600, gt=0)
    # Longest pause (s) between probes of a relay that is down. Probes start at 0.5 s and
    # double up to this, so a relay that returns is noticed within about this long.
    smtp_probe_max_seconds: float = Field(default=30.0, gt=0)
    # Most mails per second sent by all workers together (a token bucket in Redis), e.g. 14
    # for a new Amazon SES account. 421/451/454 replies halve it for a while. 0: no limit.
    smtp_max_per_second: float = Field(default=0.0, ge=0)

    @field_validator("smtp_user", "smtp_pass", "smtp_ca_file", "forms_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `SMTP_USER=` in a .env file means "no login", not a login as the empty user.
        return None if value == "" else value

    @field_validator("api_keys", "allowed_recipients", mode="before")
    @classmethod
    def _parse_list(cls, value: object, info: ValidationInfo) -> object:
        # Both come from one env var each; an empty one means "not configured".
        if isinstance(value, str):
            return _LIST_PARSERS[info.field_name](value) or None
        return value or None

    @field_serializer("api_keys")
    def _dump_api_keys(self, keys: tuple[ApiKey, ...] | None) -> str | None:
        # Dumped in the environment format, so a dump can configure a child process.
        return " ".join(key.entry() for key in keys) if keys else None

    @field_serializer("allowed_recipients")
    def _dump_allowed_recipients(self, allowed: frozenset[str] | None) -> str | None:
        return ",".join(sorted(allowed)) if allowed else None

    @field_validator("rate_limit_per_key", "rate_limit_per_form_address")
    @classmethod
    def _rate_limit(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            return ""
        name = str(info.field_name).upper()
        try:
            parsed = limits.parse_many(value)
        except ValueError as exc:
            raise ValueError(
                f"{name}: {value!r} is not a rate limit such as '120/minute' ({exc})"
            ) from None
        if len(parsed) != 1:  # one budget per caller; several would each need their headers
            raise ValueError(f"{name}: one rate limit such as '120/minute', not {value!r}")
        return value.strip()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # raises ValueError for anything that is not an IP or CIDR
        return value.strip()

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in split_list(value):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} is not an origin such as "
                    "'https://app.example.com' (scheme and host, no path)"
                )
        return value.strip()

    @field_validator("mail_from")
    @classmethod
    def _plain_sender(cls, value: str) -> str:
        # The sender lands in the From header and the SMTP envelope of every mail.
        # email-validator would refuse the dev default's "localhost", so check the shape only.
        local, at, domain = parseaddr(value)[1].rpartition("@")
        if not (local and at and domain) or any(c in value for c in "\r\n\0"):
            raise ValueError("MAIL_FROM must be an address such as 'App <noreply@example.com>'")
        return value

    @property
    def mail_from_address(self) -> str:
        """The bare address of ``MAIL_FROM``, used as the SMTP envelope sender."""
        return parseaddr(self.mail_from)[1]

    @property
    def max_request_bytes(self) -> int:
        """Largest HTTP request body: text and html may each reach ``max_body_bytes``,
        and JSON escaping (``\\uXXXX``) can double non-ASCII text, so leave room for it."""
        return 2 * self.max_body_bytes + 64 * 1024

    @property
    def max_batch_request_bytes(self) -> int:
        """Largest batch request body. Not 100 x ``max_request_bytes`` (200 MiB at the
        default, all parsed in memory at once): 16 MiB, about 160 KiB per message of a full
        batch, and never less than one largest single message."""
        return max(16 * 1024 * 1024, self.max_request_bytes)
