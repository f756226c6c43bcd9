"""Turn a send request into a ``Job``: validate addresses, render placeholders, refuse
anything that could inject headers or blow past the size limit.

This is the one place user text becomes mail content, so every check lives here and runs
before anything is stored: a request either becomes a complete, safe ``Job`` or an error.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal, NamedTuple, Protocol

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictInt,
    WithJsonSchema,
)

from emailq.attachments import MAX_ATTACHMENTS, AttachmentIn, decoded_size
from emailq.errors import InvalidMessage, MessageTooLarge
from emailq.labels import Metadata, Tags
from emailq.models import Job, Mailbox, Priority
from emailq.templating import check_header, check_text, placeholders, render, unfilled

MAX_RECIPIENTS = 50
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit; longer subjects are folded, not cut
MAX_AHEAD = timedelta(days=30)  # the furthest send_at, and the longest ttl_seconds


# Addresses validated lately, by the exact string given: a sender's few recipients and its
# own from recur in request after request, and email-validator takes longer over one (about
# 18 us) than the rest of the request model. Only an address that validated is kept (an
# exception is never cached), so an entry is at most about MAX_CACHED_ADDRESS characters and
# the whole at most ADDRESS_CACHE_SIZE of them, however many distinct ones callers send.
ADDRESS_CACHE_SIZE = 4096
MAX_CACHED_ADDRESS = 320  # a valid address is at most 254 octets; longer input: no cache


def _normalized(value: str) -> str:
    # A pure function of ``value``: no DNS (check_deliverability=False), and every other
    # option of email-validator left at its default, which nothing in emailq changes.
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        # FastAPI's EmailStr wording, which the README's examples show.
        raise ValueError(f"value is not a valid email address: {exc}") from exc


_cached_normalized = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(_normalized)


def normalize_address(value: str) -> str:
    """A single addr-spec, validated and normalized by email-validator (no DNS lookup)."""
    # "=?" is legal in a local part, and it opens an RFC 2047 encoded word: CPython's address
    # parser decoded "=?us-ascii?q?victim=40evil.test=2C?=@example.com" into two addresses.
    # message.py never parses addresses; refusing them here keeps readers downstream safe.
    if "=?" in value:
        raise ValueError("an address must not contain '=?' (an RFC 2047 encoded word)")
    if len(value) > MAX_CACHED_ADDRESS:
        return _normalized(value)  # refused by email-validator anyway; not worth a slot
    return _cached_normalized(value)


# "format": "email" tells clients (and schema-driven fuzzers) what is expected; the
# validator is what decides (no quoted local parts, no "=?", no special-use domains).
Address = Annotated[
    str, AfterValidator(normalize_address), Field(json_schema_extra={"format": "email"})
]
VariableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
TEMPLATE_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # a stored template's name: its directory's name

MAX_DISPLAY_NAME = 200
# "Name <address>", the form Resend and Postmark take; a bare address has no angle brackets.
_NAME_ADDR = re.compile(r"(?P<name>[^<>]*)<(?P<address>[^<>]*)>")
_QUOTED_PAIR = re.compile(r"\\(.)")


def _display_name(text: str) -> str:
    """A display name as plain text: one pair of surrounding quotes (``"Shop, Inc."``) is
    taken as quoting and removed; everything else is the name as written."""
    # Cc/Zl/Zp would break or forge the header; Cf (bidi overrides, zero-width marks) would
    # make the From line read other than it is, as MAIL_FROM's own check refuses. Checked
    # before anything is stripped: strip() drops U+2028 and friends at the ends.
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")),
               None)  # fmt: skip
    if bad is not None:
        raise ValueError(f"the display name must not contain control or format characters "
                         f"(found U+{ord(bad):04X})")  # fmt: skip
    name = text.strip(" ")
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = _QUOTED_PAIR.sub(r"\1", name[1:-1])
    if len(name) > MAX_DISPLAY_NAME:
        raise ValueError(f"the display name is over {MAX_DISPLAY_NAME} characters")
    return name


def parse_mailbox(value: object) -> Mailbox:
    """``from`` as a request gives it, ``Shop <shop@example.com>`` or a bare address, as a
    ``Mailbox``. The name is plain text (``emailq.message`` encodes it); the address is
    validated as ``to`` is. Raises ``ValueError``, so pydantic answers 422 naming ``from``."""
    if isinstance(value, Mailbox):
        return value
    if not isinstance(value, str):
        raise ValueError("from must be a string such as 'Shop <shop@example.com>'")
    if len(value) > 998:
        raise ValueError("from is over 998 characters")
    found = _NAME_ADDR.fullmatch(value.strip())
    if found is None and ("<" in value or ">" in value):
        raise ValueError("from must be 'Name <address>' or an address; '<' and '>' only "
                         "around the address")  # fmt: skip
    name, address = (found["name"], found["address"]) if found else ("", value)
    return Mailbox(name=_display_name(name), address=normalize_address(address.strip()))


# A date and a time, as RFC 3339 begins. pydantic also takes a number, or a string of digits,
# as Unix time (seconds, or milliseconds past 2e10: "1796000000" is 2026-11-30): a guess
# about the caller's unit that a schedule must not rest on.
_RFC3339_START = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d")


def _rfc3339(value: object) -> object:
    if isinstance(value, datetime):  # a Python caller's own (the CLI builds requests too)
        return value
    if not isinstance(value, str) or not _RFC3339_START.match(value):
        raise ValueError("must be an RFC 3339 date and time with its offset, such as "
                         "2025-05-01T09:30:00+09:00 (not a Unix time)")  # fmt: skip
    return value


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]


FromAddress = Annotated[
    Mailbox,
    PlainValidator(parse_mailbox),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["Shop <shop@example.com>"], "description": (
        "the sender, 'Name <address>' or an address (default: MAIL_FROM); limited to "
        "ALLOWED_SENDERS (default: MAIL_FROM's domain) and the key's senders, else 403")}),
]  # fmt: skip


class EmailRequest(BaseModel):
    """The send request: the original's four fields, plus optional extras."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "to": "user@example.com",
                    "subject": "Hello",
                    "body": "{username}님 안녕하세요!",
                    "username": "홍길동",
                }
            ]
        },
    )

    to: Address = Field(description="the recipient's address")
    # Required unless `template` names a stored template, which gives all three (compose).
    subject: str | None = Field(
        default=None, max_length=MAX_SUBJECT_CHARS,
        description="with {name} placeholders; required unless `template` is given",
    )  # fmt: skip
    body: str | None = Field(
        default=None,
        description="the text body, with {name} placeholders; required unless `template` is given",
    )
    username: str | None = Field(default=None, max_length=256, description="fills {username}")
    html: str | None = Field(default=None, description="an HTML body beside the text one")
    reply_to: Address | None = Field(default=None, description="the Reply-To address")
    cc: list[Address] = Field(
        default_factory=list,
        max_length=MAX_RECIPIENTS,
        description=f"Cc recipients ({MAX_RECIPIENTS} in all at most)",
    )
    bcc: list[Address] = Field(
        default_factory=list, max_length=MAX_RECIPIENTS, description="Bcc recipients, in no header"
    )
    variables: dict[VariableName, str] = Field(
        default_factory=dict, max_length=100,
        description="fill {name} as username does, or a stored template's variables",
        # patternProperties alone would let the schema allow any other key and value.
        json_schema_extra={"additionalProperties": False},
    )  # fmt: skip
    template: str | None = Field(
        default=None, pattern=TEMPLATE_NAME,
        description="a stored template (TEMPLATES_DIR) that gives subject, body and html, "
                    "rendered with `variables`",
    )  # fmt: skip
    priority: Priority = Field(default=Priority.DEFAULT, description="the lane it waits in")
    send_at: Rfc3339 | None = Field(default=None, description="RFC 3339; up to 30 days")
    expires_at: Rfc3339 | None = Field(
        default=None, description="not sent after this: it fails as 'expired'"
    )
    ttl_seconds: StrictInt | None = Field(
        default=None, ge=1, le=int(MAX_AHEAD.total_seconds()),
        description="like expires_at, counted from send_at if given, else from now",
    )  # fmt: skip
    # -- what users of Resend and Postmark expect (see the README's table) --
    from_: FromAddress | None = Field(
        default=None, alias="from",
        description="the sender, 'Shop <shop@example.com>' or a bare address; default MAIL_FROM; "
        "limited by ALLOWED_SENDERS and the key's senders",
    )  # fmt: skip
    placeholders: Literal["on", "off"] = Field(
        default="on", description="'on': every {name} in subject, body and html needs a value "
        "(422 naming it otherwise); 'off': the text is sent as written, braces and all",
    )  # fmt: skip
    metadata: Metadata = Field(default_factory=dict)
    tags: Tags = Field(default_factory=list)
    attachments: list[AttachmentIn] = Field(
        default_factory=list, max_length=MAX_ATTACHMENTS,
        description=f"up to {MAX_ATTACHMENTS} files; their decoded bytes count in "
        "MAX_BODY_BYTES with the text and html",
    )  # fmt: skip

    def placeholder_values(self) -> dict[str, str]:
        """The ``{name}`` map: ``variables``, with ``username`` taking its own name."""
        values = dict(self.variables)
        if self.username is not None:
            values["username"] = self.username
        return values

    def variable_field(self, name: str) -> str:
        """The request field a placeholder value came from, as errors name it."""
        return name if name == "username" and self.username is not None else f"variables.{name}"


