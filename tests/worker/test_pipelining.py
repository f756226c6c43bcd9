"""Sending to a relay that offers PIPELINING (RFC 2920): MAIL, RCPT and DATA go out in one
write, and every reply still means what it meant one command at a time. A real aiosmtpd
server that advertises PIPELINING, scripted per command."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from emailq.errors import LeaseLost, RelayThrottled, RelayUnavailable, SenderRefused, SendError
from emailq.message import render
from emailq.models import Job
from emailq.settings import Settings
from tests.helpers.smtpd import RecordingHandler, SmtpServer, start_smtp, take_mail
from worker.sender import Delivery, Sender, SmtpPool, _framed, smtp_path

SENDER = "noreply@example.com"


@dataclass
class PipeliningHandler(RecordingHandler):
    """``mail_replies`` answer the next MAILs, ``rcpt_replies`` the named recipients;
    everything else is taken. ``waiting`` keeps, for each MAIL, the
    commands that had already arrived behind it."""

    mail_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    waiting: list[bytes] = field(default_factory=list)
    rcpt_delay: float = 0.0  # seconds before each RCPT's reply

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.waiting.append(bytes(server._reader._buffer))  # aiosmtpd reads a line at a time
        if self.mail_replies:
            return self.mail_replies.pop(0)
        return take_mail(envelope, address, options)

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(self.rcpt_delay)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-a-trip"])
def relay(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """The relay, offering PIPELINING or not: a reply means the same either way."""
    server = start_smtp(handler=PipeliningHandler(pipelining=request.param))
    yield server
    server.stop()


def pipelining_only(relay: SmtpServer) -> None:
    if not relay.handler.pipelining:
        pytest.skip("about the pipelined group")


@pytest.fixture
async def sender(
    make_settings: Callable[..., Settings], relay: SmtpServer
) -> AsyncIterator[Sender]:
    settings = make_settings(smtp_port=relay.port)
    sender = Sender(SmtpPool(settings, size=1))
    yield sender
    await sender.close()


def handler(relay: SmtpServer) -> PipeliningHandler:
    assert isinstance(relay.handler, PipeliningHandler)
    return relay.handler


async def send(sender: Sender, *recipients: str, subject: str = "hi") -> Delivery:
    job = Job(to=recipients[0], cc=list(recipients[1:]), subject=subject, text="body")
    async with sender.session() as conn:
        return await conn.send(render(subject, job, SENDER), SENDER, job.recipients)


async def test_mail_rcpt_and_data_arrive_in_one_write(sender: Sender, relay: SmtpServer) -> None:
    pipelining_only(relay)
    delivery = await send(sender, "a@example.com", "b@example.com")
    assert delivery.code == 250
    [got] = relay.handler.received
    assert got.rcpt_tos == ["a@example.com", "b@example.com"]
    assert got.message["Subject"] == "hi"
    # When the server read MAIL, both RCPTs and DATA were already waiting behind it.
    assert handler(relay).waiting == [
        b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    ]


async def test_one_refused_recipient_is_reported_and_the_rest_get_the_mail(
    sender: Sender, relay: SmtpServer
) -> None:
    handler(relay).rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    delivery = await send(sender, "a@example.com", "gone@example.com", "c@example.com")
    assert delivery.code == 250
    assert "gone@example.com: 550 5.1.1 no such user" in delivery.reply
    [got] = relay.handler.received
    assert got.rcpt_tos == ["a@example.com", "c@example.com"]


@pytest.mark.parametrize(
    ("script", "code", "permanent", "error"),
    [
        ({"mail": "550 5.7.1 sender refused"}, 550, True, SenderRefused),
        ({"mail": "452 4.3.1 insufficient storage"}, 452, False, SenderRefused),
        ({"rcpt": "550 5.1.1 no such user"}, 550, True, SendError),
        ({"rcpt": "450 4.2.0 mailbox busy"}, 450, False, SendError),
    ],
)
async def test_a_refusal_is_the_same_error_and_the_connection_goes_on(
    sender: Sender, relay: SmtpServer, script: dict[str, str], code: int, permanent: bool,
    error: type[SendError],
) -> None:  # fmt: skip
    if "mail" in script:
        handler(relay).mail_replies.append(script["mail"])
    else:
        handler(relay).rcpt_replies["a@example.com"] = script["rcpt"]
    with pytest.raises(SendError) as info:
        await send(sender, "a@example.com", subject="refused")
    assert (info.value.code, info.value.permanent) == (code, permanent)
    assert type(info.value) is error
    # A refused MAIL FROM says it was the sender, not the recipient, that was turned down.
    assert (f"sender {SENDER} refused at MAIL FROM: " in str(info.value)) is ("mail" in script)
    assert relay.handler.received == []
    # The replies to the rest of the group were read: the next mail, on the same
    # connection (RSET), is answered in step.
    assert (await send(sender, "b@example.com", subject="next")).code == 250
    assert [r.message["Subject"] for r in relay.handler.received] == ["next"]
    assert relay.handler.connections() == 1


@pytest.mark.parametrize("where", ["mail", "rcpt"])
async def test_421_mid_group_is_the_relay_throttling(
    sender: Sender, relay: SmtpServer, where: str
) -> None:
    # (One command a trip, aiosmtplib takes a 421 to the first RCPT as that recipient's
    # refusal, then meets the closed connection at the next command: another error path.)
    pipelining_only(relay)
    closing = "421 4.7.0 Try again later, closing connection"
    if where == "mail":
        handler(relay).mail_replies.append(closing)
    else:
        handler(relay).rcpt_replies["a@example.com"] = closing
    with pytest.raises(RelayThrottled) as info:
        await send(sender, "a@example.com", "b@example.com")
    assert info.value.code == 421
    assert relay.handler.received == []
    # The pool drops that connection; the next mail goes out on a new one.
    assert (await send(sender, "b@example.com", subject="next")).code == 250
    assert [r.message["Subject"] for r in relay.handler.received] == ["next"]


async def test_a_refused_end_of_data_is_the_same_error(sender: Sender, relay: SmtpServer) -> None:
    relay.handler.replies.append("554 5.7.1 spam")
    with pytest.raises(SendError) as info:
        await send(sender, "a@example.com")
    assert (info.value.code, info.value.permanent) == (554, True)
    assert (await send(sender, "a@example.com", subject="next")).code == 250


def outcome(quote: Callable[[str], str], address: str) -> str:
    try:
        return quote(address)
    except ValueError:
        return "refused"


@pytest.mark.parametrize(
    "address",
    ["a@example.com", "first.last+tag@sub.example.org", "홍@example.kr", "user@bücher.example",
     "a!#$%&'*+/=?^_`{|}~-@example.com", "Name <a@example.com>", '"quoted local"@example.com',
     "a@[127.0.0.1]", "a(comment)@example.com", "a@b@example.com", "a,b@example.com",
     "a@example.com\r\nRSET", "a b@example.com", "<a@x> SIZE=1", "a@x\x00y",
     '"a\r\nRCPT TO:<evil@example.com>"@example.com', "a@example.com\x7f"],
)  # fmt: skip
def test_smtp_path_is_what_aiosmtplib_would_send(address: str) -> None:
    # The same path, or the same refusal (ValueError: nothing is sent). An address with a
    # control character is refused outright: aiosmtplib would refuse the command (NUL), or
    # send another address that parseaddr found in it (evil@example.com above).
    if any(ord(c) < 0x20 or c == "\x7f" for c in address):
        assert outcome(smtp_path, address) == "refused"
    else:
        assert outcome(smtp_path, address) == outcome(quote_address, address)


async def test_a_group_reply_that_never_comes_times_out_and_sends_nothing(
    make_settings: Callable[..., Settings], relay: SmtpServer
) -> None:
    # The group's replies wait SMTP_TIMEOUT_SECONDS, as aiosmtplib's own commands do; the
    # relay has none of the mail then, so it is the relay's fault (no attempt used).
    pipelining_only(relay)
    handler(relay).rcpt_delay = 5.0
    sender = Sender(SmtpPool(make_settings(smtp_port=relay.port, smtp_timeout_seconds=0.3),
                             size=1))  # fmt: skip
    try:
        with pytest.raises(RelayUnavailable, match="SMTPReadTimeoutError"):
            await send(sender, "a@example.com")
    finally:
        await sender.close()
    assert relay.handler.received == []


async def test_a_relay_answering_more_than_asked_at_the_end_of_data_is_hung_up_on(
    sender: Sender, relay: SmtpServer
) -> None:
    # The mail was taken (250); a line after it answers nothing, and on a reused connection
    # it could pass for the next command's reply: this connection goes, the next mail gets
    # a fresh one, and each is delivered once.
    relay.handler.replies.append("250 2.0.0 OK queued\r\n250 2.0.0 a reply to no command")
    job = Job(to="a@example.com", subject="first", text="body")
    async with sender.session() as conn:
        delivery = await conn.send(render("first", job, SENDER), SENDER, job.recipients)
        assert delivery.code == 250
        assert not conn.smtp.is_connected
    assert (await send(sender, "b@example.com", subject="second")).reply == "2.0.0 OK queued"
    assert [got.message["Subject"] for got in relay.handler.received] == ["second"]


def aiosmtplib_framed(message: bytes) -> bytes:
    """What aiosmtplib's own DATA sends for ``message`` (``execute_data_command``)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


