"""Turn a send request into a ``Job``: validate addresses, render placeholders, refuse
anything that could inject headers or blow past the size limit.

This is the one place user text becomes mail content, so every check lives here and runs
before anything is stored: a request either becomes a complete, safe ``Job`` or an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, NamedTuple, Protocol

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from emailq.errors import InvalidMessage, MessageTooLarge
from emailq.models import Job, Priority
from emailq.templating import check_header, check_text, placeholders, render

MAX_RECIPIENTS = 50
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit; longer subjects are folded, not cut
MAX_AHEAD = timedelta(days=30)  # the furthest send_at, and the longest ttl_seconds


def normalize_address(value: str) -> str:
    """A single addr-spec, validated and normalized by email-validator (no DNS lookup)."""
    # "=?" is legal in a local part, and it opens an RFC 2047 encoded word: CPython's address
    # parser decoded "=?us-ascii?q?victim=40evil.test=2C?=@example.com" into two addresses.
    # message.py never parses addresses; refusing them here keeps readers downstream safe.
    if "=?" in value:
        raise ValueError("an address must not contain '=?' (an RFC 2047 encoded word)")
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc


# "format": "email" tells clients (and schema-driven fuzzers) what is expected; the
# validator is what decides (no quoted local parts, no "=?", no special-use domains).
Address = Annotated[
    str, AfterValidator(normalize_address), Field(json_schema_extra={"format": "email"})
]
VariableName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
TEMPLATE_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # a stored template's name: its directory's name


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
    send_at: AwareDatetime | None = Field(default=None, description="RFC 3339; up to 30 days")
    expires_at: AwareDatetime | None = Field(
        default=None, description="not sent after this: it fails as 'expired'"
    )
    ttl_seconds: StrictInt | None = Field(
        default=None, ge=1, le=int(MAX_AHEAD.total_seconds()),
        description="like expires_at, counted from send_at if given, else from now",
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


def _placeholder_content(request: EmailRequest, *, max_body_bytes: int) -> Content:
    """The request's own subject, body and html with ``{name}`` placeholders filled."""
    if request.subject is None or request.body is None:
        missing = "subject" if request.subject is None else "body"
        raise InvalidMessage(f"{missing} is required (or a template)", field=missing)
    values = request.placeholder_values()
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
    return Job(
        to=request.to,
        subject=subject,
        text=text,
        html=html,
        cc=request.cc,
        bcc=request.bcc,
        reply_to=request.reply_to,
    )


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