def render_subject(
    template: str, values: Mapping[str, str], *, field_of: Callable[[str], str] = str
) -> str:
    """``template`` with ``values`` substituted, checked as a subject: the one subject check,
    which the send request's subject and a contact form's both pass.

    The template, every value it uses and the result must be safe in a header; the result
    valid Unicode of at most ``MAX_SUBJECT_CHARS``. Raises ``InvalidMessage`` (a value is
    named ``field_of(name)``, so the caller knows what to fix) or ``MessageTooLarge``.
    """
    check_header(template, "subject", tab=True)
    for name in placeholders(template, values):
        check_header(values[name], field_of(name), tab=True)
    return check_subject(render(template, values, limit=MAX_SUBJECT_CHARS * 4))


def check_subject(subject: str) -> str:
    """``subject`` if it is a safe, valid subject of at most ``MAX_SUBJECT_CHARS``, however
    it was made (placeholders, a stored template); raises ``InvalidMessage``."""
    check_header(subject, "subject", tab=True)
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidMessage(
            f"subject is over {MAX_SUBJECT_CHARS} characters after substitution", field="subject"
        )
    return check_text(subject, "subject")


def check_body(text: str, html: str | None, *, max_body_bytes: int, field: str = "body") -> None:
    """The checks every mail body passes however it was made: valid Unicode, text and HTML
    within ``max_body_bytes`` together, no NUL. ``field`` names the text in errors."""
    check_text(text, field)
    if html is not None:
        check_text(html, "html")
    size = len(text.encode()) + (len(html.encode()) if html else 0)
    if size > max_body_bytes:
        raise MessageTooLarge(f"{field} is {size} bytes; the limit is {max_body_bytes} bytes")
    if "\0" in text or (html and "\0" in html):
        raise InvalidMessage(f"{field} must not contain NUL characters", field=field)


