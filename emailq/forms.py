"""Contact forms: their configuration (``FORMS_FILE``) and how a submission becomes a ``Job``.

A form fixes everything that decides where mail goes: the recipients, the subject
template, the thank-you page. A submission only supplies field values, which are rendered
with ``templating.render`` (plain ``{name}`` lookups) and HTML-escaped in the HTML body.
The visitor's ``email`` becomes ``Reply-To`` only; ``From`` stays ``MAIL_FROM``.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from emailq.compose import (
    MAX_SUBJECT_CHARS,
    Address,
    check_body,
    normalize_address,
    render_subject,
)
from emailq.configfile import read_config_file
from emailq.errors import ConfigError, InvalidMessage, validation_message
from emailq.models import Job
from emailq.templating import check_header, unfilled

HONEYPOT = "_gotcha"
# Fields a page may send that are never part of the mail (the CAPTCHA tokens and the
# redirect hints some form services take; ours ignores them, see ``Form.redirect``).
CONTROL_FIELDS = frozenset({HONEYPOT, "_next", "redirect", "cf-turnstile-response",
                            "h-captcha-response"})  # fmt: skip
OWNER_PREFIX = "form:"  # a form task's key_id; API key ids cannot contain ':'
DUPLICATE_WINDOW_SECONDS = 600  # an identical submission from one client is dropped this long
MAX_FIELDS = 50
MAX_FIELD_NAME = 64
# Every line break str.splitlines() knows. A mail client shows a bare CR, VT, NEL or U+2028
# as a new line too, so each becomes LF before the value is laid out in the body.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


class CaptchaProvider(StrEnum):
    """The CAPTCHA services a form may require."""

    TURNSTILE = "turnstile"  # Cloudflare Turnstile
    HCAPTCHA = "hcaptcha"


VERIFY_URLS = {
    CaptchaProvider.TURNSTILE: "https://challenges.cloudflare.com/turnstile/v0/siteverify",
    CaptchaProvider.HCAPTCHA: "https://api.hcaptcha.com/siteverify",
}
TOKEN_FIELDS = {
    CaptchaProvider.TURNSTILE: "cf-turnstile-response",
    CaptchaProvider.HCAPTCHA: "h-captcha-response",
}


class Captcha(BaseModel):
    """A form's CAPTCHA: provider, secret, and where tokens are verified."""

    model_config = ConfigDict(extra="forbid")

    provider: CaptchaProvider
    secret: str = Field(min_length=1)
    verify_url: str = ""  # empty: the provider's own siteverify URL

    @property
    def url(self) -> str:
        """The verify URL in effect."""
        return self.verify_url or VERIFY_URLS[self.provider]

    @property
    def token_field(self) -> str:
        """The form field the provider's widget fills with its token."""
        return TOKEN_FIELDS[self.provider]


def _redirect_target(value: str) -> str:
    # Absolute http(s), or a path on the API's own host; "//host" would leave it.
    if value.startswith(("https://", "http://")) or (value.startswith("/") and
                                                     not value.startswith("//")):  # fmt: skip
        check_header(value, "redirect")
        return value
    raise ValueError("must be an http(s) URL or a path starting with '/'")


