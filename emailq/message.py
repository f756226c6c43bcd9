"""Build the MIME message for a job.

Every header that carries request or operator text (From, To, Cc, Reply-To, Subject, an
attachment's Content-Disposition, and Message-ID, which holds MAIL_FROM's domain) is
written here in its final wire form and
stored as a ``WireHeader``; CPython's header parser never sees that text. It must not:
``msg["Subject"] = value`` parses ``value`` and decodes RFC 2047 encoded words in it, and
before 3.11.10 / 3.12.5 (CVE-2024-6923) the generator wrote the decoded CR/LF out as they
were, so ``=?utf-8?b?...?=`` in a subject could add a second From, a Bcc and a body of its
own. An encoded word in an address's local part was decoded into further addresses the
same way. Building the wire form ourselves makes the result the same on every Python,
patched or not.
"""

from __future__ import annotations

import binascii
import functools
import re
import secrets
import time
from datetime import UTC, datetime
from email import base64mime, quoprimime
from email.header import Header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from typing import Any, cast
from urllib.parse import quote

from emailq.addresses import ascii_domain
from emailq.attachments import check_content_type, check_filename
from emailq.errors import HeaderInjection
from emailq.models import Attachment, Job
from emailq.templating import check_header


class _CachedHeaderRegistry(HeaderRegistry):
    """``HeaderRegistry`` that makes each header class once.

    CPython's registry builds a new class with ``type()`` on every header it parses; that was
    a quarter of the worker's CPU time (13 headers per message). The classes hold no state,
    so one per header name serves every message. Only the headers that hold none of the
    request's text (Date, MIME-Version, Content-*) still go through it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# policy.SMTP: CRLF line ends and encoded-word headers for non-ASCII subjects.
_POLICY = SMTP.clone(header_factory=_CachedHeaderRegistry())

MAX_LINE = 78  # RFC 5322's recommended line length, which every header here keeps to
_PLACEHOLDER_DOMAIN = "emailq.invalid"
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# An RFC 5322 atom: a display name made of these (and spaces) needs no quotes.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")
_WORD = re.compile(r"[ \t]*[^ \t]+")


class WireHeader(str):
    """A header value already in wire form; the generator writes it exactly as given.

    ``email.policy`` folds a value that has a ``name`` attribute by calling its ``fold``
    (the documented protocol of header objects) instead of parsing it again, so neither
    ``as_bytes()`` nor aiosmtplib's own flattening re-reads our text. The ``str`` value is
    the text as a reader sees it (``msg["Subject"] == subject``). ``utf8_form`` is written
    when the policy allows UTF-8 headers (SMTPUTF8, which aiosmtplib uses whenever an
    envelope address is not ASCII); lines in both forms are joined with ``\\n``.
    """

    name: str
    ascii_form: str
    utf8_form: str

    def __new__(
        cls, name: str, text: str, ascii_form: str, utf8_form: str | None = None
    ) -> WireHeader:
        self = super().__new__(cls, text)
        self.name = name
        self.ascii_form = ascii_form
        self.utf8_form = ascii_form if utf8_form is None else utf8_form
        return self

    def __reduce__(self) -> tuple[type[WireHeader], tuple[str, str, str, str]]:
        # copy.deepcopy (the generator's, when it re-encodes an 8bit part for a relay
        # without 8BITMIME) rebuilds the header from these.
        return WireHeader, (self.name, str(self), self.ascii_form, self.utf8_form)

    def fold(self, *, policy: Any) -> str:
        """The header line(s), with the policy's line ends."""
        form = self.utf8_form if getattr(policy, "utf8", False) else self.ascii_form
        linesep: str = policy.linesep
        lines = form.split("\n")
        return f"{self.name}: {linesep.join(lines)}{linesep}"


def _fold_plain(name: str, text: str) -> str | None:
    """ASCII ``text`` folded before its spaces and tabs into lines of at most ``MAX_LINE``,
    or None when a word is too long for a line."""
    if len(name) + 2 + len(text) <= MAX_LINE:
        return text
    words = _WORD.findall(text)  # the caller stripped the ends: these cover all of text
    lines = [words[0]]
    width = len(name) + 2 + len(words[0])
    for word in words[1:]:
        if width + len(word) > MAX_LINE:
            lines.append("")  # the word starts with its space or tab: folding whitespace
            width = 0
        lines[-1] += word
        width += len(word)
    too_long = len(name) + 2 + len(lines[0]) > MAX_LINE or any(len(x) > MAX_LINE for x in lines)
    return None if too_long else "\n".join(lines)


def _encoded_words(name: str, text: str, *, fold: bool = True) -> str:
    # CPython's folder (before gh-144156) can leave the space between two encoded words
    # outside them, where decoders drop it: "발송 확인" arrives as "발송확인". The legacy
    # encoder keeps every space inside the words and folds to 76 columns (0: never).
    single = _one_encoded_word(name, text, fold=fold)
    if single is not None:
        return single
    return Header(text, "utf-8", header_name=name).encode(maxlinelen=None if fold else 0)


def _one_encoded_word(name: str, text: str, *, fold: bool) -> str | None:
    """What ``Header.encode`` writes for ``text`` when it fits one encoded word on the
    header's first line (most subjects), else None. Header picks the shorter of base64
    and quoted-printable for the whole text, then splits it a character at a time,
    encoding every prefix again: for a line that needs no split that loop only repeats,
    per message, the one encode done here (a test holds the two to the same output)."""
    if text and text.splitlines() != [text]:
        return None  # Header encodes each line on its own (check_header refuses these)
    raw = text.encode("utf-8")
    word = quoprimime.header_encode(raw, "utf-8")
    b64 = base64mime.header_encode(raw, "utf-8")
    if len(b64) < len(word):
        word = b64
    return word if not fold or len(name) + 2 + len(word) <= MAX_LINE else None


def unstructured(name: str, text: str) -> WireHeader:
    """A text header such as Subject: plain ASCII as written, anything else (non-ASCII,
    or text holding ``=?``, which a reader would decode) as RFC 2047 encoded words."""
    check_header(text, name.lower(), tab=True)
    # Readers drop whitespace at either end of a plain value; inside an encoded word it stays.
    plain = text.isascii() and "=?" not in text and text == text.strip(" \t")
    folded = _fold_plain(name, text) if plain else None
    return WireHeader(name, text, folded if folded is not None else _encoded_words(name, text))


def _ascii_domain(address: str) -> str:
    domain = address.rpartition("@")[2]
    # Cached per domain: the envelope and the headers of every mail to it ask again.
    idna = ascii_domain(domain)
    if not idna.isascii():
        raise HeaderInjection(f"address is not valid: {domain!r} has no IDNA form",
                              field="address")  # fmt: skip
    return idna


def _address_forms(address: str) -> tuple[str, str]:
    """An addr-spec for ASCII headers and for UTF-8 ones."""
    if "=?" in address or address.count("@") != 1 or any(c in address for c in ' <>()[],;:\\"'):
        raise HeaderInjection("address is not a plain addr-spec", field="address")
    check_header(address, "address")
    if address.isascii():
        return address, address
    local = address.rpartition("@")[0]
    # A non-ASCII local part has no ASCII form; it is only correct in a UTF-8 (SMTPUTF8)
    # message, which aiosmtplib sends whenever it is an envelope address. For a Reply-To
    # in an ASCII message this is what CPython wrote before: an encoded word of our making.
    ascii_local = local if local.isascii() else _encoded_words("", local, fold=False)
    return f"{ascii_local}@{_ascii_domain(address)}", address


def _folded_list(name: str, items: list[str]) -> str:
    """``items`` separated by ", ", folded before an item that would pass ``MAX_LINE``
    (one column is kept free on every line for the comma that may follow)."""
    lines = [items[0]]
    width = len(name) + 2 + len(items[0])
    for item in items[1:]:
        lines[-1] += ","
        if width + 2 + len(item) >= MAX_LINE:
            lines.append(f" {item}")
            width = 1 + len(item)
        else:
            lines[-1] += f" {item}"
            width += 2 + len(item)
    return "\n".join(lines)


def addresses(name: str, values: list[str]) -> WireHeader:
    """An address list header (To, Cc, Reply-To) of bare addr-specs, never parsed."""
    forms = [_address_forms(a) for a in values]
    return WireHeader(name, ", ".join(values), _folded_list(name, [a for a, _ in forms]),
                      _folded_list(name, [u for _, u in forms]))  # fmt: skip


def _phrase(name: str) -> str:
    """A display name as an atom sequence, a quoted string, or encoded words."""
    check_header(name, "display name")
    if not name.isascii() or "=?" in name:
        return _encoded_words("From", name)
    if _ATOMS.fullmatch(name) and name == name.strip() and "  " not in name:
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@functools.lru_cache(maxsize=16)
def mailbox(name: str, value: str) -> WireHeader:
    """``From``: MAIL_FROM's display name (written by us) and its bare address.

    Raises ``HeaderInjection`` when ``value`` holds no plain addr-spec or its name holds a
    control character. Cached: every message of a worker has the same sender.
    """
    display, address = parseaddr(value)
    return named_address(name, display, address)


def named_address(name: str, display: str, address: str) -> WireHeader:
    """A one-mailbox header from its parts: ``display`` as plain text (an atom sequence, a
    quoted string or encoded words) and ``address`` as a bare addr-spec. A request's
    ``from`` comes here as the two parts it was validated as, never as text to parse."""
    ascii_address, utf8_address = _address_forms(address)
    if not display:
        return WireHeader(name, address, ascii_address, utf8_address)
    phrase = _phrase(display)

    def form(addr: str) -> str:
        last = phrase.rsplit("\n", 1)[-1]
        prefix = len(name) + 2 if "\n" not in phrase else 0
        fold = "\n" if prefix + len(last) + len(addr) + 3 > MAX_LINE else ""
        return f"{phrase}{fold} <{addr}>"

    return WireHeader(name, f"{display} <{address}>", form(ascii_address), form(utf8_address))


def message_id(task_id: str, mail_from: str) -> str:
    """A Message-ID derived from the task id: every attempt of a task carries the same one,
    so a receiving system can recognise a repeat."""
    return f"<{task_id}@{_message_id_domain(mail_from)}>"


@functools.lru_cache(maxsize=16)
def _message_id_domain(mail_from: str) -> str:
    # Cached: every message of a worker has the same MAIL_FROM, and parseaddr was a tenth
    # of the message's build.
    _, at, domain = parseaddr(mail_from)[1].rpartition("@")
    # Only a plain host name: anything else from MAIL_FROM stays out of the header.
    ok = at and _HOSTNAME.fullmatch(domain) and len(domain) <= 253
    return domain if ok else _PLACEHOLDER_DOMAIN


def from_header(job: Job, mail_from: str) -> WireHeader:
    """``From``: the job's own sender if the request gave one, else MAIL_FROM."""
    if job.sender is None:
        return mailbox("From", mail_from)
    return named_address("From", job.sender.name, job.sender.address)


def envelope_sender(job: Job, mail_from_address: str) -> str:
    """MAIL FROM: the address of the job's ``from``, else MAIL_FROM's.

    It follows the From header so that SPF is checked on the From domain, which DMARC
    wants aligned (a relay that sends for several domains, as Resend and Postmark do, uses
    the From domain too); bounces then go to that domain, whose owner listed it in
    ALLOWED_SENDERS. Within MAIL_FROM's domain (the default) both choices are the same.
    """
    return envelope_address(job.sender.address if job.sender is not None else mail_from_address)