class Content(NamedTuple):
    """A mail's rendered subject, text and HTML (None: text only)."""

    subject: str
    text: str
    html: str | None


class TemplateRenderer(Protocol):
    """Renders stored templates by name (``emailq.templates.Templates`` is one)."""

    def render(self, name: str, values: Mapping[str, str], *, max_body_bytes: int) -> Content:
        """The template's parts rendered with ``values``; raises ``InvalidMessage`` or
        ``MessageTooLarge``."""


def placeholder_values(request: EmailRequest) -> dict[str, str]:
    """The values ``{name}`` placeholders take: none at all with ``"placeholders": "off"``
    (every brace is text), else ``username`` and ``variables``, each placeholder of the
    subject, body and html needing one."""
    if request.placeholders == "off":
        return {}
    values = request.placeholder_values()
    parts = (("subject", request.subject), ("body", request.body), ("html", request.html))
    for field, template in parts:
        missing = unfilled(template or "", values)
        if missing:
            raise InvalidMessage(
                f"{field} uses {{{missing[0]}}}, which has no value: give it in variables "
                '(or username), or send "placeholders": "off" to send braces as written',
                field=field,
            )
    return values


def check_size(job: Job, *, max_body_bytes: int) -> None:
    """Text, html and the attachments' decoded bytes together within ``max_body_bytes``."""
    attached = decoded_size(job.attachments)
    if not attached:
        return  # text and html alone: check_body has counted them
    size = len(job.text.encode()) + len((job.html or "").encode()) + attached
    if size > max_body_bytes:
        raise MessageTooLarge(f"text, html and attachments are {size} bytes; the limit is "
                              f"{max_body_bytes} bytes (MAX_BODY_BYTES)")  # fmt: skip


