"""Stored templates: loading TEMPLATES_DIR, rendering in the bounded sandbox, and what is
refused (at load: one line naming file and line; at render: a 422 naming part and line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from emailq import sandbox
from emailq.compose import EmailRequest, compose
from emailq.errors import HeaderInjection, InvalidMessage, MessageTooLarge
from emailq.templates import (
    TemplateError,
    Templates,
    TemplatesConfigError,
    load_templates,
)
from tests.helpers.templates import EXAMPLES, OTP_SUBJECT, otp_text, write_templates

LIMIT = 64 * 1024  # MAX_BODY_BYTES of these tests


def one(tmp_path: Path, body: str, *, subject: str = "s", html: str | None = None) -> Templates:
    parts = {"subject": subject, "body": body, **({"html": html} if html is not None else {})}
    return load_templates(write_templates(tmp_path / "t", {"x": parts}))


def refused(templates: Templates, values: dict[str, str] | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        templates.render("x", values or {"code": "123456"}, max_body_bytes=LIMIT)
    return caught.value


# -- The example: the original service's Korean OTP mail ----------------------------------


def test_the_korean_otp_mail_renders_byte_for_byte_as_the_original() -> None:
    content = load_templates(EXAMPLES).render("otp", {"code": "493817"}, max_body_bytes=LIMIT)
    assert content.subject == OTP_SUBJECT
    assert content.text == otp_text("493817")
    assert content.text.encode() == otp_text("493817").encode()
    # The original sent text only; the HTML part is ours, with the same words.
    assert content.html is not None
    assert '<html lang="ko">' in content.html
    assert "OTP 코드: <span" in content.html
    assert ">493817</span>" in content.html
    assert "이 코드는 5분 후에 만료됩니다" in content.html


def test_the_example_lists_its_parts_and_variables() -> None:
    (otp,) = load_templates(EXAMPLES).all()
    assert (otp.name, [p.name for p in otp.parts], otp.variables) == (
        "otp", ["subject", "body", "html"], ["code"],
    )  # fmt: skip


def test_a_send_request_naming_a_template_becomes_its_mail() -> None:
    request = EmailRequest(to="user@example.com", template="otp", variables={"code": "1"},
                           cc=["audit@example.com"])  # fmt: skip
    job = compose(request, max_body_bytes=LIMIT, templates=load_templates(EXAMPLES))
    assert (job.subject, job.text, job.cc) == (OTP_SUBJECT, otp_text("1"), ["audit@example.com"])


# -- Rendering ----------------------------------------------------------------------------


def test_html_escapes_values_and_text_keeps_them(tmp_path: Path) -> None:
    templates = one(tmp_path, "{{ name }}", subject="Hi {{ name }}", html="<p>{{ name }}</p>")
    content = templates.render("x", {"name": "<b>Kim & Lee</b>"}, max_body_bytes=LIMIT)
    assert content.text == "<b>Kim & Lee</b>"
    assert content.html == "<p>&lt;b&gt;Kim &amp; Lee&lt;/b&gt;</p>"
    assert content.subject == "Hi <b>Kim & Lee</b>"


def test_concatenation_in_html_escapes_values_too(tmp_path: Path) -> None:
    content = one(tmp_path, "t", html="{{ '<i>' ~ name }}").render(
        "x", {"name": "<b>"}, max_body_bytes=LIMIT
    )
    assert content.html == "&lt;i&gt;&lt;b&gt;"


def test_a_missing_variable_names_part_line_and_variable(tmp_path: Path) -> None:
    error = refused(one(tmp_path, "line one\n\n{{ code }} and {{ name }}"))
    assert error.field == "variables.name"
    assert (error.part, error.line) == ("body", 3)
    assert "x/body.txt, line 3: variable 'name' is not given" in str(error)


def test_default_and_is_defined_make_a_variable_optional(tmp_path: Path) -> None:
    body = "{{ name|default('friend') }}{% if extra is defined %}+{{ extra }}{% endif %}"
    templates = one(tmp_path, body)
    assert templates.render("x", {}, max_body_bytes=LIMIT).text == "friend"
    assert templates.render("x", {"extra": "1"}, max_body_bytes=LIMIT).text == "friend+1"


def test_a_line_break_in_a_subject_value_is_refused_naming_the_variable(tmp_path: Path) -> None:
    templates = one(tmp_path, "b", subject="Code {{ code }}")
    with pytest.raises(HeaderInjection) as caught:
        templates.render("x", {"code": "1\r\nBcc: x@evil.test"}, max_body_bytes=LIMIT)
    assert caught.value.field == "variables.code"


def test_a_rendered_subject_passes_the_subject_checks(tmp_path: Path) -> None:
    # The line break comes from the template's own code, not from a value.
    error = refused(one(tmp_path, "b", subject="{{ 'a' ~ '\\n' ~ 'Bcc: x@evil.test' }}"))
    assert (error.field, error.part) == ("template", "subject")
    assert "control characters or line breaks" in str(error)


def test_an_unknown_template_and_no_templates_are_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidMessage) as unknown:
        load_templates(EXAMPLES).render("nope", {}, max_body_bytes=LIMIT)
    assert unknown.value.field == "template"
    request = EmailRequest(to="user@example.com", template="otp")
    with pytest.raises(InvalidMessage, match="TEMPLATES_DIR is not set"):
        compose(request, max_body_bytes=LIMIT, templates=None)


@pytest.mark.parametrize("given", [{"subject": "s"}, {"body": "b"}, {"html": "<p>"}])
def test_a_template_with_its_own_content_too_is_refused(given: dict[str, str]) -> None:
    request = EmailRequest(to="user@example.com", template="otp", **given)
    with pytest.raises(InvalidMessage, match="not both") as caught:
        compose(request, max_body_bytes=LIMIT, templates=load_templates(EXAMPLES))
    assert caught.value.field == next(iter(given))


def test_a_request_without_a_template_still_needs_subject_and_body() -> None:
    with pytest.raises(InvalidMessage, match="subject is required") as caught:
        compose(EmailRequest(to="user@example.com", body="b"), max_body_bytes=LIMIT)
    assert caught.value.field == "subject"


def test_a_preview_reports_every_part_on_its_own(tmp_path: Path) -> None:
    templates = one(tmp_path, "{{ code }}", subject="fixed", html="<p>{{ nope }}</p>")
    results = {r.part: r for r in templates.preview("x", {"code": "7"}, max_body_bytes=LIMIT)}
    assert (results["subject"].content, results["body"].content) == ("fixed", "7")
    html = results["html"]
    assert html.content is None
    assert isinstance(html.error, TemplateError)
    assert html.error.field == "variables.nope"


def test_parts_over_max_body_bytes_are_too_large(tmp_path: Path) -> None:
    templates = one(tmp_path, "{{ big }}")
    with pytest.raises(MessageTooLarge):  # within the character cap, over the byte limit
        templates.render("x", {"big": "가" * (LIMIT // 2)}, max_body_bytes=LIMIT)


# -- The sandbox: every escape on record, and every way to spend without bound -------------
# Each is refused while rendering (so a send or preview answers 422) and renders nothing.

ESCAPES = {
    # CVE-2016-10745 (Jinja < 2.8.1): str.format evaluates attribute lookups in its fields.
    "CVE-2016-10745-str-format": '{{ "{0.__class__.__mro__}".format(code) }}',
    # CVE-2019-10906 (Jinja < 2.10.1): the same through str.format_map.
    "CVE-2019-10906-str-format-map": '{{ "{x.__class__.__mro__}".format_map({"x": code}) }}',
    # CVE-2024-56326 (Jinja < 3.1.5): a stored reference to a string's format method, called
    # later, was not seen as a call to str.format.
    "CVE-2024-56326-stored-format-reference": (
        '{% set f = "{0.__class__.__mro__}".format %}{{ f(code) }}'
    ),
    # CVE-2025-27516 (Jinja < 3.1.6): |attr fetched a string's plain format method.
    "CVE-2025-27516-attr-reaches-format": '{{ "{0.__class__.__mro__}"|attr("format")(code) }}',
    "dunder-class-mro": "{{ ''.__class__.__mro__ }}",
    "cycler-init-globals": "{{ cycler.__init__.__globals__ }}",
    "attr-filter-globals": "{{ range|attr('__globals__') }}",
    "self": "{{ self }}",
    "self-as-string": "{{ self|string }}",
    "range-10-to-the-9": "{% for i in range(10**9) %}x{% endfor %}",
    "x-times-10-to-the-9": "{{ 'x' * 10**9 }}",
    "list-times-10-to-the-9": "{{ ([code] * 10**9)|length }}",
    "power-tower": "{{ 2 ** 100000 }}",
    "percent-width": "{{ '%0999999999d' % 1 }}",
    "center-method": "{{ code.center(10**9) }}",
    "ljust-method": "{{ code.ljust(999999999) }}",
    "replace-growth": "{{ (code * 1000)|replace('1', code * 1000) }}",
    "join-growth": "{{ range(100000)|join(code * 100) }}",
    "doubling-concatenation": "".join(
        f"{{% set v{i + 1} = v{i} ~ v{i} %}}" for i in range(30)
    ).replace("v0", "code")
    + "{{ v30|length }}",
    "nested-loops": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "output-flood": "{% for i in range(10000) %}{{ code * 100 }}{% endfor %}",
    "loop-object": "{% for i in range(2) %}{{ loop }}{% endfor %}",
    "dict-repr": "{{ dict(a=code) }}",
}


@pytest.mark.parametrize("source", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_sandbox_escape_or_unbounded_render_is_refused(tmp_path: Path, source: str) -> None:
    templates = one(tmp_path, source)
    error = refused(templates)
    assert (error.field, error.part) == ("template", "body")
    assert str(error).startswith("template x/body.txt")
    results = templates.preview("x", {"code": "123456"}, max_body_bytes=LIMIT)
    body = next(r for r in results if r.part == "body")
    assert body.content is None  # nothing rendered
    assert body.error is not None


def test_the_escapes_are_refused_by_the_sandbox_not_by_chance(tmp_path: Path) -> None:
    # The message says which bound held, so a test above cannot pass for another reason.
    reasons = {
        "CVE-2016-10745-str-format": "calling 'format' is not allowed",
        "CVE-2025-27516-attr-reaches-format": "calling 'format' is not allowed",
        "dunder-class-mro": "access to attribute '__class__' of 'str' object is unsafe",
        "cycler-init-globals": "access to attribute '__init__'",
        "self": "only text and numbers can be printed, not 'TemplateReference'",
        "range-10-to-the-9": "MAX_RANGE",
        "x-times-10-to-the-9": f"a value would be over {LIMIT} characters",
        "doubling-concatenation": f"a value would be over {LIMIT} characters",
        "nested-loops": f"loops ran over {sandbox.LOOP_BUDGET} iterations",
        "output-flood": f"the output would be over {LIMIT} characters",
        "percent-width": "%-formatting a string is not allowed",
    }
    for index, (name, reason) in enumerate(reasons.items()):
        assert reason in str(refused(one(tmp_path / str(index), ESCAPES[name]))), name


def test_a_render_is_bounded_in_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = one(tmp_path, "{% for i in range(3) %}{{ i }}{% endfor %}")
    assert templates.render("x", {}, max_body_bytes=LIMIT).text == "012"
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", -1.0)  # every render is already late
    assert "rendering took over" in str(refused(templates))


def test_what_a_mail_needs_still_works(tmp_path: Path) -> None:
    body = (
        "{{ code|upper }} {{ code.split('3')|join('-') }} {{ 3 * 4 }} {{ 'ab' * 2 }} "
        "{% for c in code %}{{ loop.index }}{{ loop.cycle('a', 'b') }}{% endfor %} "
        "{{ code|truncate(9) }} {{ code[:2] }} {{ code|length }} {{ 2 ** 10 }} "
        "{{ (code ~ '!')|replace('!', '?') }} {{ cycler('x', 'y').next() }}"
    )
    text = one(tmp_path, body).render("x", {"code": "123456"}, max_body_bytes=LIMIT).text
    assert text == "123456 12-456 12 abab 1a2b3a4b5a6b 123456 12 6 1024 123456? x"


# -- Loading: one line naming the file and line ---------------------------------------------

BAD_PARTS: dict[str, tuple[dict[str, str], str]] = {
    "syntax": ({"body": "ok\n{{ code }\n"}, "x/body.txt:2: unexpected '}'"),
    "unknown-filter": ({"body": "{{ code|center(80) }}"}, "x/body.txt:1: No filter named 'center'"),
    "safe-filter": ({"html": "{{ code|safe }}"}, "x/body.html:1: No filter named 'safe'"),
    "macro": ({"body": "\n{% macro m() %}{{ m() }}{% endmacro %}"}, "x/body.txt:2: macros"),
    "recursive-loop": (
        {"body": "{% for i in l recursive %}{{ loop(i) }}{% endfor %}"},
        "x/body.txt:1: recursive",
    ),
    "set-block": ({"body": "{% set x %}a{% endset %}"}, "x/body.txt:1: {% set %} blocks"),
    "filter-block": ({"body": "{% filter upper %}a{% endfilter %}"}, "{% filter %} blocks"),
    "autoescape-off": (
        {"html": "{% autoescape false %}{{ code }}{% endautoescape %}"},
        "x/body.html:1: {% auto",
    ),
    "include": ({"body": "{% include 'other' %}"}, "x/body.txt:1: include is not supported"),
    "extends": ({"body": "{% extends 'base' %}"}, "x/body.txt:1: extends is not supported"),
    "two-line-subject": ({"subject": "Hello\n{{ code }}\n"}, "x/subject.txt:2: a subject is one"),
    # CVE-2024-56326's own test case stores the format reference in a namespace().
    "CVE-2024-56326-namespace": (
        {"body": '{% set ns = namespace(run="{0.__class__}".format) %}{{ ns.run(code) }}'},
        "x/body.txt:1: namespace() is not provided",
    ),
}


@pytest.mark.parametrize(("parts", "message"), BAD_PARTS.values(), ids=BAD_PARTS.keys())
def test_a_bad_template_is_one_line_naming_file_and_line(
    tmp_path: Path, parts: dict[str, str], message: str
) -> None:
    root = write_templates(tmp_path / "t", {"x": {"subject": "s", "body": "b", **parts}})
    with pytest.raises(TemplatesConfigError) as caught:
        load_templates(root)
    error = str(caught.value)
    assert error.startswith(f"TEMPLATES_DIR {root}/x/"), error
    assert message in error
    assert "\n" not in error


def test_a_subject_file_may_end_with_a_newline(tmp_path: Path) -> None:
    templates = one(tmp_path, "b\n", subject="Hello {{ code }}\n")
    content = templates.render("x", {"code": "1"}, max_body_bytes=LIMIT)
    assert (content.subject, content.text) == ("Hello 1", "b")


def test_layout_problems_are_named(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": {"subject": "s"}}, "x: body.txt is missing"),
        ({"x": {"body": "b"}}, "x: subject.txt is missing"),
        ({"bad name": {"subject": "s", "body": "b"}}, "expected a directory per template"),
    ]
    for index, (layout, message) in enumerate(cases):
        root = write_templates(tmp_path / str(index), layout)
        with pytest.raises(TemplatesConfigError, match=message):
            load_templates(root)
    typo = write_templates(tmp_path / "typo", {"x": {"subject": "s", "body": "b"}})
    (typo / "x" / "body.htm").write_text("<p>")
    with pytest.raises(TemplatesConfigError, match=r"body\.htm: unexpected file"):
        load_templates(typo)
    (tmp_path / "file").write_text("")
    with pytest.raises(TemplatesConfigError, match="not a directory"):
        load_templates(tmp_path / "file")


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    root = write_templates(tmp_path / "t", {"x": {"subject": "s", "body": "b"}})
    (root / "x" / "body.txt").write_bytes("안녕\n둘째\n".encode("euc-kr"))
    with pytest.raises(TemplatesConfigError, match=r"x/body.txt:1: not UTF-8"):
        load_templates(root)


def test_hidden_entries_are_ignored_and_no_directory_means_no_templates(tmp_path: Path) -> None:
    root = write_templates(tmp_path / "t", {"x": {"subject": "s", "body": "b"}})
    (root / ".git").mkdir()
    (root / "x" / ".body.txt.swp").write_text("")
    assert [t.name for t in load_templates(root).all()] == ["x"]
    assert len(load_templates(None)) == 0


def test_a_bad_templates_dir_stops_the_api_in_one_line(tmp_path: Path) -> None:
    root = write_templates(tmp_path / "t", {"otp": {"subject": "s", "body": "{{ code }"}})
    env = {"PATH": "/usr/bin:/bin", "TEMPLATES_DIR": str(root), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "server", "--port", "0"], cwd=tmp_path, env=env,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    err = done.stderr.decode().strip()
    assert done.returncode == 2, err
    assert err == f"emailq: TEMPLATES_DIR {root}/otp/body.txt:1: unexpected '}}'"