# Line ends of every kind, dots at line starts, and text: what the framing may have to fix.
_PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b" ", b"\r\n.\r\n"])


@given(st.lists(_PIECES, max_size=40).map(b"".join))
def test_framing_is_what_aiosmtplib_would_send(message: bytes) -> None:
    # _framed skips the regular expressions when they would change nothing: never a
    # different byte on the wire (a lone CR or LF, or a dot at a line start, still fixed).
    assert _framed(message) == aiosmtplib_framed(message)


def test_framing_of_a_rendered_message_is_what_aiosmtplib_would_send() -> None:
    job = Job(to="a@example.com", subject="s", text=".leading dot\n..two\nplain\r\n.")
    message = render("t-1", job, SENDER).as_bytes()
    assert b"\r\n.." in _framed(message)
    assert _framed(message) == aiosmtplib_framed(message)


@pytest.mark.parametrize("step", ["MAIL FROM", "DATA", "message"])
async def test_the_lease_guard_still_stops_a_pipelined_send(
    sender: Sender, relay: SmtpServer, step: str
) -> None:
    async def guard(at: str) -> None:
        if at == step:
            raise LeaseLost(f"lease passed to another worker before {at}")

    job = Job(to="a@example.com", subject="guarded", text="body")
    with pytest.raises(LeaseLost):
        async with sender.session() as conn:
            await conn.send(render("t", job, SENDER), SENDER, job.recipients, guard)
    assert relay.handler.received == []
    pipelining_only(relay)
    # Stopped before the group: the relay saw no MAIL at all; after the 354, no message.
    assert handler(relay).waiting == (
        [] if step != "message" else [b"RCPT TO:<a@example.com>\r\nDATA\r\n"]
    )
    assert (await send(sender, "b@example.com", subject="next")).code == 250
