"""``emailq dev``: the whole service on one machine, with nothing else installed.

Starts a real Redis server, the SMTP capture server, the API and one worker as child
processes, prints where they are, and stops them in order on Ctrl-C. This module is a
composition root: it imports nothing from server/ or worker/, it runs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from emailq.redis_server import RedisServer, free_port


@dataclass(frozen=True)
class DevConfig:
    """Where the dev runner puts things."""

    data_dir: Path = Path(".emailq-dev")
    api_port: int = 8000
    smtp_port: int = 1025
    redis_port: int = 6379


def _port_or_free(port: int) -> int:
    """``port`` if nothing listens there, else a free one (never clobber a running server)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


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


def _child_env(redis_url: str, smtp_port: int, forms_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FORMS_FILE=str(forms_file.resolve()),
        DEV_PAGES="true",
        REDIS_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        SMTP_SECURITY="none",
        SMTP_USER="",
        SMTP_PASS="",
        PYTHONUNBUFFERED="1",
    )
    return env


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C reaches only this runner, which then stops children in order.
    return subprocess.Popen(args, env=env, start_new_session=True)  # noqa: S603  # fixed argv


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _banner(cfg: DevConfig, redis: RedisServer, smtp_port: int) -> str:
    api = f"http://localhost:{cfg.api_port}"
    mail_dir = cfg.data_dir / "mail"
    example = (
        '{"to":"user@example.com","subject":"Hello","body":"{username}님 안녕하세요!",'
        '"username":"홍길동"}'
    )
    return "\n".join([
        "",
        "emailq dev is running:",
        f"  API           {api}",
        f"  Swagger UI    {api}/docs",
        f"  Contact form  {api}/dev/contact  (a plain HTML form; the mail shows up here)",
        f"  Redis         {redis.url}  (data in {redis.data_dir})",
        f"  SMTP capture  127.0.0.1:{smtp_port}  (printed here, saved in {mail_dir})",
        "",
        f"  try: curl -s -X POST {api}/api/v1/email/received \\",
        f"         -H 'Content-Type: application/json' -d '{example}'",
        "",
        "Press Ctrl-C to stop everything.",
        "",
    ])  # fmt: skip


def run(cfg: DevConfig) -> int:
    """Run until Ctrl-C or a child dies; returns the exit code."""
    redis = RedisServer(cfg.data_dir / "redis", _port_or_free(cfg.redis_port))
    redis.start()
    smtp_port = _port_or_free(cfg.smtp_port)
    env = _child_env(redis.url, smtp_port, _write_dev_forms(cfg.data_dir))
    py = sys.executable
    children = [
        _spawn([py, "-m", "emailq.cli", "capture", "--port", str(smtp_port),
                "--out", str(cfg.data_dir / "mail")], env),
        _spawn([py, "-m", "server", "--host", "127.0.0.1", "--port", str(cfg.api_port)], env),
        _spawn([py, "-m", "worker"], env),
    ]  # fmt: skip
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(_banner(cfg, redis, smtp_port), flush=True)  # noqa: T201  # the console is dev mode's output
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        print("\nstopping: API, worker, capture server, Redis ...", flush=True)  # noqa: T201  # the console is dev mode's output
        for child in (children[1], children[2], children[0]):
            _stop(child)
        redis.stop()
    return 0 if stopping else 1
