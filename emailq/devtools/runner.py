"""``emailq dev``: the whole service on one machine, with nothing else installed.

Starts a real Redis server, the SMTP capture server, the API, one worker and the webhook
dispatcher as child processes, prints where they are, and stops them in order on Ctrl-C.
This module is a composition root: it imports nothing from server/ or worker/, it runs them.

A first day that goes wrong should go wrong gently:

- the ports are fixed (Redis 6379, SMTP 1025, API 8000, each can be changed), so the CLI and
  a second run find the same Redis; a port already in use is one line before anything
  starts, naming the setting to change;
- the settings the children will read are checked first, one line for a bad one;
- each child runs in its own process group, which the runner signals as a whole, and a
  console that goes away (``emailq dev | tee log`` then Ctrl-C, or ``| head``) never keeps
  the runner from stopping them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from emailq.addresses import domain_of
from emailq.devtools.redis_server import RedisServer
from emailq.errors import ConfigError
from emailq.settings import Settings
from emailq.startup import NAMES_CHECKED_ENV, exit_on_config_error, load_settings
from emailq.templates import load_templates

HOST = "127.0.0.1"


@dataclass(frozen=True)
class DevConfig:
    """Where the dev runner puts things."""

    data_dir: Path = Path(".emailq-dev")
    api_port: int = 8000
    smtp_port: int = 1025
    redis_port: int = 6379


@dataclass(frozen=True)
class _Port:
    number: int
    what: str
    make_var: str  # `make dev PORT=...`
    flag: str  # `emailq dev --port ...`


def _ports(cfg: DevConfig) -> list[_Port]:
    return [
        _Port(cfg.redis_port, "Redis", "REDIS_PORT", "--redis-port"),
        _Port(cfg.smtp_port, "SMTP capture", "SMTP_PORT", "--smtp-port"),
        _Port(cfg.api_port, "API", "PORT", "--port"),
    ]


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers themselves bind: a port a previous run left in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def check_ports(cfg: DevConfig) -> None:
    """``ConfigError`` naming the first port that is taken (or given twice), and how to
    choose another."""
    ports = _ports(cfg)
    for i, port in enumerate(ports):
        if not 1 <= port.number <= 65535:
            raise ConfigError(f"{port.make_var}: must be a port number (got {port.number})")
        for other in ports[:i]:
            if other.number == port.number:
                raise ConfigError(f"{other.make_var} and {port.make_var} are both {port.number}; "
                                  "give each its own port")  # fmt: skip
    for port in ports:
        if _in_use(port.number):
            instead = _suggest(port.number, {p.number for p in ports})
            raise ConfigError(
                f"port {port.number} ({port.what}) is already in use on {HOST}: stop what "
                f"listens there (an earlier `make dev`?) or choose another port with "
                f"`make dev {port.make_var}={instead}` (`emailq dev {port.flag} {instead}`)"
            )


def _suggest(port: int, taken: set[int]) -> int:
    """A nearby port that is free now and not given to another of our servers."""
    for candidate in range(port + 1, min(port + 100, 65536)):
        if candidate not in taken and not _in_use(candidate):
            return candidate
    return port + 1 if port < 65535 else port - 1


# The test page's form (served at /dev/contact): mail to a made-up owner, which the capture
# server accepts and prints like any other.
DEV_FORMS = """\
[[forms]]
id = "contact"
to = ["owner@example.com"]
subject = "Contact form: {name}"
allowed_origins = []
redirect = "/dev/thanks"
"""


def _write_dev_forms(data_dir: Path) -> Path:
    path = data_dir / "forms.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DEV_FORMS)
    return path


def _overrides(cfg: DevConfig) -> dict[str, str]:
    """The settings the runner gives its children, over the user's environment and .env."""
    return {
        "FORMS_FILE": str((cfg.data_dir / "forms.toml").resolve()),
        "DEV_PAGES": "true",
        # The inbox at /dev/inbox reads what the capture server writes.
        "DEV_INBOX_DIR": str((cfg.data_dir / "mail").resolve()),
        "REDIS_URL": redis_url(cfg.redis_port),
        "SMTP_HOST": HOST,
        "SMTP_PORT": str(cfg.smtp_port),
        "SMTP_SECURITY": "none",
        "SMTP_USER": "",
        "SMTP_PASS": "",
        # Trying things out means sending and submitting the form again and again: the
        # limits, meant for a public deployment, would only get in the way here.
        "RATE_LIMIT_PER_KEY": "",
        "RATE_LIMIT_PER_FORM_ADDRESS": "",
        # A webhook receiver under development runs on this machine; in production the
        # guard stays on (an endpoint on a private address must be allowed explicitly).
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }


def example_templates() -> Path | None:
    """The repository's ``examples/templates`` (the original service's Korean OTP mail),
    found from this file wherever the module lives; None outside a checkout."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            found = parent / "examples" / "templates"
            return found if found.is_dir() else None
    return None


def redis_url(port: int) -> str:
    """The URL of the dev Redis, as the banner tells the CLI to export it."""
    return f"redis://{HOST}:{port}/0"


def _check_settings(overrides: dict[str, str]) -> Settings:
    """Raise ``ConfigError`` for a setting the children would refuse, before any starts."""
    # Built as the children will build theirs: environment and .env, under our overrides.
    return load_settings(**{name.lower(): value for name, value in overrides.items()})


def _with_templates(overrides: dict[str, str], settings: Settings) -> Path | None:
    """Give the children the example templates unless TEMPLATES_DIR names the user's own;
    check them as the API will (``TemplatesConfigError``). Returns the directory used."""
    templates = settings.templates_dir
    if templates is None:
        templates = example_templates()
        if templates is not None:
            overrides["TEMPLATES_DIR"] = str(templates)
    load_templates(templates)
    return templates


@dataclass
class _Console:
    """stdout, which may go away under us (a closed pipe): then we carry on without it."""

    gone: bool = False

    def say(self, text: str) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except OSError:
            self.gone = True
            # Point fd 1 at /dev/null, so nothing later (not even the interpreter's flush at
            # exit) fails on the broken pipe again.
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


@dataclass
class _Signals:
    """Ctrl-C, SIGTERM and SIGHUP ask to stop; a second one asks to stop now."""

    count: int = 0
    names: list[str] = field(default_factory=list)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    @property
    def stopping(self) -> bool:
        return self.count > 0

    @property
    def hurry(self) -> bool:
        return self.count > 1


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session and process group: Ctrl-C in the terminal reaches only this runner, which
    # then stops the children in order (API, worker, capture, Redis) by signalling each
    # child's whole group, so nothing a child started outlives it.
    return subprocess.Popen(args, env=env, start_new_session=True)  # noqa: S603  # fixed argv


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen[bytes], signals: _Signals, timeout: float = 30) -> None:
    """SIGTERM the child's group; SIGKILL it after ``timeout`` or on a second Ctrl-C."""
    _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not signals.hurry:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    # Whatever is left in the group (the child, or anything it started) goes now.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _wait_listening(children: dict[str, subprocess.Popen[bytes]], ports: dict[str, int],
                    signals: _Signals, timeout: float = 60) -> str | None:  # fmt: skip
    """Wait until each child listens on its port; the problem, if one exits or hangs."""
    deadline = time.monotonic() + timeout
    for name, port in ports.items():
        while not _listening(port):
            if signals.stopping:
                return None
            if children[name].poll() is not None:
                return f"the {name} exited (code {children[name].returncode}); see above"
            if time.monotonic() > deadline:
                return f"the {name} did not listen on port {port} within {timeout:.0f}s"
            time.sleep(0.1)
    return None


# What `make dev` lets ``from`` be, unless the user chose: MAIL_FROM's default domain,
# localhost, is special-use, and no ``from`` there passes validation (422), so the README's
# ``from`` examples (shop@example.com, orders@shop.example.com) would be refused (403) in
# dev. The capture server takes any sender; SPF and DKIM, which the limit protects, do not
# apply. The README's two domains, exactly: any other is still 403, as in production.
DEV_SENDERS = "@example.com,@shop.example.com"


def _with_senders(overrides: dict[str, str], settings: Settings) -> None:
    """Let ``from`` use DEV_SENDERS when the user set no ALLOWED_SENDERS and MAIL_FROM's
    domain (localhost, the default) is one no ``from`` can use."""
    if not settings.allowed_senders and "." not in domain_of(settings.mail_from_address):
        overrides["ALLOWED_SENDERS"] = DEV_SENDERS


# The runner's settings that the CLI in another shell must share to behave as the API does.
CLI_SHARED = ("REDIS_URL", "TEMPLATES_DIR", "ALLOWED_SENDERS")


def _template_hint(api: str, templates: Path | None) -> list[str]:
    if templates is None or not (templates / "otp").is_dir():
        return []
    example = '{"to":"user@example.com","template":"otp","variables":{"code":"123456"}}'
    return [
        f"  a template:   curl -s -X POST {api}/api/v1/email/received \\",
        f"         -H 'Content-Type: application/json' -d '{example}'",
        f"  (templates in {templates}; list: {api}/api/v1/templates)",
        "",
    ]


