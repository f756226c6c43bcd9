"""The Jinja environment stored templates run in: sandboxed, strict, and bounded.

Jinja's ``ImmutableSandboxedEnvironment`` stops a template from reaching Python internals
(``''.__class__``, a function's ``__globals__``) and from changing lists or dicts. It does
not bound what a render costs: Jinja's own docs say a small template can render a huge
output, and ask the application to limit resources. A thread with a timeout cannot do it
(a Python thread cannot be killed), so every way a template can spend memory or time is
bounded where it happens, before the cost is paid:

- **Values**: ``*``, ``+`` and ``**`` are intercepted and refuse a result over the render's
  limit (``'x' * 10**9`` is refused before anything is allocated); ``~`` is rewritten into a
  checked join; ``%`` on a string is refused (``'%0999999999d' % 1`` has no bound).
- **Calls**: only an allow-list: the globals ``range`` (Jinja caps it at ``MAX_RANGE``),
  ``dict``, ``cycler``, ``joiner``, and str methods whose result is no longer than their
  input. ``str.format``/``format_map`` (the escapes on record), ``center``, ``ljust``,
  ``zfill``... are refused, however they were reached (``|attr``, a stored reference).
- **Filters**: only those whose output is at most a fixed multiple of their input;
  ``replace`` and ``join`` are checked before they build their result.
- **Loops**: every ``for`` is rewritten to draw from one per-render budget of
  ``LOOP_BUDGET`` iterations, and to check a deadline of ``RENDER_SECONDS`` on each.
- **Output**: streamed, and stopped once it passes the render's limit.
- **Constructs with no bound** are refused when the template is loaded, so a bad template
  stops the start rather than a send: macros and call blocks (they recurse), recursive
  loops, ``{% set %}``/``{% filter %}`` blocks (they build output the output cap never sees),
  include/import/extends/block (one part is one file), and ``{% autoescape %}`` (HTML
  parts always escape). ``namespace`` (state carried across loop iterations) and ``lipsum``
  are not provided.

Only text and numbers are printed: ``{{ self }}``, ``{{ range }}`` or a list is an error,
not its ``repr``. Undefined variables are errors (``StrictUndefined``).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import SecurityError, TemplateAssertionError
from jinja2.filters import FILTERS
from jinja2.runtime import Context, LoopContext, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, pass_context
from markupsafe import Markup, escape

# Loop iterations per render, all loops together: a mail has no use for more, and it bounds
# nested loops (100 x 100 x 100 is 1,000,000 without it).
LOOP_BUDGET = 10_000
# Wall-clock bound on one render, checked at every loop iteration and output chunk. Between
# two checks a render does a bounded amount of work (every value is within the limit).
RENDER_SECONDS = 0.5
# Integers: 4096 bits (1,233 digits) is far past any number a mail prints, and keeps
# ``10**10**10`` from running for minutes.
MAX_INT_BITS = 4096

# Filters that cannot make their output more than a few times longer than their input.
# Left out: center, indent, wordwrap, format (widths and strings of any size), batch, slice
# (fill values), map/select/reject/sort/groupby/... (call other filters by name), random,
# pprint and xmlattr (reprs), lipsum, and safe: it would let a caller's variable skip the
# HTML escaping.
SAFE_FILTERS = frozenset({
    "abs", "attr", "capitalize", "count", "d", "default", "e", "escape", "filesizeformat",
    "first", "float", "forceescape", "int", "last", "length", "list", "lower", "reverse",
    "round", "striptags", "title", "tojson", "trim", "truncate", "upper", "urlencode",
    "wordcount",
})  # fmt: skip
# str methods whose result is no longer than the string (or a list of its pieces).
SAFE_STR_METHODS = frozenset({
    "capitalize", "count", "endswith", "find", "isalnum", "isalpha", "isdigit", "islower",
    "isspace", "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix",
    "rfind", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip",
    "swapcase", "title", "upper",
})  # fmt: skip
_SAFE_METHODS: dict[type, frozenset[str]] = {
    LoopContext: frozenset({"cycle", "changed"}),
    Cycler: frozenset({"next", "reset"}),
    dict: frozenset({"items", "keys", "values", "get"}),
}
# What may be printed, or joined with ``~``: text and numbers, never an object's repr (and
# Undefined, so that printing it raises its own error).
_PRINTABLE = (str, int, float, type(None), Undefined)

_LOOP_FILTER = "_emailq_loop"
_CONCAT_FILTER = "_emailq_concat"


class RenderLimit(SecurityError):
    """A render went past one of its bounds (size, loop budget, time)."""


@dataclass
class Budget:
    """What one render may still spend: characters per value and of output, loop
    iterations, time."""

    limit: int
    loops: int = LOOP_BUDGET
    deadline: float = field(default_factory=lambda: time.monotonic() + RENDER_SECONDS)

    def size(self, length: int, what: str) -> None:
        """Refuse a value or output of ``length`` characters over the limit."""
        if length > self.limit:
            raise RenderLimit(f"{what} would be over {self.limit} characters")

    def iteration(self) -> None:
        """Spend one loop iteration; refuse once the budget or the time is used up."""
        self.loops -= 1
        if self.loops < 0:
            raise RenderLimit(f"loops ran over {LOOP_BUDGET} iterations in all")
        self.clock()

    def clock(self) -> None:
        """Refuse once the render has taken ``RENDER_SECONDS``."""
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"rendering took over {RENDER_SECONDS} s")


# The budget of the render in progress. A contextvar, not a template variable: templates
# cannot see or change it. Renders run synchronously, so one render never sees another's.
_BUDGET: ContextVar[Budget] = ContextVar("emailq_render_budget")


@contextmanager
def budget(limit: int, *, seconds: float | None = None) -> Iterator[Budget]:
    """Make a fresh ``Budget`` the current one for the render run inside."""
    seconds = RENDER_SECONDS if seconds is None else seconds  # read now: tests may lower it
    current = Budget(limit, deadline=time.monotonic() + seconds)
    token = _BUDGET.set(current)
    try:
        yield current
    finally:
        _BUDGET.reset(token)


def _current() -> Budget:
    try:
        return _BUDGET.get()
    except LookupError:  # only a render sets one; nothing else runs template code
        raise RenderLimit("template code ran outside a render") from None


def _printable(value: Any) -> Any:
    """``value`` if it may become text (see ``_PRINTABLE``)."""
    if isinstance(value, _PRINTABLE):
        return value
    raise SecurityError(f"only text and numbers can be printed, not {type(value).__name__!r}")


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else len(str(value))


def _checked_binop(op: str, left: Any, right: Any) -> None:
    """Refuse ``left op right`` if its result could pass the current limit."""
    limit = _current()
    if op == "%" and isinstance(left, str):
        raise SecurityError("%-formatting a string is not allowed in templates (widths have "
                            "no bound)")  # fmt: skip
    sequences = (str, list, tuple)
    if op == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        limit.size(len(left) + len(right), "a value")
    elif op == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, sequences) and isinstance(count, int):
                limit.size(len(seq) * max(count, 0), "a value")
        if isinstance(left, int) and isinstance(right, int):
            _bits(abs(left).bit_length() + abs(right).bit_length())
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        _bits(max(abs(left).bit_length(), 1) * right)


def _bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise RenderLimit(f"a number would be over {MAX_INT_BITS} bits")


@pass_context
def _loop(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """What every ``for`` iterates over: the same items, each paid for from the budget."""
    current = _current()
    for item in iterable:
        current.iteration()
        yield item


@pass_context
def _concat(context: Context, parts: list[Any]) -> str:
    """``a ~ b``: each part must be text or a number, and the result within the limit."""
    texts = [str(_printable(part)) for part in parts]
    _current().size(sum(len(t) for t in texts), "a value")
    if context.eval_ctx.autoescape or any(isinstance(p, Markup) for p in parts):
        return Markup("").join(escape(t) if not isinstance(p, Markup) else p
                               for t, p in zip(texts, parts, strict=True))  # fmt: skip
    return "".join(texts)


@pass_context
def _replace(context: Context, value: Any, old: str, new: str, count: int | None = None) -> Any:
    """Jinja's ``replace``, refused before it builds a result over the limit."""
    text, old, new = str(value), str(old), str(new)
    times = text.count(old) if old else len(text) + 1
    times = times if count is None else min(times, max(count, 0))
    _current().size(len(text) + times * max(len(new) - len(old), 0), "a value")
    replace: Callable[..., Any] = FILTERS["replace"]
    return replace(context.eval_ctx, value, old, new, count)


