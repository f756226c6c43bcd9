"""Stored templates (``TEMPLATES_DIR``): how they are laid out, loaded and rendered.

One directory per template, named as the template (``otp``), holding one file per part::

    TEMPLATES_DIR/otp/subject.txt   the subject, one line (required)
    TEMPLATES_DIR/otp/body.txt      the plain-text body (required)
    TEMPLATES_DIR/otp/body.html     the HTML alternative (optional)

A file per part rather than one TOML per template: each part is exactly the text it holds
(no string quoting or escaping, trailing spaces kept), editors treat HTML as HTML, and
Jinja's line numbers are the file's own, so an error points at the line to fix. Jinja drops
the single newline that ends a file, as editors write one.

Parts are Jinja templates rendered in ``emailq.sandbox``'s bounded environment; the HTML
part escapes every value it prints, the text parts print them as they are. Every file is
read, parsed and checked when the API (or the CLI's ``send``) starts: a bad one stops it
with one line naming the file and line (``TemplatesConfigError``). Every error while
rendering is a ``TemplateError``, an ``InvalidMessage`` (422) naming the template, its
part, the line and, for a missing value, the variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from jinja2 import Template, meta, nodes
from jinja2 import TemplateError as JinjaError
from jinja2.exceptions import TemplateSyntaxError, UndefinedError

from emailq.compose import TEMPLATE_NAME, Content, check_body, check_subject
from emailq.errors import ConfigError, InvalidMessage, MessageTooLarge
from emailq.sandbox import BoundedEnvironment, budget, check_and_bound
from emailq.templating import check_header

# Part name (as in a send request, and in previews) -> its file.
PART_FILES = {"subject": "subject.txt", "body": "body.txt", "html": "body.html"}
REQUIRED_PARTS = ("subject", "body")
MAX_FILE_BYTES = 256 * 1024  # a part's source; mails are rendered to MAX_BODY_BYTES at most
SUBJECT_LIMIT = 4 * 998  # characters a subject may render to before check_subject refuses it
_UNDEFINED = re.compile(r"^'([A-Za-z_][A-Za-z0-9_]*)' is undefined$")


class TemplatesConfigError(ConfigError, ValueError):
    """``TEMPLATES_DIR`` or a file in it is unreadable or invalid; the message names the
    file and line."""


class TemplateError(InvalidMessage):
    """Rendering a template failed; ``part`` and ``line`` say where, ``field`` what to fix
    (``variables.<name>`` for a value not given, else ``template``)."""

    def __init__(self, message: str, *, field: str, part: str, line: int | None) -> None:
        super().__init__(message, field=field)
        self.part, self.line = part, line


@dataclass(frozen=True)
class Part:
    """One part of a template, compiled."""

    template_name: str
    name: str  # subject | body | html
    path: Path
    template: Template
    variables: frozenset[str]  # the names it reads that the caller may give

    @property
    def file(self) -> str:
        """``otp/body.html``: how errors name it."""
        return f"{self.template_name}/{self.path.name}"


@dataclass(frozen=True)
class StoredTemplate:
    """A template: its parts in the order subject, body, html."""

    name: str
    parts: tuple[Part, ...]

    @property
    def variables(self) -> list[str]:
        """Every variable any part reads, sorted."""
        return sorted(set().union(*(part.variables for part in self.parts)))

    def part(self, name: str) -> Part | None:
        """The part called ``name``, if this template has one."""
        return next((part for part in self.parts if part.name == name), None)


@dataclass(frozen=True)
class PartResult:
    """One part of a preview: its rendered text, or why it could not be rendered."""

    part: str
    content: str | None = None
    error: InvalidMessage | MessageTooLarge | None = None


class Templates:
    """The loaded templates by name; renders them (``compose.TemplateRenderer``)."""

    def __init__(self, templates: Mapping[str, StoredTemplate]) -> None:
        self._templates = dict(templates)

    def __len__(self) -> int:
        return len(self._templates)

    def get(self, name: str) -> StoredTemplate | None:
        """The template called ``name``, or None."""
        return self._templates.get(name)

    def all(self) -> list[StoredTemplate]:
        """Every template, by name."""
        return [self._templates[name] for name in sorted(self._templates)]

    def _named(self, name: str) -> StoredTemplate:
        found = self._templates.get(name)
        if not self._templates:
            raise InvalidMessage("no templates here: TEMPLATES_DIR is not set, or holds none",
                                 field="template")  # fmt: skip
        if found is None:
            raise InvalidMessage(f"no template {name!r} in TEMPLATES_DIR", field="template")
        return found

    def render(self, name: str, values: Mapping[str, str], *, max_body_bytes: int) -> Content:
        """Template ``name`` rendered with ``values``; raises ``InvalidMessage`` (a
        ``TemplateError`` for an error in a part) or ``MessageTooLarge``."""
        template = self._named(name)
        rendered = {part.name: render_part(part, values, max_body_bytes=max_body_bytes)
                    for part in template.parts}  # fmt: skip
        return Content(rendered["subject"], rendered["body"], rendered.get("html"))

    def preview(
        self, name: str, values: Mapping[str, str], *, max_body_bytes: int
    ) -> list[PartResult]:
        """Every part of template ``name`` rendered on its own, with its error if it has one."""
        results = []
        for part in self._named(name).parts:
            try:
                content = render_part(part, values, max_body_bytes=max_body_bytes)
            except (InvalidMessage, MessageTooLarge) as exc:
                results.append(PartResult(part.name, error=exc))
            else:
                results.append(PartResult(part.name, content))
        return results


# -- Rendering -----------------------------------------------------------------------------


def render_part(part: Part, values: Mapping[str, str], *, max_body_bytes: int) -> str:
    """``part`` rendered with ``values`` and checked as any subject or body is."""
    if part.name == "subject":
        # As render_subject does: a value with a line break is named as the caller sent it.
        for name in sorted(part.variables & values.keys()):
            check_header(values[name], f"variables.{name}", tab=True)
        return _checked(part, check_subject, _render(part, values, limit=SUBJECT_LIMIT))
    text = _render(part, values, limit=max_body_bytes)
    check_body(text, None, max_body_bytes=max_body_bytes, field=part.name)
    return text


def _render(part: Part, values: Mapping[str, str], *, limit: int) -> str:
    """Run the part's template within a fresh budget, streaming its output up to ``limit``."""
    chunks: list[str] = []
    with budget(limit) as spent:
        try:
            size = 0
            for chunk in part.template.generate(dict(values)):
                size += len(chunk)
                spent.size(size, "the output")
                spent.clock()
                chunks.append(chunk)
        # The template is code run on the caller's values: whatever it raises (a sandbox
        # refusal, a missing value, int('abc'), a ZeroDivisionError) is this request's 422.
        except Exception as exc:
            raise _render_error(part, exc) from exc
    return "".join(chunks)