def envelope_address(address: str) -> str:
    """``address`` as MAIL FROM and RCPT TO take it: an ASCII local part with its domain in
    IDNA form (``user@xn--bcher-kva.example``), else the address as stored.

    The API stores domains as Unicode (email-validator's normalized form). Sent so, they
    made the whole transaction SMTPUTF8: a relay without it refused every such mail, and
    one with it needed SMTPUTF8 at every later hop too. RFC 6531 3.2 says not to ask for
    SMTPUTF8 when the mail does not need it; only a non-ASCII local part does, since it has
    no ASCII form (without SMTPUTF8 that mail fails permanently, see worker.sender).
    """
    if address.isascii():
        return address
    local, _, domain = address.rpartition("@")
    idna = ascii_domain(domain)
    # A domain with no IDNA form (stored before a rule of IDNA changed, or not through the
    # API) goes as stored too, as it did before: over SMTPUTF8, for the relay to judge.
    return f"{local}@{idna}" if local.isascii() and idna.isascii() else address


def envelope_recipients(job: Job) -> list[str]:
    """RCPT TO: every distinct mailbox of To, Cc and Bcc once, in that order.

    An address given twice (in To and Bcc, in To and Cc) was sent as two RCPT TO, and a
    relay may deliver each. Domains are compared case-insensitively and in IDNA form
    (``bücher.example`` is ``XN--BCHER-KVA.example``); the local part as written, since RFC
    5321 2.4 leaves its case to the receiving host. Headers keep what the request gave.
    """
    if not job.cc and not job.bcc:
        return [envelope_address(job.to)]
    unique: dict[tuple[str, str], str] = {}
    for address in job.recipients:
        local, _, domain = address.rpartition("@")
        unique.setdefault((local, ascii_domain(domain).lower()), envelope_address(address))
    return list(unique.values())


# RFC 2231 attribute-char: printable ASCII but space, '*', "'", '%' and the tspecials.
_ATTR_SAFE = "!#$&+-.^_`|~"
# A name written as a quoted string: characters no reader mistakes for the end of the
# string or of the parameter (no quotes, backslashes, ';', '=' or '%'); else RFC 2231.
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9 ._()\[\]+!#$&@^~,-]+")
_FIRST_PIECE = "utf-8''"  # RFC 2231: charset, empty language, then the encoded text
_DISPOSITION_PREFIX = len('Content-Disposition: attachment; filename=""')


def _rfc2231_chunks(text: str, width: int) -> list[str]:
    """``text`` percent-encoded (UTF-8) in pieces of at most ``width`` characters. A piece
    ends between two characters, never inside one's ``%XX%XX``: readers that decode each
    piece on its own still get whole characters."""
    chunks = [""]
    for char in text:
        encoded = quote(char, safe=_ATTR_SAFE)
        if len(chunks[-1]) + len(encoded) > width:
            chunks.append("")
        chunks[-1] += encoded
    return chunks


def disposition(filename: str) -> WireHeader:
    """``Content-Disposition: attachment`` with ``filename`` written by us: a quoted string
    when it is short plain ASCII, else RFC 2231 (``filename*=utf-8''...``, in numbered
    pieces on lines of their own when long). Percent-encoding leaves nothing of the name
    that a reader could take for a quote, a parameter, an encoded word or a line break.
    Raises ``HeaderInjection`` for a name validation should have refused."""
    try:
        check_filename(check_header(filename, "filename"))
    except ValueError as exc:
        raise HeaderInjection(f"attachment filename: {exc}", field="filename") from None
    if _PLAIN_FILENAME.fullmatch(filename) and _DISPOSITION_PREFIX + len(filename) <= MAX_LINE:
        form = f'attachment; filename="{filename}"'
    else:
        # 55: " filename*0*=utf-8''" and a piece of 55 make 75 columns, ";" included.
        chunks = _rfc2231_chunks(filename, 55)
        if len(chunks) == 1:
            form = f"attachment;\n filename*={_FIRST_PIECE}{chunks[0]}"
        else:
            chunks[0] = _FIRST_PIECE + chunks[0]
            pieces = [f"filename*{i}*={chunk}" for i, chunk in enumerate(chunks)]
            form = "attachment;\n " + ";\n ".join(pieces)
    return WireHeader("Content-Disposition", form.replace("\n", ""), form)