@pass_context
def _join(context: Context, value: Iterable[Any], d: str = "", attribute: Any = None) -> Any:
    """Jinja's ``join``, refused before it builds a result over the limit."""
    if attribute is not None:
        raise SecurityError("join(attribute=...) is not allowed in templates")
    items = [_printable(item) for item in value]
    total = sum(_length(item) for item in items) + len(str(d)) * max(len(items) - 1, 0)
    _current().size(total, "a value")
    join: Callable[..., Any] = FILTERS["join"]
    return join(context.eval_ctx, items, d)


def _string(value: Any) -> str:
    """``|string``: text and numbers only, as printing."""
    return str(_printable(value))


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the bounds described in the module docstring."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(autoescape=autoescape, undefined=StrictUndefined,
                         finalize=_printable, auto_reload=False)  # fmt: skip
        self.globals = {k: v for k, v in self.globals.items()
                        if k in ("range", "dict", "cycler", "joiner")}  # fmt: skip
        self.filters = {k: v for k, v in self.filters.items() if k in SAFE_FILTERS}
        self.filters.update({"replace": _replace, "join": _join, "string": _string,
                             _LOOP_FILTER: _loop, _CONCAT_FILTER: _concat})  # fmt: skip
        self._callable_globals = tuple(self.globals.values())

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse an operation whose result could pass the limit, before it runs."""
        _checked_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """Call ``__obj`` only if it is on the allow-list (see the module docstring)."""
        if not __self._may_call(__obj):
            name = getattr(__obj, "__name__", type(__obj).__name__)
            raise SecurityError(f"calling {name!r} is not allowed in templates")
        return super().call(__context, __obj, *args, **kwargs)

    def _may_call(self, obj: Any) -> bool:
        if any(obj is allowed for allowed in self._callable_globals):
            return True
        if isinstance(obj, Joiner | Undefined):  # calling an Undefined raises its own error
            return True
        if not isinstance(obj, types.BuiltinMethodType | types.MethodType):
            return False  # a function: str.format's sandbox wrapper, a stored reference...
        owner, name = obj.__self__, obj.__name__
        if isinstance(owner, str):
            return name in SAFE_STR_METHODS
        return any(isinstance(owner, kind) and name in names
                   for kind, names in _SAFE_METHODS.items())  # fmt: skip


# -- Loading: refuse what cannot be bounded, rewrite what can ------------------------------

_REFUSED: dict[type[nodes.Node], str] = {
    nodes.Macro: "macros are not supported (a macro can call itself without bound)",
    nodes.CallBlock: "call blocks are not supported (they call macros)",
    nodes.Include: "include is not supported: each part is one file",
    nodes.Import: "import is not supported: each part is one file",
    nodes.FromImport: "import is not supported: each part is one file",
    nodes.Extends: "extends is not supported: each part is one file",
    nodes.Block: "blocks are not supported: they serve extends, which is not supported",
    nodes.AssignBlock: "{% set %} blocks are not supported: their output is not bounded",
    nodes.FilterBlock: "{% filter %} blocks are not supported: their output is not bounded",
    nodes.EvalContextModifier: "{% autoescape %} is not supported: HTML parts always escape",
    nodes.ScopedEvalContextModifier: "{% autoescape %} is not supported: HTML parts always escape",
}
# Jinja globals left out, named so a template using one is refused at load, not taken for a
# variable the caller forgot.
_WITHHELD = {
    "namespace": "namespace() is not provided (it carries values across loop iterations)",
    "lipsum": "lipsum() is not provided (its output has no bound)",
}


def check_and_bound(template: nodes.Template) -> nodes.Template:
    """Refuse the constructs with no bound (``TemplateAssertionError`` with its line) and
    rewrite loops and ``~`` to draw on the render's budget; returns ``template``."""
    for node in template.find_all(nodes.Node):
        reason = _REFUSED.get(type(node))
        if reason is None and isinstance(node, nodes.For) and node.recursive:
            reason = "recursive loops are not supported (their depth is not bounded)"
        if reason is None and isinstance(node, nodes.Name) and node.ctx == "load":
            reason = _WITHHELD.get(node.name)
        if reason is not None:
            raise TemplateAssertionError(reason, node.lineno)
    for loop in template.find_all(nodes.For):
        loop.iter = _filtered(loop.iter, _LOOP_FILTER)
    _replace_concat(template)
    return template


def _filtered(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _replace_concat(node: nodes.Node) -> None:
    """Turn every ``a ~ b`` below ``node`` into the checked ``_concat`` filter."""
    for name, value in node.iter_fields():
        if isinstance(value, list):
            value[:] = [_without_concat(item) for item in value]
            children: list[Any] = value
        else:
            children = [value]
            if isinstance(value, nodes.Node):
                setattr(node, name, _without_concat(value))
                children = [getattr(node, name)]
        for child in children:
            if isinstance(child, nodes.Node):
                _replace_concat(child)


def _without_concat(value: Any) -> Any:
    if isinstance(value, nodes.Concat):
        return _filtered(nodes.List(value.nodes, lineno=value.lineno), _CONCAT_FILTER)
    return value