class Form(BaseModel):
    """One form of ``FORMS_FILE``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    to: list[Address] = Field(min_length=1, max_length=10)
    subject: str = Field(max_length=MAX_SUBJECT_CHARS)
    allowed_origins: list[str] = Field(default_factory=list)
    # Always where a plain form post is sent: a `_next`/`redirect` field is ignored.
    redirect: Annotated[str, Field(min_length=1)]
    captcha: Captcha | None = None

    @field_validator("subject")
    @classmethod
    def _subject_is_a_header(cls, value: str) -> str:
        return check_header(value, "subject", tab=True)

    @field_validator("redirect")
    @classmethod
    def _redirect(cls, value: str) -> str:
        return _redirect_target(value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, _, host = origin.partition("://")
            if scheme not in ("http", "https") or not host or "/" in host:
                raise ValueError(f"{origin!r} is not an origin such as 'https://example.com'")
        return value


class FormsConfigError(ConfigError, ValueError):
    """``FORMS_FILE`` is unreadable or invalid; the message names the form and field."""


def load_forms(path: Path | None) -> dict[str, Form]:
    """The forms of ``path`` (TOML, or JSON by extension) by id; none when ``path`` is None.

    The file holds ``[[forms]]`` tables (a JSON ``{"forms": [...]}``).
    """
    if path is None:
        return {}
    data = read_config_file(path, "FORMS_FILE", FormsConfigError)
    entries = data.get("forms", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise FormsConfigError(f"FORMS_FILE {path}: expected a list of forms under 'forms'")
    forms: dict[str, Form] = {}
    for index, entry in enumerate(entries):
        name = entry.get("id", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
        try:
            form = Form.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(form)"
            raise FormsConfigError(f"FORMS_FILE {path}: form {name!r}, field {where}: "
                                   f"{validation_message(first)}") from exc  # fmt: skip
        if form.id in forms:
            raise FormsConfigError(f"FORMS_FILE {path}: form {form.id!r} is defined twice")
        forms[form.id] = form
    return forms


def content_fields(submitted: Mapping[str, str]) -> dict[str, str]:
    """The submitted fields that belong in the mail, checked for count and names. Values
    stay as given: a refusal (a line break in the subject) names the character sent."""
    fields = {k: v for k, v in submitted.items() if k not in CONTROL_FIELDS}
    if len(fields) > MAX_FIELDS:
        raise InvalidMessage(f"at most {MAX_FIELDS} fields per submission")
    for name in fields:
        if len(name) > MAX_FIELD_NAME:
            raise InvalidMessage("field names must be at most 64 characters, one line each")
        # A name starts a line of the text body: a line break in it could forge another.
        check_header(name, "field names")
    return fields


def _laid_out(fields: Mapping[str, str]) -> dict[str, str]:
    """The values with every line break made LF, for the body."""
    return {name: _LINE_BREAKS.sub("\n", value) for name, value in fields.items()}


def _ordered(fields: Mapping[str, str]) -> list[tuple[str, str]]:
    first = [k for k in ("name", "email") if k in fields]
    rest = [k for k in fields if k not in first and k != "message"]
    tail = ["message"] if "message" in fields else []
    return [(k, fields[k]) for k in first + rest + tail]


def _text_body(form: Form, fields: Mapping[str, str]) -> str:
    lines = [f"New submission of the form '{form.id}':", ""]
    for name, value in _ordered(fields):
        # Values hold LF only (_laid_out): each of their lines is indented, so no value
        # can start a line of its own ("email: ..." after a line break).
        if "\n" in value:
            lines += [f"{name}:", *(f"  {line}" for line in value.split("\n")), ""]
        else:
            lines.append(f"{name}: {value}")
    return "\n".join(lines) + "\n"


def _html_body(form: Form, fields: Mapping[str, str]) -> str:
    rows = "".join(
        f'<tr><th align="left" valign="top">{html.escape(name)}</th>'
        f'<td style="white-space:pre-wrap">{html.escape(value)}</td></tr>'
        for name, value in _ordered(fields)
    )
    return (f"<p>New submission of the form <b>{html.escape(form.id)}</b>:</p>"
            f"<table cellpadding=\"4\">{rows}</table>")  # fmt: skip


def form_job(form: Form, fields: Mapping[str, str], *, max_body_bytes: int) -> Job:
    """The mail for one submission; raises ``InvalidMessage`` or ``MessageTooLarge``."""
    reply_to = None
    if fields.get("email"):
        try:
            reply_to = normalize_address(fields["email"])
        except ValueError as exc:
            raise InvalidMessage(f"email: {exc}", field="email") from exc
    # A value with a line break or control character cannot reach the header: it is
    # refused (422), named by its field. Values are rendered as given: render()
    # substitutes {name} only, never evaluates.
    # A field the subject names but the page did not send is empty, not "{name}" in the
    # subject: the visitor's message still arrives (the send API refuses such a gap, 422;
    # here the page, not the caller, left it out).
    missing = dict.fromkeys(unfilled(form.subject, fields), "")
    subject = render_subject(form.subject, {**fields, **missing})
    laid_out = _laid_out(fields)
    text, body_html = _text_body(form, laid_out), _html_body(form, laid_out)
    check_body(text, body_html, max_body_bytes=max_body_bytes, field="submission")
    return Job(to=form.to[0], cc=form.to[1:], subject=subject, text=text, html=body_html,
               reply_to=reply_to)  # fmt: skip


def submission_key(form_id: str, client: str, fields: Mapping[str, str]) -> str:
    """What makes two submissions the same: form, client address and every field, as laid
    out in the mail (one sent again with other line breaks is the same submission)."""
    canonical = json.dumps([form_id, client, sorted(_laid_out(fields).items())],
                           separators=(",", ":"))  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()
