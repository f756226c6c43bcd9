"""Placeholder rendering and header checks: plain ``{name}`` lookups, nothing evaluated."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emailq.errors import HeaderInjection, MessageTooLarge
from emailq.templating import check_header, placeholders, render, unfilled

VALUES = {"username": "홍길동", "code": "1234"}


def test_username_and_variables_are_substituted() -> None:
    text = render("{username}님, 코드는 {code}입니다. {username}!", VALUES, limit=1000)
    assert text == "홍길동님, 코드는 1234입니다. 홍길동!"


def test_template_without_placeholders_is_returned_unchanged() -> None:
    assert render("plain text", VALUES, limit=1000) == "plain text"


@pytest.mark.parametrize(
    "template",
    [
        "{username.__class__}",
        "{username.__class__.__mro__}",
        "{username[0]}",
        "{0}",
        "{}",
        "{username:>10}",
        "{username!r}",
        "{ username }",
        "{unknown}",
        "{{username",
    ],
)
def test_anything_but_a_known_plain_name_is_left_as_written(template: str) -> None:
    # Rendered beside a real placeholder, so the substituting path runs too.
    assert render(template + " {code}", VALUES, limit=1000) == template + " 1234"
    assert render(template, VALUES, limit=1000) == template


def test_substituted_values_are_not_rendered_again() -> None:
    values = {"username": "{code}", "code": "secret"}
    assert render("{username}", values, limit=100) == "{code}"


def test_result_at_the_limit_passes_and_one_over_fails() -> None:
    values = {"a": "x" * 10}
    assert render("{a}!", values, limit=11) == "x" * 10 + "!"
    with pytest.raises(MessageTooLarge):
        render("{a}!", values, limit=10)


def test_expansion_bomb_is_refused_before_the_string_is_built() -> None:
    # 20,000 placeholders x 100 kB would be a 2 GB string; the refusal must come from
    # arithmetic, so peak allocation stays tiny next to that.
    values = {"a": "A" * 100_000}
    template = "{a}" * 20_000
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLarge):
            render(template, values, limit=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024


# Everything str.splitlines() splits on, the other C0 controls, DEL and the C1 controls.
LINE_BREAKS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
               "\u2029"]  # fmt: skip
CONTROLS = ["\0", "\x01", "\x08", "\x1b", "\x1f", "\x7f", "\x80", "\x9f"]


@pytest.mark.parametrize("bad", [*LINE_BREAKS, *CONTROLS, "\r\nBcc: evil@example.com"])
def test_check_header_rejects_line_breaks_and_controls(bad: str) -> None:
    assert len(f"a{bad}b".splitlines()) > 1 or bad not in LINE_BREAKS
    with pytest.raises(HeaderInjection) as info:
        check_header(f"a{bad}b", "subject", tab=True)
    assert info.value.field == "subject"
    assert f"U+{ord(bad[0]):04X}" in str(info.value)


def test_check_header_refuses_tab_unless_allowed() -> None:
    subject = "안녕하세요 {username}\t!"
    assert check_header(subject, "subject", tab=True) == subject
    with pytest.raises(HeaderInjection):
        check_header("/thanks\t", "redirect")


@pytest.mark.parametrize("ok", ["Hello", "안녕", "=?utf-8?b?SGk=?=", "a\u00a0b", "\U0001f600"])
def test_check_header_returns_a_safe_value(ok: str) -> None:
    assert check_header(ok, "subject") == ok


# The scan as it was written before templates were split once and cached: the oracle.
_SCAN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


def _scanned_render(template: str, values: dict[str, str], limit: int) -> str | None:
    matches = [m for m in _SCAN.finditer(template) if m.group(1) in values]
    growth = sum(len(values[m.group(1)]) - len(m.group(0)) for m in matches)
    if len(template) + growth > limit:
        return None
    return _SCAN.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# Braces, names that are and are not placeholders, and text that looks like neither.
_TEXT = st.lists(st.sampled_from(["{", "}", "{a}", "{b}", "{_c1}", "{a.b}", "{0}", "a", " ",
                                  "{{a}}", "{" + "n" * 64 + "}", "{" + "n" * 65 + "}", "é",
                                  "\t"]),
                 max_size=12).map("".join)  # fmt: skip
_VALUES = st.dictionaries(st.sampled_from(["a", "b", "_c1", "n" * 64]),
                          st.sampled_from(["", "x", "{b}", "긴 값" * 3]))  # fmt: skip


@given(_TEXT, _VALUES, st.integers(min_value=0, max_value=80))
def test_render_and_the_name_lists_agree_with_a_plain_scan(
    template: str, values: dict[str, str], limit: int
) -> None:
    expected = _scanned_render(template, values, limit)
    if expected is None:
        with pytest.raises(MessageTooLarge):
            render(template, values, limit=limit)
    else:
        assert render(template, values, limit=limit) == expected
    names = list(dict.fromkeys(m.group(1) for m in _SCAN.finditer(template)))
    assert placeholders(template, values) == [n for n in names if n in values]
    assert unfilled(template, values) == [n for n in names if n not in values]


def test_a_long_template_renders_as_a_short_one() -> None:
    # Past the cached size every call scans the text itself; the answer is the same.
    long = "{username} " * 1000
    assert render(long, VALUES, limit=100_000) == "홍길동 " * 1000
    assert unfilled(long + "{x}", VALUES) == ["x"]