def _banner(cfg: DevConfig, redis: RedisServer, templates: Path | None = None,
            overrides: Mapping[str, str] | None = None) -> str:  # fmt: skip
    api = f"http://{HOST}:{cfg.api_port}"
    mail_dir = cfg.data_dir / "mail"
    example = (
        '{"to":"user@example.com","subject":"Hello","body":"{username}님 안녕하세요!",'
        '"username":"홍길동"}'
    )
    return "\n".join([
        "",
        "emailq dev is running:",
        f"  API           {api}  (PORT={cfg.api_port})",
        f"  Swagger UI    {api}/docs",
        f"  Dashboard     {api}/dashboard",
        f"  Dev inbox     {api}/dev/inbox  (every captured mail: HTML, text, headers, Bcc)",
        f"  Contact form  {api}/dev/contact  (a plain HTML form; the mail shows up here)",
        f"  Redis         {redis.url}  (REDIS_PORT={cfg.redis_port}; data in {redis.data_dir})",
        f"  SMTP capture  {HOST}:{cfg.smtp_port}  (SMTP_PORT={cfg.smtp_port}; "
        f"printed here, saved in {mail_dir})",
        "  Webhooks      a dispatcher runs; register a receiver (localhost is allowed here):",
        f"                curl -s -X POST {api}/api/v1/admin/webhooks \\",
        "                  -H 'Content-Type: application/json' "
        "-d '{\"url\":\"http://127.0.0.1:9000/hook\",\"events\":[\"email.sent\"]}'",
        "",
        f"  try: curl -s -X POST {api}/api/v1/email/received \\",
        f"         -H 'Content-Type: application/json' -d '{example}'",
        "",
        *_template_hint(api, templates),
        *_sender_hint(overrides or {}),
        "  The CLI talks to this Redis. In another shell:",
        *(f"    export {name}={shlex.quote(value)}" for name, value in
          {**(overrides or {}), "REDIS_URL": redis.url}.items() if name in CLI_SHARED),
        "    .venv/bin/emailq stats        (or: make cli ARGS=stats)",
        "",
        "Press Ctrl-C to stop everything.",
        "",
    ])  # fmt: skip


def _sender_hint(overrides: Mapping[str, str]) -> list[str]:
    senders = overrides.get("ALLOWED_SENDERS")
    if senders is None:
        return []
    return [f"  from          the README's domains here (ALLOWED_SENDERS={senders}: "
            "MAIL_FROM's localhost is no domain a from can use)", ""]  # fmt: skip


def run(cfg: DevConfig) -> int:
    """Run until Ctrl-C or a child dies; returns the exit code (2: bad port or setting)."""
    overrides = _overrides(cfg)
    with exit_on_config_error():
        settings = _check_settings(overrides)
        templates = _with_templates(overrides, settings)
        _with_senders(overrides, settings)
        check_ports(cfg)
    console = _Console()
    signals = _Signals()
    signals.install()  # before any child starts: a Ctrl-C from now on stops what started
    _write_dev_forms(cfg.data_dir)
    # The runner has warned of misspelt setting names (load_settings): its children need not.
    env = {**os.environ, **overrides, "PYTHONUNBUFFERED": "1", NAMES_CHECKED_ENV: "1"}
    redis = RedisServer(cfg.data_dir / "redis", cfg.redis_port)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        redis.start()
        return _supervise(cfg, redis, env, children, console, signals, templates, overrides)
    finally:
        console.say("\nstopping: API, worker, webhook dispatcher, capture server, Redis ...")
        for name in ("API", "worker", "webhook dispatcher", "capture server"):
            if name in children:
                _stop(children[name], signals)
        redis.stop()


def _supervise(cfg: DevConfig, redis: RedisServer, env: dict[str, str],
               children: dict[str, subprocess.Popen[bytes]], console: _Console,
               signals: _Signals, templates: Path | None = None,
               overrides: Mapping[str, str] | None = None) -> int:  # fmt: skip
    py = sys.executable
    children["capture server"] = _spawn([py, "-m", "emailq.cli", "capture", "--port",
                                         str(cfg.smtp_port), "--out", str(cfg.data_dir / "mail")],
                                        env)  # fmt: skip
    # `python -m server`: uvicorn with its proxy headers off, as every launcher runs it.
    children["API"] = _spawn([py, "-m", "server", "--host", HOST, "--port",
                              str(cfg.api_port)], env)  # fmt: skip
    children["worker"] = _spawn([py, "-m", "worker"], env)
    # Without it, a webhook registered while trying things out would never be delivered.
    children["webhook dispatcher"] = _spawn([py, "-m", "worker.webhooks"], env)
    problem = _wait_listening(children, {"capture server": cfg.smtp_port, "API": cfg.api_port},
                              signals)  # fmt: skip
    if problem:
        console.say(f"emailq dev: {problem}")
        return 1
    if not signals.stopping:
        console.say(_banner(cfg, redis, templates, overrides))
    while not signals.stopping:
        for name, child in children.items():
            if child.poll() is not None:
                console.say(f"emailq dev: the {name} exited (code {child.returncode}); see above")
                return 1
        time.sleep(0.2)
    return 0
