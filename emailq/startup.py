"""What every entry point does first: build ``Settings``, or stop with one line and exit 2.

The API, the worker, the CLI and the dev runner all start here, so a bad value reads the
same everywhere: ``emailq: MAX_ATTEMPTS: must be an integer (got 'abc')``, exit code 2, no
traceback. pydantic's ``ValidationError`` is converted where ``Settings`` is built, into a
``ConfigError`` that names the environment variable, says what it must be and echoes the
value (except for settings that may hold a secret). ``given_settings`` does the same for a
tool's or a test's named values (``Queue.from_url``), reading no environment.
"""

from __future__ import annotations

import difflib
import functools
import gc
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from emailq.errors import ConfigError, validation_message
from emailq.settings import GivenSettings, Settings

# The exit status of a configuration error, like a command-line usage error.
EXIT_CONFIG = 2

# Never echoed back: a password, a URL that may carry one, a bearer token (and the TLS key's
# path, whose check is about the pair: its echo would only confuse).
_SECRET = frozenset({"smtp_pass", "redis_url", "metrics_token", "redis_sentinel_password",
                     "redis_tls_key_file"})  # fmt: skip
_LONGEST_ECHO = 60


def _requirement(error: ErrorDetails) -> str:
    """What the value must be, in words, for pydantic's common error types."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    words = {
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_parsing": "must be a number",
        "bool_parsing": "must be true or false",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be more than {ctx.get('gt')}",
        "less_than_equal": f"must be at most {ctx.get('le')}",
        "less_than": f"must be less than {ctx.get('lt')}",
        "enum": f"must be one of {ctx.get('expected')}",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "string_pattern_mismatch": f"must match {ctx.get('pattern')}",
    }
    if kind in words:
        return words[kind]
    # Our own validators already word their message, often starting with the name.
    return validation_message(error)


def _echo(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > _LONGEST_ECHO:
        text = text[:_LONGEST_ECHO] + "..."
    return repr(text)


_SETTING_NAMES = tuple(name.upper() for name in Settings.model_fields)


def describe(exc: ValidationError) -> str:
    """One line for every problem in ``exc``: ``NAME: must be ... (got 'value')``."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field.upper()
        what = _requirement(error)
        # A check about several settings names them itself (and may be reported under
        # whichever field pydantic checked last).
        if not what.startswith(_SETTING_NAMES):
            what = f"{name}: {what}"
        got = _echo(error["input"])
        if field not in _SECRET and got not in what:  # some messages quote it already
            what += f" (got {got})"
        parts.append(" ".join(what.split()))  # a value with a line break stays on one line
    return "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment and ``.env`` (``overrides`` win), or ``ConfigError``.
    A name that is no setting but nearly one (``MAX_ATTEMTPS``) is warned of on stderr."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    _warn_misspelt_once()
    return settings


# Set by `make dev` for its children, once it has warned itself: one warning, not five.
NAMES_CHECKED_ENV = "EMAILQ_SETTING_NAMES_CHECKED"
# How alike a name must be to a setting's to be taken for a misspelling of it. In .env, the
# file written for emailq: SMTP_PASSWORD (0.82 to SMTP_PASS) and MAX_ATTEMTPS (0.92) are; a
# compose variable such as EMAILQ_SMTP_HOST (0.72) is not. In the environment, which other
# tools fill too, only closer ones: LOG_LEVELS (0.95) and API_KEY (0.93), not Heroku's
# WEB_CONCURRENCY (0.88 to WEBHOOK_CONCURRENCY) or a Kubernetes service's REDIS_SENTINEL_PORT.
_ALIKE_IN_FILE = 0.8
_ALIKE_IN_ENVIRONMENT = 0.9
# A variable's name; a malformed .env line reads as one long "name" that may hold a value
# (REDIS_SENTINEL_PASSWORD:hunter2), which must never be echoed (python-dotenv says the
# line does not parse).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def misspelt_settings(env_file: Path, environ: Mapping[str, str]) -> list[str]:
    """A warning for each name in ``env_file`` or ``environ`` that is no setting but nearly
    one. Settings ignore names they do not know (``.env`` may hold docker-compose's too),
    so a typo would otherwise leave the default in force without a word."""
    warnings = []
    sources = ((str(env_file), _names_in(env_file), _ALIKE_IN_FILE),
               ("the environment", list(environ), _ALIKE_IN_ENVIRONMENT))  # fmt: skip
    for where, keys, alike in sources:
        for key in keys:
            if key.upper() in _SETTING_NAMES or not _NAME.fullmatch(key):
                continue
            close = difflib.get_close_matches(key.upper(), _SETTING_NAMES, n=1, cutoff=alike)
            if close:
                warnings.append(f"{where} sets {key}, which is no setting (did you mean "
                                f"{close[0]}?); it is ignored")  # fmt: skip
    return warnings


def _names_in(env_file: Path) -> list[str]:
    if not env_file.is_file():
        return []
    # Settings read the file too: python-dotenv's warning about a line it cannot parse is
    # said once, there, not again here.
    parser_log = logging.getLogger("dotenv.main")
    was, parser_log.disabled = parser_log.disabled, True
    try:
        return list(dotenv_values(env_file))
    finally:
        parser_log.disabled = was


@functools.cache
def _warn_misspelt_once() -> None:
    if os.environ.get(NAMES_CHECKED_ENV):
        return
    for warning in misspelt_settings(Path(".env"), os.environ):
        sys.stderr.write(f"emailq: warning: {warning}\n")
    sys.stderr.flush()


def given_settings(**values: Any) -> Settings:
    """``Settings`` of ``values`` and the defaults only (no environment, no ``.env``),
    validated as ``load_settings`` validates, or ``ConfigError``."""
    try:
        return GivenSettings(**values)
    except ValidationError as exc:
        # describe() keeps REDIS_URL's password out; pydantic's own text echoes every input.
        raise ConfigError(describe(exc)) from None


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Turn a ``ConfigError`` raised inside into one line on stderr and exit code 2."""
    try:
        yield
    except ConfigError as exc:
        sys.stderr.write(f"emailq: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG) from None


# Container objects allocated, net of those freed, before a young collection runs (CPython's
# default is 700). A request's objects die by reference counting, but the ones of requests
# in flight together (32 in the benchmark) were enough to start a collection every dozen
# requests, which promoted them to older generations, each pass a cost and a pause.
GC_YOUNG_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Keep the garbage collector out of a serving process's way: call it once the app is
    built, before it serves.

    What start-up built (the modules, classes and pydantic validators) is frozen
    (``gc.freeze``): it took the collector about 100 ms a full pass on this machine, and a
    busy API made one every half second or so, a seventh of the process's time and its p99
    latency. Collected first, so no garbage is frozen with it. The young generation then
    waits for ``GC_YOUNG_THRESHOLD`` allocations, so requests in flight no longer start a
    pass of their own: measured in process, 32 at a time, no collection ran at all.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
