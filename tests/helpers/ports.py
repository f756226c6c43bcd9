"""Ports with nothing listening, held so that nobody else can take them meanwhile."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def refused_port() -> Iterator[socket.socket]:
    """A socket bound to 127.0.0.1 on a port the kernel picked, not listening: connections
    to it are refused (as to a server that is down), and no other process can bind it while
    the test holds it. Hand it to ``start_smtp(sock=...)`` to bring the server "back up" on
    that very port, with no window in between; its port is ``sock.getsockname()[1]``."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


def port_of(sock: socket.socket) -> int:
    """The port ``sock`` is bound to."""
    port: int = sock.getsockname()[1]
    return port


@contextmanager
def refused_redis_url() -> Iterator[str]:
    """A Redis URL on which connections are refused (a Redis that is down), held meanwhile."""
    with refused_port() as sock:
        yield f"redis://127.0.0.1:{port_of(sock)}/0"


def reclaim_port(port: int) -> socket.socket:
    """A socket bound again to ``port``, which a server of the test just gave up (to bring
    it back "on the same port" through ``start_smtp(sock=...)``). SO_REUSEADDR, as servers
    set it: the old server's closed connections may still be in TIME_WAIT there."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock
