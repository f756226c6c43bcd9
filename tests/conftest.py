"""Fixtures that start the real parts: Redis, SMTP, and the API and worker as processes.

Everything binds 127.0.0.1 on a free port; everything started is stopped at teardown.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme

from emailq.queue import Queue
from emailq.redis_server import RedisServer, free_port
from emailq.settings import Settings
from tests.smtpd import Authenticator, RecordingHandler, SmtpServer, start_smtp

ROOT = Path(__file__).resolve().parent.parent


# -- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (append-only, fsync always)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), fsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    """A ``Queue`` on the session's Redis with default settings; closed after the test."""
    q = Queue.from_url(redis_url, timeout=2)
    yield q
    await q.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start extra Redis servers (for outage tests); all are stopped at teardown."""
    started: list[RedisServer] = []

    def make(
        port: int | None = None, data_dir: Path | None = None, *, maxmemory: int = 0
    ) -> RedisServer:
        server = RedisServer(data_dir or tmp_path / f"redis-{len(started)}", port,
                             fsync="always", maxmemory=maxmemory)  # fmt: skip
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# -- SMTP --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def smtp_factory() -> Iterator[Callable[..., SmtpServer]]:
    """Start aiosmtpd servers: ``smtp_factory(starttls=ctx, auth=Authenticator(...))``."""
    started: list[SmtpServer] = []

    def make(**kwargs: Any) -> SmtpServer:
        server = start_smtp(kwargs.pop("port", None) or free_port(), **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def smtp(smtp_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A plain SMTP server that accepts everything."""
    return smtp_factory()


__all__ = ["Authenticator", "RecordingHandler"]


# -- Settings ----------------------------------------------------------------------------

FAST = {
    "retry_backoff_seconds": 0.05,
    "retry_backoff_max_seconds": 0.2,
    "smtp_security": "none",
    "mail_from": "emailq <noreply@example.com>",
    "smtp_timeout_seconds": 5.0,
    # Bulk tests send hundreds a minute from one address; tests/server/test_ratelimit.py
    # sets the limits it tests.
    "rate_limit_per_key": "",
}


@pytest.fixture
def make_settings(redis_url: str, smtp: SmtpServer) -> Callable[..., Settings]:
    """``Settings`` for the test Redis and SMTP server, fast retries, no .env file."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url, "smtp_host": "127.0.0.1", "smtp_port": smtp.port, **FAST,
        }  # fmt: skip
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


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


# -- Processes ---------------------------------------------------------------------------


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

    def api(self, settings: Settings) -> str:
        """``uvicorn server.main:app`` on a free port; returns its base URL once healthy."""
        port = free_port()
        args = [sys.executable, "-m", "uvicorn", "server.main:app",
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        proc = self._spawn(args, settings, "api")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(base), what="API /health", proc=proc)
        return base

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def read_log(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for_log(proc: subprocess.Popen[bytes], text: str, timeout: float = 20) -> None:
    wait_until(lambda: text in read_log(proc), what=f"log line {text!r}", proc=proc,
               timeout=timeout)  # fmt: skip


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = 20,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``check`` until true. The timeout only bounds a failing test; nothing is
    asserted about how long it took."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) waiting for {what}:\n"
                                 + read_log(proc)[-3000:])  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()
