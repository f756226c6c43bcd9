"""TRUSTED_PROXIES alone decides the client address, with the API as a real process.

The API runs as documented (``python -m server``, which the Dockerfile, compose and
``emailq dev`` use too); requests come from loopback, where uvicorn's own proxy handling
used to believe ``X-Forwarded-For`` and let a client pick a fresh address per request.
Other loopback addresses (127.0.0.2 ...) stand in for other peers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from emailq.apikeys import hash_key
from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import peer
from tests.helpers.polling import read_log, wait_until
from tests.helpers.processes import Procs
from tests.helpers.smtpd import Received, SmtpServer

SEND = "/api/v1/email/received"
FORM = "/api/v1/forms/contact"
KEYS = Keys()
KEY = "eq_client-address-test-key"  # a test key, not a credential
API_KEYS = f"app:send:{hash_key(KEY)}"
WRONG = {"Authorization": "Bearer guess"}
MAIL = {"to": "user@example.com", "subject": "Hi", "body": "Hello"}
FORMS = """
[[forms]]
id = "contact"
to = ["owner@site.example"]
subject = "Contact from {name}"
allowed_origins = []
redirect = "https://site.example/thanks"
"""


def auth_failure_keys(store: redis.Redis) -> list[str]:
    return sorted(str(k) for k in store.scan_iter(KEYS.auth_failures("*")))


def guesses(client: httpx.Client, spoofed: list[str]) -> list[int]:
    """A wrong key per request, each with its own X-Forwarded-For."""
    return [client.post(SEND, json=MAIL, headers={**WRONG, "X-Forwarded-For": hop}).status_code
            for hop in spoofed]  # fmt: skip


SPOOFED = [f"198.51.100.{i}" for i in range(1, 7)]


def test_a_rotating_forwarded_for_does_not_escape_the_auth_failure_limit(
    procs: Procs, make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    base = procs.api(make_settings(api_keys=API_KEYS, auth_failure_limit=3))
    with peer(base) as attacker:
        # The last names the peer's own address: not taken for a rewrite by the server
        # (python -m server makes none), which would count it in the shared 'unknown'.
        assert guesses(attacker, [*SPOOFED, "127.0.0.1"]) == [401, 401, 401, 429, 429, 429, 429]
        # Nothing the header said became a key: one counter, the socket's.
        assert auth_failure_keys(store) == [KEYS.auth_failures("127.0.0.1")]
        # A valid key is never throttled.
        assert attacker.post(SEND, json=MAIL, headers={"Authorization": f"Bearer {KEY}"}
                             ).status_code == 202  # fmt: skip
    with peer(base, "127.0.0.2") as neighbour:  # another peer: its own budget
        assert guesses(neighbour, SPOOFED[:1]) == [401]
    assert "198.51.100" not in read_log(procs.started[0])


def _form_settings(
    make_settings: Callable[..., Settings], tmp_path: Path, **extra: Any
) -> Settings:
    path = tmp_path / "forms.toml"
    path.write_text(FORMS)
    return make_settings(forms_file=path, rate_limit_per_form_address="2/minute", **extra)


def plain_text(received: Received) -> str:
    part = received.message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def submissions(client: httpx.Client, spoofed: list[str]) -> list[int]:
    """One distinct contact-form submission per spoofed address."""
    return [client.post(FORM, json={"name": "Ada", "message": f"note {hop}"},
                        headers={"X-Forwarded-For": hop}).status_code
            for hop in spoofed]  # fmt: skip


def test_a_rotating_forwarded_for_does_not_escape_the_form_limit(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer, tmp_path: Path
) -> None:
    settings = _form_settings(make_settings, tmp_path)
    base = procs.api(settings)
    procs.worker(settings)
    with peer(base) as visitor:
        assert submissions(visitor, [*SPOOFED, "127.0.0.1"]) == [202, 202] + [429] * 5
    with peer(base, "127.0.0.3") as other:
        assert submissions(other, ["203.0.113.1"]) == [202]
    wait_until(lambda: len(smtp.handler.received) >= 3, what="three form mails")
    # Exactly the three accepted submissions arrived, each once.
    bodies = [plain_text(r) for r in smtp.handler.received]
    assert len(bodies) == 3
    assert sum("note 198.51.100." in b for b in bodies) == 2
    assert sum("note 203.0.113.1" in b for b in bodies) == 1


def test_behind_a_trusted_proxy_the_header_names_the_client(
    procs: Procs, make_settings: Callable[..., Settings], store: redis.Redis, tmp_path: Path
) -> None:
    settings = _form_settings(make_settings, tmp_path, api_keys=API_KEYS, auth_failure_limit=1,
                              trusted_proxies="127.0.0.1")  # fmt: skip
    base = procs.api(settings)
    with peer(base) as proxy:
        hops = ["198.51.100.1", "203.0.113.7:51234", "[2001:db8::1]:443", "2001:db8::2",
                "not-an-address"]  # fmt: skip
        assert guesses(proxy, hops) == [401, 401, 401, 429, 401]  # ::1 and ::2 share a /64
        assert auth_failure_keys(store) == sorted(
            KEYS.auth_failures(a)
            for a in ("198.51.100.1", "203.0.113.7", "2001:db8::/64", "unknown")
        )  # the proxy itself (127.0.0.1) was never blamed
        # Each visitor has its own form budget.
        assert submissions(proxy, SPOOFED) == [202] * len(SPOOFED)
    # From a peer that is not in TRUSTED_PROXIES the header is still ignored.
    with peer(base, "127.0.0.2") as direct:
        assert submissions(direct, SPOOFED) == [202, 202, 429, 429, 429, 429]


def test_bare_uvicorn_with_its_proxy_headers_on_cannot_be_spoofed_either(
    procs: Procs, make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    """For those who run ``uvicorn server.main:app`` without ``--no-proxy-headers``: uvicorn
    rewrites the peer from the header before the app sees it, so the app counts every such
    request as ``unknown``, one budget for all of them, and says so in the log."""
    settings = make_settings(api_keys=API_KEYS, auth_failure_limit=3)
    base = procs.api(settings, module=("uvicorn", "server.main:app"))
    with peer(base) as attacker:
        assert guesses(attacker, SPOOFED) == [401, 401, 401, 429, 429, 429]
    assert auth_failure_keys(store) == [KEYS.auth_failures("unknown")]
    assert "--no-proxy-headers" in read_log(procs.started[0])
