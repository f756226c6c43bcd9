"""Attachments as a request gives them (Resend's ``attachments``, Postmark's
``Attachments``): ``{filename, content (base64), content_type}``, checked before anything
is stored.

A file name is user text that ends up in a MIME header parameter, so it is held to what a
file name needs and no more: no control, format or line-separator character (CR/LF would
start a header; bidi overrides make ``exe.pdf`` of ``fdp.exe``), none of the characters
Windows refuses in a name (``<>:"/\\|?*``: paths, streams, quoting), and no ``=?``: mail
clients decode RFC 2047 words even inside a quoted parameter, so ``=?utf-8?q?a.exe?=``
would show as ``a.exe`` and slip past the extension check. ``emailq.message`` writes the
parameter itself (RFC 2231), never through Python's header parser. The content type is a
bare ``type/subtype`` of RFC 2045 tokens; ``multipart`` and ``message`` types are refused
(they would be read as mail structure, and may not be base64-encoded).
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import unicodedata
from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from emailq.errors import InvalidMessage
from emailq.models import Attachment

MAX_ATTACHMENTS = 10
MAX_FILENAME_CHARS = 255  # what common file systems allow
# Characters Windows refuses in a file name; '/' and '\\' are also paths everywhere.
_FORBIDDEN_IN_NAME = frozenset('<>:"/\\|?*')
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# RFC 2045 token: printable ASCII but space and tspecials.
_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+"  # noqa: S105  # a regex, not a password
_CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_STRUCTURE_TYPES = frozenset({"multipart", "message"})
_WHITESPACE = re.compile(r"[ \t\r\n]+")


def check_filename(name: str) -> str:
    """``name`` if it is safe as an attachment's file name, else ``ValueError`` saying why."""
    bad = next((c for c in name if unicodedata.category(c) in _UNPRINTABLE), None)
    if bad is not None:
        raise ValueError(f"a file name must not contain control or format characters "
                         f"(found U+{ord(bad):04X})")  # fmt: skip
    bad = next((c for c in name if c in _FORBIDDEN_IN_NAME), None)
    if bad is not None:
        raise ValueError(f'a file name must not contain {bad!r} (nor any of <>:"/\\|?*)')
    if "=?" in name:
        raise ValueError("a file name must not contain '=?' (an RFC 2047 encoded word)")
    if not name.strip(" .") or name != name.strip():
        raise ValueError("a file name must have a name, without spaces at either end")
    return name


def check_content_type(value: str) -> str:
    """``value`` as a lower-case ``type/subtype``, else ``ValueError``."""
    if not _CONTENT_TYPE.fullmatch(value):
        raise ValueError("content_type must be a bare type/subtype such as 'application/pdf'")
    if value.split("/")[0].lower() in _STRUCTURE_TYPES:
        raise ValueError("multipart/* and message/* cannot be attached; send them as "
                         "application/octet-stream")  # fmt: skip
    return value.lower()


def decode_content(value: str) -> str:
    """Strict base64 (line breaks allowed, as MIME writes it) re-encoded on one line."""
    try:
        raw = base64.b64decode(_WHITESPACE.sub("", value), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"content is not valid base64 ({exc})") from None
    return base64.b64encode(raw).decode("ascii")


FileName = Annotated[str, Field(min_length=1, max_length=MAX_FILENAME_CHARS),
                     AfterValidator(check_filename)]  # fmt: skip
ContentType = Annotated[str, Field(max_length=255), AfterValidator(check_content_type)]


class AttachmentIn(BaseModel):
    """One attachment of a send request."""

    model_config = ConfigDict(extra="forbid")

    filename: FileName = Field(description="shown to the recipient; no path, no control "
                               'characters, none of <>:"/\\|?*')  # fmt: skip
    content: Annotated[str, AfterValidator(decode_content)] = Field(
        description="the file's bytes, base64 (standard alphabet, padded)"
    )
    content_type: ContentType | None = Field(
        default=None, description="type/subtype; default: guessed from the file name, else "
        "application/octet-stream",
    )  # fmt: skip

    def attachment(self) -> Attachment:
        """As the job stores it, with its content type decided."""
        content_type = self.content_type or guess_type(self.filename)
        return Attachment(filename=self.filename, content_type=content_type, content=self.content)


def guess_type(filename: str) -> str:
    """The content type a file name suggests; ``application/octet-stream`` if none or if
    the name says it is compressed (``.tar.gz``: what the bytes are is gzip, not tar)."""
    guessed, encoding = mimetypes.guess_type(filename, strict=True)
    if guessed is None or encoding is not None:
        return "application/octet-stream"
    return check_content_type(guessed)


def extension(filename: str) -> str:
    """The lower-case extension Windows would act on: trailing dots and spaces, which it
    drops when saving, do not hide ``.exe`` in ``x.exe.``."""
    stem = filename.rstrip(". ")
    return stem.rpartition(".")[2].lower() if "." in stem else ""


def decoded_size(attachments: Sequence[Attachment]) -> int:
    """The bytes of the attachments as the recipient gets them."""
    # base64 without line breaks: 3 bytes per 4 characters, less the padding.
    return sum(len(a.content) * 3 // 4 - a.content[-2:].count("=") for a in attachments)


def check_blocked(attachments: Sequence[Attachment], blocked: frozenset[str]) -> None:
    """Raise ``InvalidMessage`` for an attachment whose extension is in ``blocked``
    (BLOCKED_ATTACHMENT_EXTENSIONS)."""
    for index, item in enumerate(attachments):
        found = extension(item.filename)
        if found and found in blocked:
            raise InvalidMessage(
                f"attachments.{index}: .{found} files may not be attached "
                "(BLOCKED_ATTACHMENT_EXTENSIONS)", field=f"attachments.{index}.filename",
            )  # fmt: skip