def _placeholder_content(request: EmailRequest, *, max_body_bytes: int) -> Content:
    """The request's own subject, body and html with ``{name}`` placeholders filled."""
    if request.subject is None or request.body is None:
        missing = "subject" if request.subject is None else "body"
        raise InvalidMessage(f"{missing} is required (or a template)", field=missing)
    values = placeholder_values(request)
    subject = render_subject(request.subject, values, field_of=request.variable_field)
    text = render(request.body, values, limit=max_body_bytes)
    html = render(request.html, values, limit=max_body_bytes) if request.html else None
    return Content(subject, text, html)


def _template_content(
    request: EmailRequest, templates: TemplateRenderer | None, *, max_body_bytes: int
) -> Content:
    """The stored template's parts, rendered with the request's variables."""
    assert request.template is not None
    given = [f for f in ("subject", "body", "html") if getattr(request, f) is not None]
    if given:  # one source of content: which would win is not for us to guess
        raise InvalidMessage(f"give a template or {'/'.join(given)}, not both", field=given[0])
    if templates is None:
        raise InvalidMessage("no templates here: TEMPLATES_DIR is not set", field="template")
    values = request.placeholder_values()
    return templates.render(request.template, values, max_body_bytes=max_body_bytes)


def compose(
    request: EmailRequest, *, max_body_bytes: int, templates: TemplateRenderer | None = None
) -> Job:
    """Render and check ``request`` (its own content, or the stored template it names from
    ``templates``); raise ``InvalidMessage`` or ``MessageTooLarge``."""
    if 1 + len(request.cc) + len(request.bcc) > MAX_RECIPIENTS:
        raise InvalidMessage(f"at most {MAX_RECIPIENTS} recipients in to, cc and bcc together")
    if request.template is not None:
        subject, text, html = _template_content(request, templates, max_body_bytes=max_body_bytes)
    else:
        subject, text, html = _placeholder_content(request, max_body_bytes=max_body_bytes)
    check_body(text, html, max_body_bytes=max_body_bytes)
    job = Job(
        to=request.to,
        subject=subject,
        text=text,
        html=html,
        cc=request.cc,
        bcc=request.bcc,
        reply_to=request.reply_to,
        sender=request.from_,
        attachments=[item.attachment() for item in request.attachments],
    )
    check_size(job, max_body_bytes=max_body_bytes)
    return job


@dataclass(frozen=True)
class Schedule:
    """When and in which lane a task waits: times in epoch ms, 0 meaning now / never."""

    lane: Priority
    send_at_ms: int
    expires_at_ms: int


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def schedule(request: EmailRequest, now: datetime) -> Schedule:
    """Check priority, send_at and expiry against ``now``; raise ``InvalidMessage``."""
    if request.expires_at is not None and request.ttl_seconds is not None:
        raise InvalidMessage("give expires_at or ttl_seconds, not both", field="ttl_seconds")
    send_at = request.send_at
    if send_at is not None and send_at > now + MAX_AHEAD:
        raise InvalidMessage("send_at must be at most 30 days ahead", field="send_at")
    start = max(send_at, now) if send_at is not None else now
    expires = request.expires_at
    if request.ttl_seconds is not None:
        expires = start + timedelta(seconds=request.ttl_seconds)
    if expires is not None and expires <= start:
        raise InvalidMessage("expires_at must be after send_at and in the future",
                             field="expires_at")  # fmt: skip
    return Schedule(
        lane=request.priority,
        send_at_ms=_ms(send_at) if send_at is not None and send_at > now else 0,
        expires_at_ms=_ms(expires) if expires is not None else 0,
    )