def _attachment_type(item: Attachment) -> tuple[str, str]:
    try:
        maintype, subtype = check_content_type(item.content_type).split("/")
    except ValueError as exc:
        raise HeaderInjection(f"attachment content type: {exc}", field="content_type") from None
    return maintype, subtype


def attachment_part(item: Attachment) -> MIMEPart:
    """One attachment: its exact bytes in base64, its type, its name (``disposition``)."""
    maintype, subtype = _attachment_type(item)
    part = MIMEPart(policy=_POLICY)  # a part: no MIME-Version of its own
    part.set_content(item.data, maintype, subtype, cte="base64")
    part.set_raw("Content-Disposition", disposition(item.filename))
    return part


def _date() -> WireHeader:
    return _date_at(int(time.time()))


@functools.lru_cache(maxsize=2)
def _date_at(second: int) -> WireHeader:
    # One Date per second, shared by every message of that second (the header has no finer
    # unit): formatting it was a few per cent of the worker's CPU.
    text = format_datetime(datetime.fromtimestamp(second, UTC))
    return WireHeader("Date", text, text)


def _headers(task_id: str, job: Job, mail_from: str) -> list[WireHeader]:
    """The message's own headers, each written by us (see the module docstring)."""
    headers = [from_header(job, mail_from), addresses("To", [job.to])]
    if job.cc:
        headers.append(addresses("Cc", job.cc))
    if job.reply_to:
        headers.append(addresses("Reply-To", [job.reply_to]))
    mid = message_id(task_id, mail_from)
    headers += [unstructured("Subject", job.subject), _date(), WireHeader("Message-ID", mid, mid)]
    return headers


def build_message(task_id: str, job: Job, mail_from: str) -> EmailMessage:
    """The message as an ``EmailMessage``, built with CPython's ``email`` package: UTF-8
    bodies, RFC 2047 headers, Bcc only in the envelope, attachments (if any) after the
    text in multipart/mixed. The worker sends ``render``'s bytes instead; this form is
    for reading a job as a mail client would, and the oracle ``render`` is tested against.

    Raises ``HeaderInjection`` for a header value that validation should have refused (a
    task stored by an older version): such a task can never be sent safely.
    """
    msg = EmailMessage(policy=_POLICY)
    for header in _headers(task_id, job, mail_from):
        msg.set_raw(header.name, header)
    msg.set_content(job.text, charset="utf-8")
    if job.html:
        msg.add_alternative(job.html, subtype="html", charset="utf-8")
    if job.attachments:
        msg.make_mixed()
        for item in job.attachments:
            # typeshed types attach() as taking an EmailMessage; any MIMEPart is a part.
            msg.attach(cast(EmailMessage, attachment_part(item)))
    return msg


# -- The wire form, written directly ---------------------------------------------------
# CPython's EmailMessage, set_content and generator took more than half of the worker's CPU
# per mail. The MIME written here is the same message (a test parses both and compares
# them), in plain bytes: every header above is already in its final form, and a body is
# a text or base64 block between random boundaries.

_CRLF = b"\r\n"
_BASE64_LINE = 76  # RFC 2045 6.8: base64 lines of at most 76 characters
_NON_ASCII = bytes(range(128, 256))


