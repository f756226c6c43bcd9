"""The one submission pipeline: how a send request becomes a task, for every entry point.

The API's single send and each message of a batch, the CLI's ``send`` and ``send --file``
call ``prepare``; a contact form's submission goes through ``prepare_form``. So a new
field or check of a send is made in one place. The steps, in order:

1. ``compose``: render and check the content (subject, body, placeholders, recipients'
   count, attachments, size), from the request's own fields or the stored template it
   names (``templates``);
2. ``check_sender``: may this principal send as its ``from`` (ALLOWED_SENDERS, else
   MAIL_FROM's domain; its key's senders);
3. ``check_attachments``: no attachment of a type BLOCKED_ATTACHMENT_EXTENSIONS refuses;
4. ``check_recipients``: may this principal send to them (ALLOWED_RECIPIENTS, its key's
   domains);
5. ``schedule``: lane, send_at and expiry against ``now``;
6. ``task``: the ``EnqueueItem``, under a new unguessable id, with the request's metadata
   and tags.

A form's mail is laid out by ``emailq.forms.form_job`` with the same subject and body
checks (``compose.render_subject``, ``compose.check_body``), sent at once in the default
lane, as the form (``form:<id>``, its own owner and quota owner). Its recipients are the
operator's, from FORMS_FILE: neither ALLOWED_RECIPIENTS nor a key's domains apply to them.

Each refusal raises one of ``REJECTED``; an entry point turns it into its own answer (the
API a 4xx in its error shape, a batch a per-message entry, the CLI exit code 1). What is
not the task's stays with the entry point: authentication, rate limits, idempotency and
the shape of an answer. The pipeline is synchronous and stores nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pydantic import ValidationError

from emailq import labels
from emailq.addresses import in_allow_list, in_domains
from emailq.apikeys import Principal, Scope
from emailq.attachments import check_blocked
from emailq.compose import EmailRequest, Schedule, TemplateRenderer, compose, schedule
from emailq.errors import Forbidden, InvalidMessage, MessageTooLarge
from emailq.forms import OWNER_PREFIX, Form, form_job
from emailq.models import Job, Mailbox, Priority
from emailq.netlists import split_list
from emailq.queue import EnqueueItem
from emailq.settings import DEFAULT_BLOCKED_EXTENSIONS

# Every error a request can be refused with before anything is stored: a field that does
# not validate (a batch message, a CLI line), content that must not be sent, content over
# MAX_BODY_BYTES, a sender or recipient the principal may not use.
REJECTED: tuple[type[Exception], ...] = (
    ValidationError,
    InvalidMessage,
    MessageTooLarge,
    Forbidden,
)

# The operator at the command line. Its tasks carry no owner, as a caller's do while
# API_KEYS is unset (admin keys and local clients read them), and no quota owner; nothing
# limits where it sends (see ``OperatorLimits``).
OPERATOR = Principal("operator", Scope.ADMIN, anonymous=True)

NOW = Schedule(lane=Priority.DEFAULT, send_at_ms=0, expires_at_ms=0)


class Limits(Protocol):
    """What the pipeline reads of the configuration. ``Settings`` is one, so the API passes
    its settings as they are, with no copy made per request."""

    @property
    def max_body_bytes(self) -> int:
        """MAX_BODY_BYTES: text and HTML together."""

    @property
    def allowed_recipients(self) -> frozenset[str] | None:
        """ALLOWED_RECIPIENTS: addresses and ``@domain`` entries; None or empty for any."""

    @property
    def sender_allow_list(self) -> frozenset[str]:
        """Addresses and ``@domain`` entries a ``from`` may use; empty: none at all."""

    @property
    def blocked_extensions(self) -> frozenset[str]:
        """Attachment file name extensions refused (lower case, no dot)."""


@dataclass(frozen=True)
class OperatorLimits:
    """The CLI's ``Limits``: the operator's mail may go anywhere, but its ``from`` and its
    attachments follow the settings as everyone's do: they protect the relay's domains and
    the recipients, not the API from its callers."""

    max_body_bytes: int
    allowed_recipients: frozenset[str] | None = None
    sender_allow_list: frozenset[str] = frozenset()
    blocked_extensions: frozenset[str] = field(
        default_factory=lambda: frozenset(split_list(DEFAULT_BLOCKED_EXTENSIONS))
    )


def recipient_refusal(job: Job, principal: Principal, limits: Limits) -> str | None:
    """Why ``principal`` may not send ``job`` (ALLOWED_RECIPIENTS, then the key's domains),
    or None if it may. To, Cc and Bcc are all checked."""
    allowed = limits.allowed_recipients
    for address in job.recipients:
        if allowed and not in_allow_list(address, allowed):
            return f"recipient {address} is not in ALLOWED_RECIPIENTS"
        if principal.domains and not in_domains(address, principal.domains):
            return f"key {principal.key_id!r} may not send to the domain of {address}"
    return None


def sender_refusal(sender: Mailbox, principal: Principal, limits: Limits) -> str | None:
    """Why ``principal`` may not send as ``sender`` (ALLOWED_SENDERS or, without it,
    MAIL_FROM's domain; then the key's own senders), or None if it may."""
    if not in_allow_list(sender.address, limits.sender_allow_list):
        allowed = ", ".join(sorted(limits.sender_allow_list)) or "none"
        return (f"from {sender.address} is not one of the allowed senders ({allowed}; "
                "ALLOWED_SENDERS, by default MAIL_FROM's domain)")  # fmt: skip
    if principal.senders and not in_allow_list(sender.address, principal.senders):
        return f"key {principal.key_id!r} may not send from {sender.address}"
    return None


def check_sender(job: Job, principal: Principal, limits: Limits) -> None:
    """Raise ``Forbidden`` unless ``principal`` may send as the job's ``from``. Without one
    the mail goes out as MAIL_FROM, which every caller may use."""
    if job.sender is not None:
        refusal = sender_refusal(job.sender, principal, limits)
        if refusal is not None:
            raise Forbidden(refusal)


def check_attachments(job: Job, limits: Limits) -> None:
    """Raise ``InvalidMessage`` for an attachment BLOCKED_ATTACHMENT_EXTENSIONS refuses."""
    check_blocked(job.attachments, limits.blocked_extensions)


def check_recipients(job: Job, principal: Principal, limits: Limits) -> None:
    """Raise ``Forbidden`` unless ``principal`` may send to every recipient of ``job``."""
    refusal = recipient_refusal(job, principal, limits)
    if refusal is not None:
        raise Forbidden(refusal)


def task(
    job: Job, principal: Principal, *, request_id: str, quota: str = "", when: Schedule = NOW,
    labels: str = "",
) -> EnqueueItem:  # fmt: skip
    """``job`` as a task of ``principal``'s, ready to store. ``quota`` is whose share of
    MAX_STORED_BYTES_PER_KEY it draws on ('' for none); ``labels`` its metadata and tags
    (``emailq.labels.encode``)."""
    # uuid4: 122 random bits from os.urandom, so task ids cannot be guessed.
    return EnqueueItem(str(uuid.uuid4()), job, request_id, when.lane, when.send_at_ms,
                       when.expires_at_ms, principal.owner, quota, labels)  # fmt: skip


def prepare(
    request: EmailRequest,
    principal: Principal,
    now: datetime,
    limits: Limits,
    *,
    request_id: str,
    quota: str = "",
    templates: TemplateRenderer | None = None,
) -> EnqueueItem:
    """``request``, sent by ``principal`` at ``now``, as a task ready to store; raises one
    of ``REJECTED`` (see the module docstring for the steps). ``templates``: the stored
    templates a request may name (TEMPLATES_DIR), if any."""
    job = compose(request, max_body_bytes=limits.max_body_bytes, templates=templates)
    check_sender(job, principal, limits)
    check_attachments(job, limits)
    check_recipients(job, principal, limits)
    when = schedule(request, now)
    return task(job, principal, request_id=request_id, quota=quota, when=when,
                labels=labels.encode(request.metadata, request.tags))  # fmt: skip


def prepare_form(
    form: Form, fields: Mapping[str, str], limits: Limits, *, request_id: str
) -> EnqueueItem:
    """A contact form's submission (its content ``fields``) as a task of the form's; raises
    ``InvalidMessage`` or ``MessageTooLarge``."""
    job = form_job(form, fields, max_body_bytes=limits.max_body_bytes)
    owner = OWNER_PREFIX + form.id  # one stored-bytes budget per form
    return task(job, Principal(owner, Scope.SEND), request_id=request_id, quota=owner)
