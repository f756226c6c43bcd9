"""No SSRF: webhook targets are judged after DNS, every address of a name, before any
connection, and the connection goes to the address judged (no second resolution). Only
loopback is ever connected to here; other addresses come from a resolver the test gives,
and the inner network backend records (and refuses) what it is asked to connect to."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import pytest

from emailq.webhooks.targets import TargetRefused, check_url, refusal
from worker.webhooks.dispatcher import without_query
from worker.webhooks.http import DeliveryClient, GuardedBackend, retry_after


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records each connect and refuses it: nothing leaves the machine."""

    def __init__(self) -> None:
        self.connects: list[str] = []

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None, socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:  # fmt: skip
        self.connects.append(host)
        raise httpcore.ConnectError("refused by the test")

    async def sleep(self, seconds: float) -> None:
        pass


def resolving(*addresses: str, calls: list[str] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return list(addresses)

    return resolve


@pytest.mark.parametrize(
    "addresses",
    [("127.0.0.1",), ("169.254.169.254",), ("10.0.0.1",), ("192.168.1.5",), ("::1",),
     ("::ffff:127.0.0.1",), ("fe80::1",), ("224.0.0.1",), ("0.0.0.0",), ("100.64.0.1",),
     ("2002:7f00:1::",), ("64:ff9b::a00:1",), ("fc00::1",),
     # IPv4-compatible, SIIT-translated, local-use NAT64, site-local, IETF-reserved (helper-47)
     ("::127.0.0.1",), ("::a9fe:a9fe",), ("::ffff:0:127.0.0.1",), ("64:ff9b:1::a9fe:a9fe",),
     ("fec0::1",),
     ("93.184.216.34", "10.0.0.1")],  # one bad address among good ones is enough
)  # fmt: skip
async def test_a_name_resolving_to_a_refused_address_is_refused_before_connecting(
    addresses: tuple[str, ...],
) -> None:
    inner = RecordingBackend()
    client = DeliveryClient(timeout=2, concurrency=1, backend=GuardedBackend(
        allow_private=False, resolver=resolving(*addresses), inner=inner))  # fmt: skip
    with pytest.raises(TargetRefused, match=r"hooks\.example\.com resolves to"):
        await client.post("https://hooks.example.com/in", {}, b"{}")
    assert inner.connects == []
    await client.aclose()


async def test_the_connection_goes_to_the_address_checked_not_a_second_lookup() -> None:
    # DNS rebinding: a name that answers a public address to the check and a private one
    # later. The backend resolves once and connects to that address by number.
    calls: list[str] = []
    inner = RecordingBackend()
    backend = GuardedBackend(allow_private=False, inner=inner,
                             resolver=resolving("93.184.216.34", calls=calls))  # fmt: skip
    client = DeliveryClient(timeout=2, concurrency=1, backend=backend)
    answer = await client.post("https://rebind.example/in", {}, b"{}")
    assert answer.status is None
    assert "refused by the test" in (answer.error or "")
    assert calls == ["rebind.example"]
    assert inner.connects == ["93.184.216.34"]
    await client.aclose()


async def test_localhost_is_refused_by_the_real_resolver_and_never_connected() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client = DeliveryClient(timeout=2, concurrency=1,
                            backend=GuardedBackend(allow_private=False))  # fmt: skip
    try:
        with pytest.raises(TargetRefused, match="loopback"):
            await client.post(f"http://localhost:{port}/in", {}, b"{}")
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()
    finally:
        listener.close()
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "why"),
    [("http://10.0.0.1/h", "private"), ("http://169.254.169.254/latest/meta-data", "link-local"),
     ("http://127.0.0.1:8000/h", "loopback"), ("http://[::ffff:10.0.0.1]/h", "private"),
     ("http://localhost/h", "loopback name"), ("http://a.localhost/h", "loopback name"),
     ("ftp://example.com/h", "https://"), ("https://user:pw@example.com/h", "user name"),
     ("https://example.com/a b", "space"), ("https://example.com:0/", "port"),
     ("https://example.com:99999/", "valid URL"), ("https:///h", "no host")],
)  # fmt: skip
def test_registration_refuses_urls_that_cannot_be_webhooks(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        check_url(url, allow_private=False)


def test_allow_private_opens_private_and_loopback_but_never_link_local() -> None:
    assert check_url("http://127.0.0.1:9/h", allow_private=True)
    assert check_url("http://10.1.2.3/h", allow_private=True)
    assert check_url("https://hooks.example.com/h", allow_private=False)
    with pytest.raises(TargetRefused, match="link-local"):
        check_url("http://169.254.169.254/", allow_private=True)
    assert refusal(ipaddress.ip_address("8.8.8.8"), allow_private=False) is None


@pytest.mark.parametrize(
    ("address", "why"),
    [("::a9fe:a9fe", "link-local"), ("::ffff:0:a9fe:a9fe", "link-local"),
     ("::7f00:1", "loopback"), ("::ffff:0:a00:1", "private"), ("64:ff9b:1::a00:1", "NAT64"),
     ("fec0::1", "private"), ("192.0.0.8", "reserved"), ("::1", "loopback"),
     ("::", "unspecified"), ("::808:808", None), ("2606:4700::1111", None)],
)  # fmt: skip
def test_an_address_is_judged_by_the_ipv4_address_it_carries(address: str, why: str | None) -> None:
    found = refusal(ipaddress.ip_address(address), allow_private=False)
    assert found is None if why is None else why in (found or "")


@pytest.mark.parametrize(
    "address",
    # The metadata service through every form that carries it, the local NAT64 prefix at
    # two of RFC 6052's offsets, and addresses of no one's web server (helper-48).
    ["::a9fe:a9fe", "::ffff:0:a9fe:a9fe", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
     "64:ff9b:1::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00::", "192.0.0.8", "192.0.0.170"],
)  # fmt: skip
def test_allow_private_never_opens_what_no_setting_may(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_private=True) is not None


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after("120") == 120
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after("soon") is None
    assert retry_after(None) is None


@pytest.mark.parametrize(
    ("url", "kept"),
    [("https://hooks.example.com/in?token=s3cret#x", "https://hooks.example.com/in"),
     ("http://127.0.0.1:8080/a/b", "http://127.0.0.1:8080/a/b")],
)  # fmt: skip
def test_an_attempt_keeps_the_url_without_a_token_its_query_may_hold(url: str, kept: str) -> None:
    assert without_query(url) == kept
