"""A real Redis Cluster on free ports: 3 masters and 3 replicas from the redis-server on PATH.

Each node gets two ports, its client port and its cluster bus port (``cluster-port``,
Redis 7.0: the default bus port, client port + 10000, may be past 65535 for a port the
kernel picked). The nodes are joined by ``redis-cli --cluster create``, as an operator
would, and the cluster is ready when every node says ``cluster_state:ok`` and agrees on
who owns each slot. A short ``cluster-node-timeout`` makes a failover take seconds.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis

from emailq.devtools.redis_server import find_redis_server
from tests.helpers.polling import wait_until

NODE_TIMEOUT_MS = 1000
BIND_ATTEMPTS = 5
START_TIMEOUT = 30.0


@dataclass
class Node:
    """One redis-server in cluster mode."""

    port: int
    bus_port: int
    data_dir: Path
    auth: tuple[str, str] | None = None  # an ACL user and its password
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        username, password = self.auth or (None, None)
        return redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=0.5,
                           username=username, password=password,
                           decode_responses=True)  # fmt: skip

    def shard_subscribers(self, channel: str) -> int:
        """How many clients of this node subscribe to ``channel`` (sharded pub/sub)."""
        with self.client() as client:
            [(_, count)] = client.pubsub_shardnumsub(channel)
        return int(count)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cluster_info(self) -> dict[str, str]:
        """CLUSTER INFO as a dict; {} if the node does not answer."""
        with self.client() as client:
            try:
                info: dict[str, str] = client.cluster("info")
            except redis.RedisError:
                return {}
        return info


@dataclass
class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, in ``tmp``; ``stop`` ends all."""

    tmp: Path
    masters: int = 3
    replicas: int = 1
    # With an ACL user: the only one (the default user is off), as a managed cluster has.
    auth: tuple[str, str] | None = None
    nodes: list[Node] = field(default_factory=list)

    def url(self) -> str:
        """``redis+cluster://`` with the ACL user, if any, and every node as a startup node."""
        hosts = ",".join(node.address for node in self.nodes)
        credentials = f"{self.auth[0]}:{self.auth[1]}@" if self.auth else ""
        return f"redis+cluster://{credentials}{hosts}/"

    def start(self) -> None:
        """Start the nodes, join them, and wait until the cluster serves every slot."""
        ports = _free_ports(2 * self.masters * (1 + self.replicas))
        for index in range(self.masters * (1 + self.replicas)):
            node = Node(ports[2 * index], ports[2 * index + 1], self.tmp / f"node-{index}",
                        self.auth)  # fmt: skip
            self.nodes.append(node)
            self._spawn(node)
        for node in self.nodes:
            self._until_up(node)
        create = [_redis_cli(), "--cluster", "create", *(n.address for n in self.nodes),
                  "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
        if self.auth:
            create += ["--user", self.auth[0], "--pass", self.auth[1]]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_until(self.healthy, what="cluster_state:ok on every node", timeout=START_TIMEOUT)
        # Until then a replica holds nothing, and promoting it would lose the data.
        wait_until(self.replicas_synced, what="every replica in sync", timeout=START_TIMEOUT)

    def _until_up(self, node: Node) -> None:
        """Until ``node`` answers; on fresh ports if another process took one meanwhile."""
        for _ in range(BIND_ATTEMPTS):
            wait_until(lambda: _pings(node) or not node.alive(), what=f"node {node.port}",
                       timeout=START_TIMEOUT)  # fmt: skip
            if node.alive():
                return
            node.port, node.bus_port = _free_ports(2)
            self._spawn(node)
        raise AssertionError(f"no free ports for a node in {BIND_ATTEMPTS} tries")

    def _spawn(self, node: Node) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(), "--port", str(node.port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-port", str(node.bus_port),
            "--cluster-config-file", str(node.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # A new replica's first sync starts at once, not after 7.0's 5 s wait for more.
            "--repl-diskless-sync-delay", "0",
            "--dir", str(node.data_dir), "--save", "", "--appendonly", "no",
            "--logfile", str(node.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.auth:
            user, password = self.auth
            # One argument per word: redis-server quotes an argument that has a space.
            args += ["--user", "default", "off", "--user", user, "on", f">{password}", "~*",
                     "&*", "+@all", "--masteruser", user, "--masterauth", password]  # fmt: skip
        node.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.alive()]

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, with all 16384 slots served."""
        infos = [node.cluster_info() for node in self.live()]
        return all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                   for i in infos)  # fmt: skip

    def master_nodes(self) -> list[Node]:
        """The live nodes that are masters now."""
        found = []
        for node in self.live():
            with node.client() as client:
                if client.info("replication").get("role") == "master":
                    found.append(node)
        return found

    def replicas_synced(self) -> bool:
        """Every replica has a live link to its master and has loaded its first sync."""
        links = 0
        for node in self.live():
            with node.client() as client:
                info = client.info("replication")
            if info.get("role") == "slave":
                if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                    return False
                links += 1
        return links == self.masters * self.replicas

    def master_of(self, key: str) -> Node:
        """The live node that a live node says serves ``key``'s slot."""
        with self.live()[0].client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
        return next(node for node in self.nodes if node.port == port)

    def prefix_on(self, node: Node) -> str:
        """A REDIS_KEY_PREFIX whose hash tag lands on ``node``'s slots: tenant0, tenant1, ..."""
        for n in range(1000):
            prefix = f"tenant{n}"
            if self.master_of("{" + prefix + "}").port == node.port:
                return prefix
        raise AssertionError(f"no prefix of the first 1000 lands on {node.address}")

    def kill(self, node: Node) -> None:
        """``kill -9``."""
        assert node.process is not None
        node.process.kill()
        node.process.wait()

    def restart(self, node: Node) -> None:
        """Start a killed node again on its ports: its nodes.conf brings it back into the
        cluster, as a replica of whoever took its slots."""
        self._spawn(node)
        wait_until(node.alive, what=f"{node.address} back", timeout=START_TIMEOUT)

    def promoted(self, old: Node, key: str) -> bool:
        """Has a replica taken over ``key``'s slot from ``old``, and is the cluster ok?"""
        try:
            return self.healthy() and self.master_of(key).port != old.port
        except (redis.RedisError, StopIteration, UnboundLocalError):
            return False

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.kill()
                node.process.wait()


def cluster_skip_reason() -> str:
    """Why a cluster cannot be started here ("" if it can): redis-cli, Redis 7.0."""
    if shutil.which("redis-cli") is None:
        return "redis-cli is not on PATH (apt install redis-server brings it)"
    try:
        server = find_redis_server()
    except RuntimeError as exc:
        return str(exc)
    version = subprocess.run([server, "--version"], capture_output=True, text=True,
                             check=False).stdout  # fmt: skip
    found = re.search(r"v=(\d+)\.", version)
    if found is None or int(found[1]) < 7:
        return f"a Redis Cluster test needs redis-server 7.0 or later (cluster-port): {version}"
    return ""


def _pings(node: Node) -> bool:
    with node.client() as client:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    assert found, "redis-cli is not on PATH (it comes with redis-server: apt install redis)"
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now, held together while choosing them (racy
    after: another process may take one before redis-server binds it)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports
