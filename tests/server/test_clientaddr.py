"""The client address parser (server/clientaddr.py), unit by unit.

The real-process side (the API as `python -m server`, spoofed headers from loopback peers)
is tests/e2e/test_client_address.py. Tried as an attacker: hops with ports, bracketed and
bare IPv6, zone ids, IPv4-mapped addresses, free text, overlong text, ports out of range,
and a peer that the ASGI server had already replaced with a hop of the header.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from emailq.netlists import parse_networks
from emailq.queue import Keys
from emailq.settings import Settings
from server.clientaddr import (
    UNKNOWN,
    client_address,
    forwarded_client,
    limit_key,
    parse_address,
    rewritten_by_server,
)
from server.deps import attach_state
from server.main import create_app
from server.state import AppState
from tests.helpers.api import assert_error, local_client, mail

PROXIES = parse_networks("10.0.0.0/8, 127.0.0.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),  # one canonical form per address
        ("::ffff:198.51.100.4", "198.51.100.4"),
        ("[::ffff:198.51.100.4]:80", "198.51.100.4"),
        ("fe80::1%eth0", "fe80::1"),  # the zone is free text: dropped
        ("fe80::1%eth0\r\nX-Injected: 1", "fe80::1"),  # whatever the zone says, it is gone
        ("203.0.113.7:65536", None),
        ("203.0.113.7:", None),
        ("203.0.113.7:abc", None),
        ("[2001:db8::1]:", None),
        ("[2001:db8::1]x", None),
        ("2001:db8::1:443", "2001:db8::1:443"),  # a valid bare IPv6, not a port
        ("unknown", None),
        ("_hidden", None),  # RFC 7239 obfuscated identifiers
        ("evil.example", None),
        ("1" * 500, None),
        ("", None),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == expected


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("10.0.0.1", ["203.0.113.7:51234"], "203.0.113.7"),
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.0.0.1", ["198.51.100.1, 10.0.0.2:8080"], "198.51.100.1"),  # our proxy, with port
        ("10.0.0.1", ["garbage"], UNKNOWN),  # never the proxy itself
        ("10.0.0.1", ["198.51.100.1, garbage, 10.0.0.2"], UNKNOWN),
        ("10.0.0.1", ["x" * 5000], UNKNOWN),
        ("10.0.0.1", [" , ,"], "10.0.0.1"),  # empty hops: nothing was forwarded
        ("203.0.113.9", ["garbage"], "203.0.113.9"),  # untrusted peer: header ignored
        ("testclient", [], UNKNOWN),  # a peer that is no address is no key either
        ("[::1]:1234", [], "::1"),
    ],
)
def test_forwarded_client_with_ports_and_garbage(
    peer: str, header: list[str], expected: str
) -> None:
    assert forwarded_client(peer, header, PROXIES) == expected


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        (UNKNOWN, UNKNOWN),
    ],
)
def test_ipv6_clients_are_limited_per_64(address: str, key: str) -> None:
    assert limit_key(address) == key


def test_a_peer_rewritten_from_the_header_is_recognised() -> None:
    assert rewritten_by_server("198.51.100.7", ["198.51.100.7"])
    assert rewritten_by_server("198.51.100.7", ["1.2.3.4, 198.51.100.7:5555"])
    assert not rewritten_by_server("127.0.0.1", ["198.51.100.7"])
    assert not rewritten_by_server("127.0.0.1", [])


def _echo_app(settings: Settings, *, peer_is_socket: bool = False) -> FastAPI:
    app = FastAPI()
    attach_state(app, AppState(settings, peer_is_socket=peer_is_socket))

    @app.get("/who")
    async def who(request: Request) -> dict[str, str]:
        return {"client": client_address(request)}

    return app


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        # uvicorn with proxy headers on replaced a loopback peer by the header's hop: the
        # real peer is lost, so the client is unknown, never the attacker's chosen text.
        ("198.51.100.7", "198.51.100.7", "", UNKNOWN),
        ("198.51.100.7", "10.9.9.9, 198.51.100.7", "10.0.0.0/8", UNKNOWN),
        # A trusted peer is read through, as ever.
        ("10.0.0.2", "198.51.100.7", "10.0.0.0/8", "198.51.100.7"),
        # A direct client that sends some other address: ignored.
        ("203.0.113.9", "198.51.100.7", "", "203.0.113.9"),
    ],
)
def test_client_address_never_takes_a_rewritten_peer(
    make_settings: Callable[..., Settings], peer: str, header: str, trusted: str, expected: str
) -> None:
    app = _echo_app(make_settings(trusted_proxies=trusted))
    with TestClient(app, client=(peer, 1)) as client:
        answer = client.get("/who", headers={"X-Forwarded-For": header})
    assert answer.json() == {"client": expected}


@pytest.mark.parametrize(
    ("header", "trusted"), [("198.51.100.7", ""), ("10.9.9.9, 198.51.100.7", "10.0.0.0/8")]
)
def test_under_python_m_server_a_peer_named_in_the_header_is_still_itself(
    make_settings: Callable[..., Settings], header: str, trusted: str
) -> None:
    # python -m server runs uvicorn without proxy headers: the peer is the socket's, and a
    # client that repeats its own address keeps its own budget (the cases above: unknown).
    app = _echo_app(make_settings(trusted_proxies=trusted), peer_is_socket=True)
    with TestClient(app, client=("198.51.100.7", 1)) as client:
        answer = client.get("/who", headers={"X-Forwarded-For": header})
    assert answer.json() == {"client": "198.51.100.7"}


def test_ipv6_neighbours_share_one_auth_failure_budget(
    make_settings: Callable[..., Settings], store: redis.Redis
) -> None:
    keys = "ops:admin:" + "0" * 64
    app = create_app(make_settings(api_keys=keys, auth_failure_limit=2))
    wrong = {"Authorization": "Bearer guess"}
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::c"):
        with TestClient(app, client=(host, 1)) as client:
            last = client.post("/api/v1/email/received", json=mail(), headers=wrong)
    assert_error(last, 429, "too_many_requests")
    assert store.exists(Keys().auth_failures("2001:db8:1:2::/64"))
    with TestClient(app, client=("2001:db8:1:3::a", 1)) as other_64:
        response = other_64.post("/api/v1/email/received", json=mail(), headers=wrong)
        assert_error(response, 401, "unauthorized")


def test_ipv6_neighbours_share_one_send_budget(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(rate_limit_per_key="2/minute", allow_open_relay=True)
    app = create_app(settings)
    answers = []
    for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2::c"):
        with local_client(app, client=(host, 1)) as client:
            answers.append(client.post("/api/v1/email/received", json=mail()))
    assert [a.status_code for a in answers] == [202, 202, 429]
