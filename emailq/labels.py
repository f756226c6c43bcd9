"""A message's labels: ``metadata`` (a small string map) and ``tags`` (a few short names).

They are the caller's own bookkeeping (an order id, a campaign), as Resend's ``tags`` and
Postmark's ``Metadata``/``Tag``: stored on the task, shown by the result endpoint and
``emailq status``, matched by the dead-letter filters (``LabelFilter``), readable from the
task record by anything that reports on it. They never reach the mail: an ``X-`` header
would hand internal ids to every recipient and relay on the way, and nobody there needs
them.

Names (metadata keys and tags) are ``[A-Za-z0-9_-]``, so they are safe in a URL query, a
log line and a table; values are plain one-line text. Everything is bounded, so labels
stay small beside the job (they are kept for RESULT_TTL_SECONDS after the job is gone).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StringConstraints

from emailq.errors import InvalidMessage
from emailq.templating import check_header

MAX_METADATA_KEYS = 20
MAX_METADATA_VALUE = 256  # characters
MAX_METADATA_BYTES = 2048  # keys and values together, UTF-8
MAX_TAGS = 10
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"

_NAME = re.compile(NAME_PATTERN)
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


def _plain_value(value: str) -> str:
    # Shown in tables and logs and matched in filters: one line of text, nothing hidden.
    try:
        check_header(value, "a metadata value")
    except InvalidMessage as exc:
        raise ValueError(str(exc)) from None  # a field error: pydantic names the key
    return value


def _small(metadata: dict[str, str]) -> dict[str, str]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata holds {size} bytes; at most {MAX_METADATA_BYTES} in all")
    return metadata


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))  # a repeated tag means the same tag; order kept


MetadataValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE), AfterValidator(_plain_value)]
Metadata = Annotated[
    dict[Name, MetadataValue],
    Field(max_length=MAX_METADATA_KEYS, description=(
        f"your own string map, stored with the task and returned by the result endpoint: "
        f"up to {MAX_METADATA_KEYS} keys of [A-Za-z0-9_-] (1-40), values up to "
        f"{MAX_METADATA_VALUE} characters of one-line text, {MAX_METADATA_BYTES} bytes in all; "
        "never put in the mail"), examples=[{"order_id": "1042"}],
        # patternProperties alone would let the schema allow any other key and value.
        json_schema_extra={"additionalProperties": False}),
    AfterValidator(_small),
]  # fmt: skip
Tags = Annotated[
    list[Name],
    Field(max_length=MAX_TAGS, description=(
        f"up to {MAX_TAGS} names of [A-Za-z0-9_-] (1-40), stored with the task; the "
        "dead-letter list filters on them (?tag=...); never put in the mail"),
        examples=[["receipt"]]),
    AfterValidator(_unique),
]  # fmt: skip


def encode(metadata: Mapping[str, str], tags: Iterable[str]) -> str:
    """The labels as the task hash stores them: '' for none, else one JSON object."""
    tags = list(tags)
    if not metadata and not tags:
        return ""
    return json.dumps({"metadata": dict(metadata), "tags": tags}, ensure_ascii=False)


def decode(raw: str | None) -> dict[str, Any]:
    """``metadata`` and ``tags`` of a stored labels field (empty when none was stored)."""
    found = json.loads(raw) if raw else {}
    return {"metadata": found.get("metadata", {}), "tags": found.get("tags", [])}


@dataclass(frozen=True)
class LabelFilter:
    """Which tasks a listing keeps: those with every tag in ``tags`` and every
    ``metadata`` key at exactly its value. Empty: every task."""

    tags: frozenset[str] = frozenset()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tags or self.metadata)

    def matches(self, tags: Iterable[str], metadata: Mapping[str, str]) -> bool:
        """Does a task with these labels pass?"""
        return self.tags <= set(tags) and all(
            metadata.get(key) == value for key, value in self.metadata.items()
        )

    @classmethod
    def parse(cls, tags: Iterable[str], pairs: Iterable[tuple[str, str]]) -> LabelFilter:
        """From tag names and (key, value) pairs; raises ``ValueError`` naming a bad name."""
        tags, metadata = frozenset(tags), dict(pairs)
        for text in sorted(tags | set(metadata)):
            if not _NAME.match(text):
                raise ValueError(f"{text!r} is not a tag or metadata key ([A-Za-z0-9_-], 1-40)")
        return cls(tags, metadata)
