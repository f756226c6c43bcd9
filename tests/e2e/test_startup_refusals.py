"""The real API process, started as the README starts it (``uvicorn server.main:app``), refuses
to start with a setting that would quietly open the service: non-zero exit, and the line
naming the setting in its output (stderr)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from emailq.apikeys import hash_key
from emailq.settings import Settings
from tests.helpers.polling import wait_until
from tests.helpers.processes import settings_env

KEY = hash_key("eq_one-key")
STARTED = "Application startup complete"
REFUSED = [
    ("TRUSTED_PROXIES", "0.0.0.0/0", "TRUSTED_PROXIES: 0.0.0.0/0 is wider than /8"),
    ("TRUSTED_PROXIES", "::/0", "TRUSTED_PROXIES: ::/0 is wider than /24"),
    ("CORS_ORIGINS", "*", "CORS_ORIGINS: '*' would let every web page call the API"),
    ("MAIL_FROM", "App\u2028Bcc: x@evil.example <a@example.com>", "MAIL_FROM holds U+2028"),
    ("API_KEYS", f"app:send:{KEY} ops:admin:{KEY}", "API_KEYS: 'app' and 'ops' have the same"),
]


@pytest.mark.parametrize(("name", "value", "line"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_api_process_refuses_to_start(
    make_settings: Callable[..., Settings], tmp_path: Path, name: str, value: str, line: str
) -> None:
    env = settings_env(make_settings())
    env[name] = value
    args = [sys.executable, "-m", "uvicorn", "server.main:app",
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
    log = tmp_path / "api.log"
    # cwd: a folder without a .env file.
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=out, stderr=out)
    try:
        # Until it exits, or (the bug) serves: then it is stopped and the test fails.
        wait_until(lambda: proc.poll() is not None or STARTED in log.read_text(),
                   what="the API to exit or start", timeout=60)  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    output = log.read_text(errors="replace")
    assert STARTED not in output
    assert proc.returncode != 0, output
    assert line in output
