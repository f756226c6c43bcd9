"""A webhook receiver for the tests: a small HTTP server on 127.0.0.1, port 0, that
verifies every request with the Standard Webhooks reference library (``standardwebhooks``)
and answers as the test scripts it (fail each delivery's first attempts, or 410)."""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    """One request the receiver got."""

    msg_id: str
    body: bytes
    headers: dict[str, str]
    answered: int


@dataclass
class Receiver:
    """What reached the receiver, and how it answers: ``answer(msg_id, nth)`` gives the
    status for the nth request (1-based) carrying that webhook-id."""

    secrets: Sequence[str]
    answer: Callable[[str, int], int]
    requests: list[Received] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        msg_id = headers.get("webhook-id", "")
        for secret in self.secrets:  # every current secret must sign it (rotation)
            try:
                Webhook(secret).verify(body, headers)
            except Exception as exc:  # any failure to verify is recorded, not raised
                with self.lock:
                    self.unverified.append(f"{msg_id}: {exc!r}")
        with self.lock:
            nth = 1 + sum(1 for r in self.requests if r.msg_id == msg_id)
            status = self.answer(msg_id, nth)
            self.requests.append(Received(msg_id, body, headers, status))
        return status

    def attempts(self) -> Counter[str]:
        """Requests per webhook-id."""
        with self.lock:
            return Counter(r.msg_id for r in self.requests)

    def accepted(self) -> dict[str, list[dict[str, Any]]]:
        """Payloads answered 2xx, per webhook-id (more than one: a duplicate)."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with self.lock:
            for r in self.requests:
                if 200 <= r.answered < 300:
                    found[r.msg_id].append(json.loads(r.body))
        return dict(found)

    def bodies(self) -> dict[str, set[bytes]]:
        """Every body sent under each webhook-id."""
        found: dict[str, set[bytes]] = defaultdict(set)
        with self.lock:
            for r in self.requests:
                found[r.msg_id].add(r.body)
        return dict(found)


def fail_first(n: int) -> Callable[[str, int], int]:
    """500 to the first ``n`` requests of each delivery, then 200."""
    return lambda _msg_id, nth: 500 if nth <= n else 200


@contextmanager
def receiving(secrets: Sequence[str], answer: Callable[[str, int], int]) -> Iterator[Receiver]:
    """A running receiver; stopped on exit."""
    receiver = Receiver(secrets, answer)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
