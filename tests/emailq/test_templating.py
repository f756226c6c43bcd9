"""Placeholder rendering and header checks: plain ``{name}`` lookups, nothing evaluated."""

from __future__ import annotations

import tracemalloc

import pytest

from emailq.errors import HeaderInjection, MessageTooLarge
from emailq.templating import check_header, render

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
