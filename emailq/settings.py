"""Configuration, read once by each entry point and passed down.

Nothing else in the project reads ``os.environ``: the API, the worker and the CLI each
build one ``Settings`` and hand it to the parts they compose. Tests build ``Settings(...)``
directly. Names match the original service's ``.env`` (``SMTP_HOST`` ...).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from collections.abc import Callable
from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import limits
from pydantic import Field, SecretStr, ValidationInfo, field_serializer, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from emailq.addresses import domain_of
from emailq.apikeys import ApiKey, parse_allowed_recipients, parse_allowed_senders, parse_api_keys
from emailq.errors import ConfigError
from emailq.netlists import IPNetwork, parse_networks, split_list
from emailq.redisconn import check_url, uses_tls

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_LIST_PARSERS: dict[str | None, Callable[[str], object]] = {
    "api_keys": parse_api_keys,
    "allowed_recipients": parse_allowed_recipients,
    "allowed_senders": parse_allowed_senders,
}
# File types that run code when opened on a common desktop (Windows first: that is where a
# double-click executes): the list Gmail refuses outright, with reg and vhdx (a disk
# image's files escape Windows' downloaded-file warning). A relay such as Gmail or
# Microsoft 365 would bounce the mail anyway, later and less clearly than a 422 now.
DEFAULT_BLOCKED_EXTENSIONS = (
    "ade,adp,apk,appx,appxbundle,bat,cab,chm,cmd,com,cpl,diagcab,diagcfg,diagpack,dll,"
    "dmg,ex,ex_,exe,hta,img,ins,iso,isp,jar,jnlp,js,jse,lib,lnk,mde,mjs,msc,msi,msix,"
    "msixbundle,msp,mst,nsh,pif,ps1,reg,scr,sct,shb,sys,vb,vbe,vbs,vhd,vhdx,vxd,wsc,"
    "wsf,wsh,xll"
)


class SmtpSecurity(StrEnum):
    """How the worker protects its SMTP connection."""

    STARTTLS = "starttls"  # plain connect, then upgrade (port 587)
    TLS = "tls"  # implicit TLS from the first byte (port 465)
    NONE = "none"  # no encryption: local relays and capture servers only


class UnknownOutcome(StrEnum):
    """What the worker does with a mail whose end of DATA got no reply (see the README's
    "Slow relays"): the relay may or may not have taken it."""

    RETRY = "retry"  # send it again (a possible duplicate, with the same Message-ID)
    FAIL = "fail"  # fail it with a reason that says so (a possible loss; requeue by hand)


class LogFormat(StrEnum):
    """How both processes write their log lines (see the README's "Logs")."""

    AUTO = "auto"  # text when stderr is a terminal, json otherwise (containers, files, pipes)
    TEXT = "text"  # one readable line per event, context as key=value
    JSON = "json"  # one JSON object per line per event, for a log shipper


class Settings(BaseSettings):
    """Every setting of the API and the worker, with its default."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    redis_key_prefix: str = Field(default="emailq", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_timeout_seconds: float = Field(default=0.5, gt=0)
    # TLS to Redis (rediss://, rediss+sentinel://): a private CA, and a client certificate
    # with its key for servers that ask for one (tls-auth-clients).
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = Field(default=None, validate_default=True)
    redis_validate_certs: bool = True
    # Sentinel's own ACL user and password: the URL's user info is the data nodes'.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # Replicas that must hold each stored mail before the API answers 202 (Redis WAIT on the
    # connection that stored it, once per group commit), so a failover cannot lose it.
    # Fewer in REDIS_WAIT_TIMEOUT_SECONDS: 503 store_outcome_unknown. 0: no wait.
    redis_wait_replicas: int = Field(default=0, ge=0, le=32)
    redis_wait_timeout_seconds: float = Field(default=0.25, gt=0, validate_default=True)

    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_pass: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.STARTTLS
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    smtp_validate_certs: bool = True
    smtp_ca_file: Path | None = None
    smtp_idle_seconds: float = Field(default=30.0, gt=0)

    # -- Slow relays (see "Slow relays" in the README) --
    # Wait for the reply to the end of DATA (the final "."): relays scan and commit the mail
    # before answering, far slower than any command, and giving up early makes the outcome
    # unknown. RFC 5321 section 4.5.3.2 suggests 10 minutes. Never shorter than
    # SMTP_TIMEOUT_SECONDS (the larger of the two is used).
    smtp_data_timeout_seconds: float = Field(default=600.0, gt=0)
    # That reply never came (or the connection dropped while waiting): retry or fail. retry,
    # because a duplicate (same Message-ID, which many mailboxes fold) is visible and mostly
    # harmless while a silently lost password reset or one-time code is not, and because SMTP
    # relays themselves treat it so (RFC 5321 4.1.1.4, RFC 1047). Either way the attempt log
    # says `outcome_unknown`.
    on_unknown_outcome: UnknownOutcome = UnknownOutcome.RETRY

    mail_from: str = "emailq@localhost"
    max_attempts: int = Field(default=3, ge=1, le=25)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=300.0, ge=0)
    worker_concurrency: int = Field(default=8, ge=1, le=512)
    # Jobs a busy worker claims ahead of a free send slot (an idle one claims for its free
    # slots alone, so a burst reaches every idle worker); each waits, leased, for one. A slot
    # whose send ends then starts the next at once instead of idling through the round trip
    # that records the last outcome and claims its successor: more mails/s to a fast relay.
    # The price, and why it is off by default: a job held ahead can no longer be cancelled,
    # and a worker killed outright (or cut off from Redis past its leases) costs the jobs
    # it held an attempt each. A held job whose expires_at passes is given back, never
    # sent; held jobs take free slots by lane, as the claim does (worker.slots), so a
    # high-priority mail waits behind no more than the sends already running.
    worker_prefetch: int = Field(default=0, ge=0, le=512)
    job_lease_seconds: float = Field(default=10.0, ge=1)
    worker_shutdown_grace_seconds: float = Field(default=25.0, ge=0)
    result_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    # How long successful results are kept, if not RESULT_TTL_SECONDS: most results are
    # successes and they need no requeue, so a shorter time is what frees Redis after a
    # busy day (about 1 KB each). Empty: RESULT_TTL_SECONDS.
    result_ttl_success_seconds: int | None = Field(default=None, ge=1)
    # Entries kept in the event stream (every accept, claim, send, retry, failure...), for
    # consumers that read it from where they left off (metrics, dashboard, webhooks). About
    # 150 bytes each: 100,000 is ~15 MB of Redis, hours of history at a busy service.
    event_stream_maxlen: int = Field(default=100_000, ge=1000)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Bytes of mail waiting to be sent (pending, scheduled, retrying: the stored jobs), in
    # all (507 above it) and per API key, per client address without API_KEYS, per contact
    # form (429 above it). Message rate limits do not bound bytes: 100 batches of large
    # mail scheduled a month ahead would otherwise pin Redis memory. 0: no limit.
    max_stored_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)
    max_stored_bytes_per_key: int = Field(default=128 * 1024 * 1024, ge=0)
    # Share of Redis maxmemory new mail may not use (507 once used_memory reaches the
    # rest), so that claims, renewals and the outcomes of sent mail still fit. Checked in
    # the step that stores; nothing to do when Redis has no maxmemory. 0: no check.
    redis_memory_headroom: float = Field(default=0.1, ge=0, le=0.9)

    # API keys (see emailq.apikeys for the format). None: no authentication, and the admin
    # endpoints answer loopback clients only. NoDecode: the value is our format, not JSON.
    api_keys: Annotated[tuple[ApiKey, ...] | None, NoDecode] = None
    # Addresses and @domains every send is limited to, whatever the key. None: no limit.
    allowed_recipients: Annotated[frozenset[str] | None, NoDecode] = None
    # Addresses and @domains a request's `from` may use, whatever the key (a key's own
    # senders narrow it further). None: only MAIL_FROM's domain, whose SPF/DKIM the
    # operator has set up; any other domain would fail DMARC or spoof someone else's.
    allowed_senders: Annotated[frozenset[str] | None, NoDecode] = None
    # File name extensions an attachment may not have (comma or space separated, no dots).
    # Default: executables and scripts (DEFAULT_BLOCKED_EXTENSIONS). Empty: none blocked.
    blocked_attachment_extensions: str = DEFAULT_BLOCKED_EXTENSIONS
    # Start even though anyone who reaches the API may send anywhere (see server.auth).
    allow_open_relay: bool = False
    # Failed authentications per client address per minute before it gets 429.
    auth_failure_limit: int = Field(default=20, ge=1)
    # Sends per API key id (per client address while API_KEYS is unset), in the `limits`
    # notation ("120/minute", "10/second"); a batch counts its messages. "": off.
    # Off by default: a queue exists to absorb bursts (120/minute refused the 121st mail of
    # a notification burst), the operator owns the relay (SMTP_MAX_PER_SECOND paces it),
    # and MAX_STORED_BYTES_PER_KEY already bounds what one key can make Redis hold. Set it
    # to cap what a leaked key could send.
    rate_limit_per_key: str = ""
    # Contact-form submissions per client address per form. "": off. On by default: a form
    # is open to the whole web, and no person submits a form more often than this.
    rate_limit_per_form_address: str = "5/minute"
    # Reverse proxies (IPs and CIDRs, comma or space separated) whose X-Forwarded-For is
    # believed. Empty: the socket peer is the client, whatever the header says.
    trusted_proxies: str = ""
    # Origins (comma separated, e.g. "https://app.example.com") allowed to call the API from
    # a browser. Empty: no CORS headers. CORS only; never a credential.
    cors_origins: str = ""

    # Contact forms (see emailq.forms): a TOML file, or JSON by extension. Empty: no forms.
    forms_file: Path | None = None
    # Stored templates (see emailq.templates): a directory holding one directory per template
    # (otp/subject.txt, otp/body.txt, otp/body.html), all checked at startup. Empty: none.
    templates_dir: Path | None = None
    # Serve the static contact-form test page at /dev/contact (`emailq dev` turns it on).
    dev_pages: bool = False
    # The capture server's mail folder, shown at /dev/inbox while DEV_PAGES is on (`emailq
    # dev` sets both). Empty: no inbox. A path on the API's machine, read by the API only.
    dev_inbox_dir: Path | None = None
    # The dashboard (/dashboard) and the admin API only look: requeue and cancel answer 403
    # (the CLI, which talks to Redis directly, still can). For a wall screen, or operators
    # who should watch but not steer.
    dashboard_read_only: bool = False
    # Serve /docs (Swagger UI), /redoc and /openapi.json, assets included (no CDN). false:
    # all three answer 404, for a public API that should not publish its whole surface.
    api_docs: bool = True

    # A standard level name; anything else would only fail later, inside logging's setup.
    log_level: str = "INFO"
    # auto: a person at a terminal reads text; anything else (Docker's log driver, a file,
    # a pipe to a shipper) gets one JSON object per line, which needs no parsing rules.
    log_format: LogFormat = LogFormat.AUTO

    # -- Metrics (see "Metrics" in the README) ---------------------------------------------
    # A token Prometheus may read the API's /metrics with (`Authorization: Bearer ...`), so
    # the scraper needs no admin key (which could also requeue and cancel mail). Empty:
    # /metrics takes what the admin endpoints take (an admin key; without API_KEYS, local
    # requests only). 32 characters or more: `openssl rand -hex 32`.
    metrics_token: SecretStr | None = None
    # Port of each worker's own /metrics (its sends, claims, leases, SMTP pool). 0, the
    # default, is off: several workers on one host would each need a port of their own.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Address the worker's metrics listen on. Loopback unless told otherwise: docker-compose
    # sets 0.0.0.0, reachable on the compose network only (no port is published).
    worker_metrics_host: str = "127.0.0.1"

    # -- When the relay fails (see "When the relay fails" in the README) ------------------
    # How long a mail may wait on a relay that is unreachable or throttling before it fails.
    # Counted per mail from its first relay-level failure (stored on the task, so restarts
    # do not reset it). Hours, not seconds: an outage is not the mail's fault, and relays
    # come back; a mail that waited this long is probably no longer wanted.
    smtp_outage_max_seconds: float = Field(default=4 * 3600, gt=0)
    # Longest pause (s) between probes of a relay that is down. Probes start at 0.5 s and
    # double up to this, so a relay that returns is noticed within about this long. A probe
    # is a connect, EHLO and QUIT per worker: at 10 s, 20 workers make 2 a second, nothing
    # to a relay, and mail resumes within 10 s of its return (30 s kept it waiting).
    smtp_probe_max_seconds: float = Field(default=10.0, gt=0)
    # Most mails per second sent by all workers together (a token bucket in Redis), e.g. 14
    # for a new Amazon SES account. 421/451/454 replies halve it for a while. 0: no limit.
    smtp_max_per_second: float = Field(default=0.0, ge=0)

    # -- Webhooks (see "Webhooks" in the README) -------------------------------------------
    # Endpoints configured by file: a TOML file (or JSON, by extension) of [[webhooks]]
    # with id, url, events and secrets, checked at startup. Empty: API-registered only.
    webhooks_file: Path | None = None
    # Let webhooks reach private, loopback and CGNAT addresses (an endpoint on your own
    # network). Off: anyone who may register a webhook could otherwise make this service
    # call its neighbours (SSRF). Link-local (cloud metadata) stays refused either way.
    webhook_allow_private: bool = False
    # One delivery attempt, DNS to the last byte read; the spec suggests 15 to 30 s.
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    # Seconds to wait before each retry after the immediate first attempt (Svix's schedule:
    # 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; about 28 hours in all), comma separated.
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    # A Retry-After longer than the schedule's next wait is honoured up to this long.
    webhook_retry_after_max_seconds: float = Field(default=3600.0, ge=0)
    # Deliveries in flight per dispatcher process: slow receivers wait side by side.
    webhook_concurrency: int = Field(default=16, ge=1, le=512)
    # How long an attempt holds its delivery (and an event read but not yet recorded)
    # before another dispatcher takes it over: a dispatcher that died. Above the timeout.
    webhook_lease_seconds: float = Field(default=60.0, gt=0)

    @field_validator(
        "smtp_user",
        "smtp_pass",
        "smtp_ca_file",
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "redis_sentinel_username",
        "redis_sentinel_password",
        "forms_file",
        "templates_dir",
        "dev_inbox_dir",
        "webhooks_file",
        "result_ttl_success_seconds",
        "metrics_token",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `SMTP_USER=` in a .env file means "no login", not a login as the empty user.
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:
            return check_url(value)
        except ConfigError as exc:  # reported as every other setting is (emailq.startup)
            raise ValueError(str(exc)) from None

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _existing_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(info.field_name).upper()}: no such file")
        return value

    @field_validator("redis_tls_key_file")
    @classmethod
    def _tls_pair(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        cert = info.data.get("redis_tls_cert_file")
        if (cert is None) != (key is None):
            raise ValueError("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE: set both or neither")
        url = info.data.get("redis_url")
        given = {"REDIS_TLS_CA_FILE": info.data.get("redis_tls_ca_file"),
                 "REDIS_TLS_CERT_FILE": cert, "REDIS_TLS_KEY_FILE": key}  # fmt: skip
        tls_files = [name for name, path in given.items() if path is not None]
        # A forgotten "s" would send the traffic in the clear while the operator thinks
        # it is protected.
        if tls_files and url is not None and not uses_tls(url):
            raise ValueError(f"{' and '.join(tls_files)} set, but REDIS_URL does not use TLS "
                             "(rediss:// or rediss+sentinel://)")  # fmt: skip
        return key

    @field_validator("redis_wait_timeout_seconds")
    @classmethod
    def _wait_within_timeout(cls, value: float, info: ValidationInfo) -> float:
        # WAIT's reply is read under the socket timeout: a longer WAIT would time out the
        # read instead, and leave the connection mid-reply.
        bound = info.data.get("redis_timeout_seconds")
        if info.data.get("redis_wait_replicas") and bound is not None and value >= bound:
            raise ValueError(f"REDIS_WAIT_TIMEOUT_SECONDS: must be less than "
                             f"REDIS_TIMEOUT_SECONDS ({bound})")  # fmt: skip
        return value

    @field_validator("api_keys", "allowed_recipients", "allowed_senders", mode="before")
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

    @field_serializer("allowed_recipients", "allowed_senders")
    def _dump_address_list(self, allowed: frozenset[str] | None) -> str | None:
        return ",".join(sorted(allowed)) if allowed else None

    @field_validator("blocked_attachment_extensions")
    @classmethod
    def _extensions(cls, value: str) -> str:
        for extension in split_list(value):
            if not re.fullmatch(r"\.?[A-Za-z0-9_-]{1,16}", extension):
                raise ValueError(f"BLOCKED_ATTACHMENT_EXTENSIONS: {extension!r} is not a file "
                                 "name extension such as 'exe'")  # fmt: skip
        return value.strip()

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
        # parse_networks raises ValueError for anything that is not an IP or CIDR.
        for network in parse_networks(value):
            _check_proxy_network(network)
        return value.strip()

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in split_list(value):
            if "*" in origin:
                # Starlette would answer every origin: any web page could then use a
                # visitor's browser (on the operator's network, say) to call the API.
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} would let every web page call the API from its "
                    "visitors' browsers; list the origins, such as 'https://app.example.com'"
                )
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} is not an origin such as "
                    "'https://app.example.com' (scheme and host, no path)"
                )
        return value.strip()

    @field_validator("metrics_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Anyone who has it reads the queue's figures; a short or guessable one would be
        # found by trying (failures count towards AUTH_FAILURE_LIMIT only with API_KEYS).
        if value is not None and not re.fullmatch(r"[\x21-\x7e]{32,}", value.get_secret_value()):
            raise ValueError(
                "METRICS_TOKEN: 32 or more printable characters without spaces, e.g. the "
                "output of `openssl rand -hex 32`"
            )
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            delays = [-1.0]
        if not delays or len(delays) > 20 or any(not 0 <= d <= 7 * 86400 for d in delays):
            raise ValueError("WEBHOOK_RETRY_SCHEDULE: 1 to 20 comma-separated waits in "
                             "seconds, each at most a week, such as '5,300,1800'")  # fmt: skip
        return value.strip()

    @field_validator("webhook_lease_seconds")
    @classmethod
    def _lease_over_timeout(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("webhook_timeout_seconds")
        if timeout is not None and value <= timeout:
            raise ValueError("WEBHOOK_LEASE_SECONDS must be longer than "
                             f"WEBHOOK_TIMEOUT_SECONDS ({timeout:g})")  # fmt: skip
        return value

    @property
    def webhook_retry_delays(self) -> list[float]:
        """WEBHOOK_RETRY_SCHEDULE in seconds: the wait before retry 1, 2, ..."""
        return [float(p) for p in self.webhook_retry_schedule.replace(" ", "").split(",") if p]

    @field_validator("log_level")
    @classmethod
    def _level_name(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL: must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _format_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mail_from")
    @classmethod
    def _plain_sender(cls, value: str) -> str:
        # The sender lands in the From header and the SMTP envelope of every mail.
        # email-validator would refuse the dev default's "localhost", so check the shape only.
        bad = _first_unprintable(value)
        if bad is not None:
            raise ValueError(
                f"MAIL_FROM holds {bad}, a control or line-separator character: it would "
                "break or forge the From header of every mail; write it on one plain line"
            )
        local, at, domain = parseaddr(value)[1].rpartition("@")
        if not (local and at and domain):
            raise ValueError("MAIL_FROM must be an address such as 'App <noreply@example.com>'")
        return value

    @property
    def data_timeout_seconds(self) -> float:
        """The wait for the end-of-DATA reply: never shorter than a command's."""
        return max(self.smtp_data_timeout_seconds, self.smtp_timeout_seconds)

    @property
    def mail_from_address(self) -> str:
        """The bare address of ``MAIL_FROM``, used as the SMTP envelope sender."""
        return parseaddr(self.mail_from)[1]

    @property
    def sender_allow_list(self) -> frozenset[str]:
        """Where a request's ``from`` may be: ALLOWED_SENDERS, else MAIL_FROM's domain."""
        return self.allowed_senders or frozenset({"@" + domain_of(self.mail_from_address)})

    @property
    def blocked_extensions(self) -> frozenset[str]:
        """BLOCKED_ATTACHMENT_EXTENSIONS as lower-case extensions without the dot."""
        return _extension_set(self.blocked_attachment_extensions)

    @property
    def max_request_bytes(self) -> int:
        """Largest HTTP request body: text, html and attachments together may reach
        ``max_body_bytes``; JSON escaping (``\\uXXXX``) can double non-ASCII text and base64
        adds a third to attachments, so twice that leaves room for either."""
        return 2 * self.max_body_bytes + 64 * 1024

    # A worker's heartbeat (its lease renewal) comes every third of JOB_LEASE_SECONDS; these
    # are the one place that says so, for the workers and for those who read heartbeats.
    @property
    def heartbeat_seconds(self) -> float:
        """How often a worker renews its leases, which is its heartbeat."""
        return self.job_lease_seconds / 3

    @property
    def live_window_ms(self) -> int:
        """A worker heard from within this long is live: three leases, nine heartbeats."""
        return int(3 * self.job_lease_seconds * 1000)

    @property
    def heartbeat_late_seconds(self) -> float:
        """A heartbeat older than this is late: two missed."""
        return 2 * self.heartbeat_seconds

    @property
    def max_batch_request_bytes(self) -> int:
        """Largest batch request body. Not 100 x ``max_request_bytes`` (200 MiB at the
        default, all parsed in memory at once): 16 MiB, about 160 KiB per message of a full
        batch, and never less than one largest single message."""
        return max(16 * 1024 * 1024, self.max_request_bytes)


class GivenSettings(Settings):
    """``Settings`` of the values given and the defaults, validated as always, with no
    environment or ``.env`` read: what a tool or test shortcut that names its values builds
    (``emailq.startup.given_settings``), so the operator's configuration cannot leak in."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


# The widest network a trusted proxy may be given, per IP version. Every address in it may
# name any client in X-Forwarded-For, so 0.0.0.0/0 or ::/0 lets anyone on the internet
# choose their own rate-limit key. IPv4 /8 is the widest block one organisation holds (and
# 10.0.0.0/8 the widest private range); IPv6 /24 is wider than any provider's allocation
# (/29 to /32; Cloudflare publishes its proxies as /29 and /32) yet narrower than a
# registry's. Proxies are listed by their own networks, never by the internet's.
MIN_PROXY_PREFIX = {4: 8, 6: 24}
# IPv6 ranges that carry an IPv4 address in their last 32 bits (mapped, and NAT64's): a
# network reaching into them (::/24 reaches ::ffff:0:0/96) is bound as IPv4 is, in those bits.
_EMBEDDED_IPV4 = (ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"))


def _check_proxy_network(network: IPNetwork) -> None:
    """Refuse a TRUSTED_PROXIES network wider than ``MIN_PROXY_PREFIX`` allows."""
    least = MIN_PROXY_PREFIX[network.version]
    embeds_ipv4 = isinstance(network, ipaddress.IPv6Network) and any(
        network.overlaps(embedded) for embedded in _EMBEDDED_IPV4
    )
    if network.prefixlen >= least and embeds_ipv4:
        least = 96 + MIN_PROXY_PREFIX[4]
    if network.prefixlen < least:
        raise ValueError(
            f"TRUSTED_PROXIES: {network} is wider than /{least}; everyone in it could set "
            "any client address with X-Forwarded-For. List your proxies' own addresses"
        )


@functools.lru_cache(maxsize=4)
def _extension_set(value: str) -> frozenset[str]:
    # Cached: read on every send that carries an attachment.
    return frozenset(e.lower().lstrip(".") for e in split_list(value))


def _first_unprintable(value: str) -> str | None:
    """``U+XXXX`` of the first control, format or line/paragraph separator character."""
    # Cc: C0, DEL and C1 (CR, LF, NUL, VT, FF, NEL ...); Zl/Zp: U+2028/U+2029, which
    # str.splitlines() and some mail software treat as line breaks; Cf: invisible format
    # characters (bidi overrides) that make a From line read other than it is; Cs: lone
    # surrogates, which cannot be encoded at all.
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return f"U+{ord(char):04X}"
    return None
