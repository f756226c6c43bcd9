"""Placeholder substitution for subject and body.

Placeholders are plain ``{name}`` lookups in a string map and nothing more: no attribute
access, no indexing, no format specs, and ``str.format`` is never called on user text
(``"{username.__class__}".format(...)`` would evaluate attribute lookups). Anything that is
not ``{identifier}`` is left exactly as written; a send request refuses an ``{identifier}``
with no value (``unfilled``; ``emailq.compose``) unless it turns placeholders off.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import NamedTuple

from emailq.errors import HeaderInjection, InvalidMessage, MessageTooLarge

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
# Every C0 control but TAB, DEL, the C1 controls and U+2028/U+2029. CR and LF start a new
# header and NUL truncates in many MTAs; VT, FF, FS/GS/RS, NEL and the two separators are
# line breaks to str.splitlines(), which CPython's email package splits header values with
# (a task holding one could be stored but never built); the rest have no business in a
# header. TAB is folding whitespace: it can neither end a line nor start a header, and it is
# inside the encoded word when a subject is encoded, so subjects may keep it.
_HEADER_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_TAB = "\t"


class _Parsed(NamedTuple):
    """A text split at its placeholders: ``pieces[0] {names[0]} pieces[1] ...``."""

    pieces: tuple[str, ...]  # the literal text around the placeholders: one more than names
    names: tuple[str, ...]  # each placeholder's name, in order, repeats included


def _split(template: str) -> _Parsed:
    parts = _PLACEHOLDER.split(template)  # text, name, text, name, ..., text
    return _Parsed(tuple(parts[0::2]), tuple(parts[1::2]))


# A send's subject and body are the templates, and a sender sends the same ones again and
# again: each is scanned once, not in every step of every request. Bounded in count and
# in size (a longer text is scanned each time): about 2 MB at most, 4 MB if every cached
# text were outside Latin-1.
_CACHED_TEMPLATES = 256
_MAX_CACHED_CHARS = 2048
_split_cached = functools.lru_cache(maxsize=_CACHED_TEMPLATES)(_split)


def _parsed(template: str) -> _Parsed:
    return _split_cached(template) if len(template) <= _MAX_CACHED_CHARS else _split(template)


def render(template: str, values: Mapping[str, str], *, limit: int) -> str:
    """Replace each ``{name}`` found in ``values``; refuse results over ``limit`` characters.

    The size is computed before the string is built, so a small request cannot make the
    API allocate a huge one (``{a}`` x 10,000 with a 10 kB ``a``).
    """
    pieces, names = _parsed(template)
    used = [name for name in names if name in values]
    growth = sum(len(values[name]) - len(name) - 2 for name in used)
    if len(template) + growth > limit:
        raise MessageTooLarge(f"message is over the limit of {limit} bytes after substitution")
    if not used:
        return template
    out = [pieces[0]]
    for name, piece in zip(names, pieces[1:], strict=True):
        out.append(values.get(name, f"{{{name}}}"))
        out.append(piece)
    return "".join(out)


def placeholders(template: str, values: Mapping[str, str]) -> list[str]:
    """The names in ``values`` that ``template`` uses, each once, in order of appearance."""
    return list(dict.fromkeys(name for name in _parsed(template).names if name in values))


def unfilled(template: str, values: Mapping[str, str]) -> list[str]:
    """The ``{name}`` placeholders of ``template`` that ``values`` has no value for, each
    once, in order of appearance. Only ``{identifier}`` is a placeholder: ``{"a": 1}``,
    ``{0}`` or ``{a.b}`` are text."""
    return list(dict.fromkeys(name for name in _parsed(template).names if name not in values))


def check_header(value: str, field: str, *, tab: bool = False) -> str:
    """Return ``value`` if it is safe as a header value, else raise ``HeaderInjection``.

    This is the one check for text that reaches a header (and any other single line):
    control characters and line separators are refused; ``tab`` allows TAB (subjects).
    """
    found = _HEADER_FORBIDDEN.search(value)
    bad = found.group() if found else (_TAB if not tab and _TAB in value else None)
    if bad is not None:
        raise HeaderInjection(f"{field} must not contain control characters or line breaks "
                              f"(found U+{ord(bad):04X})", field=field)  # fmt: skip
    return value


def check_text(value: str, field: str) -> str:
    """Return ``value`` if it is valid Unicode, else raise ``InvalidMessage``.

    JSON can carry a lone surrogate (``"\\ud800"``) that Python decodes happily, but no mail
    can: UTF-8 has no encoding for it, so it would fail at the first ``encode()``.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        raise InvalidMessage(f"{field} contains a lone surrogate (U+{bad:04X}); send valid "
                             "Unicode", field=field) from exc  # fmt: skip
    return value
