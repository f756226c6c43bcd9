"""The API and workers as real OS processes, started as the README runs them.

Every process logs to a file in the test's tmp dir (``read_log``); ``Procs.stop_all`` kills
what is left at teardown. The API listens on port 0 and the port it got is read back from
uvicorn's own "running on" line, so no port is chosen first and bound later.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from emailq.settings import Settings
from tests.helpers.polling import read_log, wait_for_log, wait_until

_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "REDIS_"))}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = str(value.value if hasattr(value, "value") else value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Procs:
    """Starts the API and workers as real OS processes; kills leftovers at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], settings: Settings, name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}-{len(self.started)}.log").open("wb")
        proc = subprocess.Popen(args, env=settings_env(settings), cwd=self.tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def worker(self, settings: Settings) -> subprocess.Popen[bytes]:
        """``python -m worker``, as the README runs it."""
        proc = self._spawn([sys.executable, "-m", "worker"], settings, "worker")
        wait_for_log(proc, "started")
        return proc

    def dispatcher(self, settings: Settings, *, ready: bool = True) -> subprocess.Popen[bytes]:
        """``python -m worker.webhooks``, the webhook dispatcher, as the README runs it;
        with ``ready``, once it says it has started."""
        proc = self._spawn([sys.executable, "-m", "worker.webhooks"], settings, "webhooks")
        if ready:
            wait_for_log(proc, "webhook dispatcher started")
        return proc

    def api(self, settings: Settings, module: tuple[str, ...] = ("server",)) -> str:
        """``python -m server``, as the README runs it, on port 0; returns its base URL once
        healthy. ``module=("uvicorn", "server.main:app")`` runs bare uvicorn instead."""
        args = [sys.executable, "-m", *module, "--host", "127.0.0.1", "--port", "0"]
        proc = self._spawn(args, settings, "api")
        wait_until(lambda: _LISTENING.search(read_log(proc)) is not None,
                   what="uvicorn's 'running on' line", proc=proc)  # fmt: skip
        found = _LISTENING.search(read_log(proc))
        assert found is not None
        base = f"http://127.0.0.1:{found[1]}"
        wait_until(lambda: healthy(base), what="API /health", proc=proc)
        return base

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def healthy(base: str) -> bool:
    """Does the API at ``base`` answer /health?"""
    try:
        return httpx.get(f"{base}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """kill -9, and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# REDIS_TIMEOUT_SECONDS (and a test client's timeout) for tests that assert nothing about
# it: under a loaded `make test` (two cores shared by pytest, the API, the worker and Redis)
# one call can take longer than the default 0.5 s, and the 503 or timeout that follows
# says nothing about what such a test checks. Tests of the bound itself set their own.
PATIENT_REDIS_SECONDS = 5.0

# Settings every test starts from: fast retries, a plain local relay, no rate limits, and a
# patient Redis client (PATIENT_REDIS_SECONDS): CI's loaded runs failed in-process API tests
# with a 503 from one slow reply of the shared, fsync-always Redis (test_local_only: 202, 202,
# 503; the attack corpus's stats poll read an error body).
FAST = {
    "redis_timeout_seconds": PATIENT_REDIS_SECONDS,
    "retry_backoff_seconds": 0.05,
    "retry_backoff_max_seconds": 0.2,
    "smtp_security": "none",
    "mail_from": "emailq <noreply@example.com>",
    "smtp_timeout_seconds": 5.0,
}