def _base64_lines(data: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    lines = [encoded[i : i + _BASE64_LINE] for i in range(0, len(encoded), _BASE64_LINE)]
    return _CRLF.join(lines) + _CRLF


def _text_encoding(body: bytes, longest: int, eight_bit: bool) -> str:
    """CPython's choice for a text body: as it is when its lines are short (7bit when ASCII,
    8bit when the relay takes 8BITMIME), else quoted-printable or base64, the shorter."""
    if longest <= MAX_LINE:
        if body.isascii():
            return "7bit"
        if eight_bit:
            return "8bit"
    # quoted-printable writes a non-ASCII byte in three; base64 every three bytes in four
    non_ascii = len(body) - len(body.translate(None, _NON_ASCII))
    return "quoted-printable" if 6 * non_ascii < len(body) else "base64"


def _text_entity(text: str, subtype: str, eight_bit: bool) -> tuple[bytes, bool]:
    """A text/* part (its headers, blank line and body), and whether it is 8bit."""
    lines = text.encode("utf-8").splitlines()  # CR, LF and CRLF, as set_content splits
    body = _CRLF.join(lines) + _CRLF
    cte = _text_encoding(body, max(map(len, lines), default=0), eight_bit)
    if cte == "quoted-printable":
        body = binascii.b2a_qp(body, istext=True)  # keeps CRLF; soft breaks before 76
    elif cte == "base64":
        body = _base64_lines(body)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}'
    return head.encode("ascii") + _CRLF + _CRLF + body, cte == "8bit"


def _attachment_entity(item: Attachment) -> bytes:
    maintype, subtype = _attachment_type(item)
    dispo = disposition(item.filename).ascii_form.replace("\n", "\r\n")
    head = (f"Content-Type: {maintype}/{subtype}\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: {dispo}\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + _base64_lines(item.data)


def _multipart(subtype: str, entities: list[bytes]) -> bytes:
    """multipart/``subtype`` of ``entities``, each ending with its CRLF as the generator
    writes them, under a random boundary that none of them contains."""
    while True:
        boundary = f"=_{secrets.token_hex(16)}"  # "=_" occurs in no base64 or QP text
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter in entity for entity in entities):
            break
    head = f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'
    parts = b"".join(delimiter + _CRLF + entity + _CRLF for entity in entities)
    return head.encode("ascii") + parts + delimiter + b"--" + _CRLF


def _mime_body(job: Job, eight_bit: bool) -> tuple[bytes, bool]:
    """The top entity (Content-* headers, blank line, body), and whether it holds 8bit."""
    entity, has_8bit = _text_entity(job.text, "plain", eight_bit)
    if job.html:
        html, html_8bit = _text_entity(job.html, "html", eight_bit)
        entity, has_8bit = _multipart("alternative", [entity, html]), has_8bit or html_8bit
    if job.attachments:
        entity = _multipart("mixed", [entity, *map(_attachment_entity, job.attachments)])
    return entity, has_8bit


class Wire:
    """A message as the worker sends it; ``render`` makes one."""

    __slots__ = ("_body", "_has_8bit", "_headers", "_job")

    def __init__(self, headers: list[WireHeader], job: Job) -> None:
        self._headers = headers
        self._job = job
        self._body, self._has_8bit = _mime_body(job, eight_bit=True)

    def as_bytes(self, *, utf8: bool = False, eight_bit: bool = True) -> bytes:
        """The message: header forms for an SMTPUTF8 transaction when ``utf8``; text bodies
        8bit only when ``eight_bit`` (the relay takes 8BITMIME), else encoded as 7bit."""
        lines = [f"{h.name}: {h.utf8_form if utf8 else h.ascii_form}" for h in self._headers]
        # A form's own line breaks are "\n" (no header text holds CR or LF: check_header).
        head = "\n".join(lines).replace("\n", "\r\n")
        body = self._body
        if self._has_8bit and not eight_bit:
            body = _mime_body(self._job, eight_bit=False)[0]
        return head.encode("utf-8") + b"\r\nMIME-Version: 1.0\r\n" + body


def render(task_id: str, job: Job, mail_from: str) -> Wire:
    """The message for ``job`` as the worker sends it: what ``build_message`` builds, written
    as bytes without CPython's ``email`` package (a test holds the two to the same parse).

    Raises ``HeaderInjection`` as ``build_message`` does.
    """
    return Wire(_headers(task_id, job, mail_from), job)
