"""Fixtures that start the real parts: Redis, SMTP, and the API and worker as processes.

Everything listens on 127.0.0.1 on a port the kernel picked (port 0, or for redis-server a
retry with a fresh port if another process took it first); everything started is stopped
at teardown. What the tests share besides fixtures lives in ``tests/helpers/``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from emailq.devtools.redis_server import RedisServer
from emailq.queue import Queue
from emailq.settings import Settings
from tests.helpers.polling import read_log, wait_for_log, wait_until
from tests.helpers.processes import FAST, Procs, settings_env
from tests.helpers.smtpd import Authenticator, RecordingHandler, SmtpServer, start_smtp

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
def store(redis_url: str) -> Iterator[redis.Redis]:
    """A direct view of Redis, to check what the API stored."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


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
        # port: only to restart a server on the port an earlier one had (outage tests).
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
    """Start aiosmtpd servers: ``smtp_factory(starttls=ctx, auth=Authenticator(...))``, on
    port 0, or on ``sock=`` a socket the test holds (``tests.helpers.ports.refused_port``)."""
    started: list[SmtpServer] = []

    def make(**kwargs: Any) -> SmtpServer:
        server = start_smtp(**kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def smtp(smtp_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A plain SMTP server that accepts everything."""
    return smtp_factory()


# Importable from here for tests written before tests/helpers/ existed; new tests import
# from tests.helpers.
__all__ = ["Authenticator", "Procs", "RecordingHandler", "read_log", "settings_env",
           "wait_for_log", "wait_until"]  # fmt: skip


# -- Settings ----------------------------------------------------------------------------


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


# -- Processes ---------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()