def _checked(part: Part, check: Callable[[str], str], text: str) -> str:
    """``check(text)``, its refusal reworded to name the template part."""
    try:
        result = check(text)
    except InvalidMessage as exc:
        field = exc.field if exc.field and exc.field.startswith("variables.") else "template"
        raise TemplateError(f"template {part.file}: {exc}", field=field, part=part.name,
                            line=None) from exc  # fmt: skip
    return result


def _render_error(part: Part, exc: Exception) -> TemplateError:
    line = _template_line(exc.__traceback__, str(part.path))
    where = f"template {part.file}" + (f", line {line}" if line else "")
    missing = _UNDEFINED.match(str(exc)) if isinstance(exc, UndefinedError) else None
    if missing is not None:
        return TemplateError(f"{where}: variable {missing[1]!r} is not given (variables."
                             f"{missing[1]})", field=f"variables.{missing[1]}", part=part.name,
                             line=line)  # fmt: skip
    # Jinja's own errors read as sentences; Python's need their type (ZeroDivisionError).
    reason = str(exc) if isinstance(exc, JinjaError) else f"{type(exc).__name__}: {exc}"
    return TemplateError(f"{where}: {reason}", field="template", part=part.name, line=line)


def _template_line(tb: TracebackType | None, filename: str) -> int | None:
    """The template line being run when the error was raised: Jinja rewrites tracebacks so
    that template frames carry the template's file name and line."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# -- Loading -------------------------------------------------------------------------------


def load_templates(path: Path | None) -> Templates:
    """The templates of directory ``path``, each parsed and checked; none when None.

    Raises ``TemplatesConfigError`` naming the file (and line) of the first problem.
    """
    if path is None:
        return Templates({})
    if not path.is_dir():
        raise TemplatesConfigError(f"TEMPLATES_DIR {path}: not a directory")
    envs = {False: BoundedEnvironment(autoescape=False), True: BoundedEnvironment(autoescape=True)}
    found: dict[str, StoredTemplate] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):  # .git, editors' swap files
            continue
        if not entry.is_dir() or not re.fullmatch(TEMPLATE_NAME, entry.name):
            raise TemplatesConfigError(
                f"TEMPLATES_DIR {entry}: expected a directory per template, named with "
                "letters, digits, '-' and '_' (such as otp/ holding subject.txt and body.txt)"
            )
        found[entry.name] = _load_template(entry, envs)
    return Templates(found)


def _load_template(folder: Path, envs: Mapping[bool, BoundedEnvironment]) -> StoredTemplate:
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    unknown = sorted(names - set(PART_FILES.values()))
    if unknown:  # a typo (body.htm) would otherwise drop a part without a word
        raise TemplatesConfigError(f"TEMPLATES_DIR {folder / unknown[0]}: unexpected file (a "
                                   "template has subject.txt, body.txt, body.html)")  # fmt: skip
    for part in REQUIRED_PARTS:
        if PART_FILES[part] not in names:
            raise TemplatesConfigError(f"TEMPLATES_DIR {folder}: {PART_FILES[part]} is missing")
    parts = tuple(
        _compile(folder.name, part, folder / file, envs[part == "html"])
        for part, file in PART_FILES.items()
        if file in names
    )
    return StoredTemplate(folder.name, parts)


def _read(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TemplatesConfigError(f"TEMPLATES_DIR {path}: {size} bytes; a template part "
                                       f"may hold at most {MAX_FILE_BYTES}")  # fmt: skip
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplatesConfigError(f"TEMPLATES_DIR {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8-sig")  # a BOM (Windows editors) is not part of the text
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TemplatesConfigError(f"TEMPLATES_DIR {path}:{line}: not UTF-8") from exc


def _compile(template_name: str, part: str, path: Path, env: BoundedEnvironment) -> Part:
    source = _read(path)
    try:
        tree = check_and_bound(env.parse(source, name=f"{template_name}/{path.name}",
                                         filename=str(path)))  # fmt: skip
        if part == "subject":
            _one_line(tree)
        tree.set_environment(env)
        code = env.compile(tree, name=f"{template_name}/{path.name}", filename=str(path))
    except TemplateSyntaxError as exc:
        raise TemplatesConfigError(f"TEMPLATES_DIR {path}:{exc.lineno}: {exc.message}") from exc
    except RecursionError as exc:  # ((((... thousands deep: the parser recurses per level
        raise TemplatesConfigError(f"TEMPLATES_DIR {path}: nested too deeply") from exc
    template = env.template_class.from_code(env, code, env.make_globals(None))
    variables = frozenset(meta.find_undeclared_variables(tree)) - set(env.globals)
    return Part(template_name, part, path, template, variables)


def _one_line(tree: nodes.Template) -> None:
    """Refuse a subject whose own text spans lines (values are checked when rendered).
    Jinja has already dropped the newline that ends the file."""
    for data in tree.find_all(nodes.TemplateData):
        found = re.search(r"[\r\n]", data.data)
        if found is not None:
            line = data.lineno + data.data[: found.start()].count("\n") + 1
            raise TemplateSyntaxError("a subject is one line; this line is a second one", line)
