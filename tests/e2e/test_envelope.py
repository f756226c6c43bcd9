"""The SMTP envelope across real processes: the API and a worker as the README runs them,
real Redis, and an aiosmtpd relay that records every MAIL FROM and RCPT TO command it gets
(``EnvelopeHandler``), so what is counted is commands on the wire, not a stored envelope.

Tried as an attacker would, and what each attempt got:

* one mailbox in To, Cc and Bcc, with the domain in other cases and in IDNA form, 50 times
  over: one RCPT TO; the headers keep To and Cc as given, and no Bcc.
* 1000 recipients, most of them duplicates: 422 (50 at most), nothing stored.
* CR, LF or CRLF in an address (To, Cc or Bcc), to add a RCPT TO or a header: 422,
  nothing stored; nothing reaches the relay.
* a homoglyph domain (``ex\\u0430mple.com``, a Cyrillic a): a different mailbox, sent to its
  own IDNA name (``xn--exmple-4nf.com``), never merged with ``example.com``; ALLOWED_RECIPIENTS
  naming ``@example.com`` refuses it, 403 (tests/server/test_auth.py).
* ``bücher.example`` through a relay without SMTPUTF8: sent as ``xn--bcher-kva.example``;
  a non-ASCII local part there fails at once, permanently, naming SMTPUTF8, and the mail
  after it is sent.
* a relay refusing MAIL FROM (550 5.7.1): each mail fails at once with a reason that says
  the sender was refused and names it; nothing is retried in a loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from emailq.queue import Keys
from emailq.settings import Settings
from tests.helpers.api import task_keys
from tests.helpers.processes import Procs
from tests.helpers.smtpd import EnvelopeHandler, Received, SmtpServer

pytestmark = pytest.mark.slow

SEND = "/api/v1/email/received"
RESULT = "/api/v1/email/result"
HOMOGLYPH = "user@ex\u0430mple.com"  # a Cyrillic a: another domain, xn--exmple-4nf.com


@dataclass
class Relay:
    """An API and a worker process in front of one recording relay."""

    base: str
    handler: EnvelopeHandler
    store: redis.Redis
    start_worker: Callable[[], object]

    def send(self, **fields: Any) -> httpx.Response:
        body = {"to": "user@example.com", "subject": "Hello", "body": "Hi", **fields}
        return httpx.post(self.base + SEND, json=body, timeout=30)

    def sent(self, **fields: Any) -> str:
        response = self.send(**fields)
        assert response.status_code == 202, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    def result(self, task_id: str) -> dict[str, Any]:
        params: dict[str, str | int] = {"task_id": task_id, "wait": 10}
        answer = httpx.get(self.base + RESULT, params=params, timeout=30)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["status"] in ("success", "failed"), body
        return body

    def mail_of(self, task_id: str) -> Received:
        assert self.result(task_id)["status"] == "success"
        [mail] = [m for m in self.handler.received if m.task_id == task_id]
        return mail

    def stored_job(self, task_id: str) -> dict[str, Any]:
        job: dict[str, Any] = json.loads(self.store.hget(Keys().task(task_id), "job") or "{}")
        return job


@pytest.fixture
def start_relay(
    procs: Procs, make_settings: Callable[..., Settings], smtp_factory: Callable[..., SmtpServer],
    redis_url: str,
) -> Iterator[Callable[..., Relay]]:  # fmt: skip
    """``start_relay(smtputf8=False, refuse_sender="550 ...")``: the relay, an API, a worker."""
    stores: list[redis.Redis] = []

    def start(*, smtputf8: bool = True, refuse_sender: str | None = None,
              worker: bool = True) -> Relay:  # fmt: skip
        handler = EnvelopeHandler(refuse_sender=refuse_sender)
        smtp = smtp_factory(handler=handler, smtputf8=smtputf8)
        # Three attempts: a mail that fails after one did so because it is permanent.
        settings = make_settings(smtp_port=smtp.port, max_attempts=3)
        base = procs.api(settings)
        if worker:
            procs.worker(settings)
        stores.append(redis.Redis.from_url(redis_url, decode_responses=True))
        return Relay(base, handler, stores[-1], lambda: procs.worker(settings))

    yield start
    for store in stores:
        store.close()


# -- one RCPT TO per mailbox -----------------------------------------------------------


def test_a_mailbox_given_twice_gets_one_rcpt_and_the_headers_stay_as_given(
    start_relay: Callable[..., Relay],
) -> None:
    relay = start_relay()
    cc = ["user@EXAMPLE.com", "other@example.com", "User@example.com"]
    bcc = ["other@Example.COM", "hidden@example.com", "hidden@example.com", "user@example.com"]

    mail = relay.mail_of(relay.sent(cc=cc, bcc=bcc))

    # The local part as written ("User" is another mailbox: RFC 5321 2.4); domains in any case.
    expected = ["user@example.com", "other@example.com", "User@example.com", "hidden@example.com"]
    assert relay.handler.rcpts == expected
    assert mail.rcpt_tos == expected
    assert len(relay.handler.received) == 1
    message = mail.message
    assert message["To"] == "user@example.com"
    # The API stores domains lower-cased (email-validator); the list itself is as given.
    assert [a.addr_spec for a in message["Cc"].addresses] == [
        "user@example.com", "other@example.com", "User@example.com",
    ]  # fmt: skip
    assert "Bcc" not in message
    assert b"hidden@" not in mail.raw


def test_fifty_copies_of_one_address_are_one_rcpt_and_a_thousand_are_refused(
    start_relay: Callable[..., Relay],
) -> None:
    relay = start_relay()
    copies = ["Ada@Example.com", "Ada@example.COM"] * 24 + ["Ada@EXAMPLE.com"]

    relay.mail_of(relay.sent(to="ada@example.com", cc=copies))
    assert relay.handler.rcpts == ["ada@example.com", "Ada@example.com"]

    thousand = [f"u{i % 7}@example.com" for i in range(999)]
    for field in ("cc", "bcc"):
        refused = relay.send(**{field: thousand})
        assert refused.status_code == 422, refused.text
    assert len(task_keys(relay.store)) == 1  # the first mail's, and no other
    assert len(relay.handler.received) == 1


@pytest.mark.parametrize(
    "address",
    [
        "a@example.com\r\nRCPT TO:<x@evil.test>",
        "a@example.com\nBcc: x@evil.test",
        "a\r@example.com",
    ],
)
def test_a_line_break_in_an_address_is_refused_and_nothing_is_sent(
    start_relay: Callable[..., Relay], address: str
) -> None:
    relay = start_relay()
    for fields in ({"to": address}, {"cc": [address]}, {"bcc": [address]}):
        refused = relay.send(**fields)
        assert refused.status_code == 422, refused.text
    relay.mail_of(relay.sent())  # the worker ran all along; only this one mail arrived

    assert relay.handler.rcpts == ["user@example.com"]
    assert len(task_keys(relay.store)) == 1


# -- international domains -----------------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [False, True], ids=["plain-relay", "smtputf8-relay"])
def test_an_international_domain_goes_out_in_idna_form(
    start_relay: Callable[..., Relay], smtputf8: bool
) -> None:
    # The worker starts once the stored job is read: a sent mail's job is removed.
    relay = start_relay(smtputf8=smtputf8, worker=False)

    task_id = relay.sent(to="user@bücher.example", cc=["user@XN--BCHER-KVA.example"],
                         bcc=["anna@BÜCHER.example", HOMOGLYPH])  # fmt: skip
    # Stored as the API normalized it: Unicode domains, lower-cased (email-validator).
    job = relay.stored_job(task_id)
    assert (job["to"], job["cc"]) == ("user@bücher.example", ["user@bücher.example"])
    relay.start_worker()
    mail = relay.mail_of(task_id)

    # One RCPT for the mailbox given in both forms; the homoglyph a domain of its own.
    assert relay.handler.rcpts == ["user@xn--bcher-kva.example", "anna@xn--bcher-kva.example",
                                   "user@xn--exmple-4nf.com"]  # fmt: skip
    # Nothing needed SMTPUTF8 (RFC 6531 3.2): the mail is ASCII, whatever the relay offers.
    [(_, options)] = relay.handler.mails
    assert "SMTPUTF8" not in options
    assert mail.raw.isascii()
    assert mail.message["To"] == "user@xn--bcher-kva.example"


@pytest.mark.parametrize("smtputf8", [False, True], ids=["plain-relay", "smtputf8-relay"])
def test_a_non_ascii_local_part_needs_smtputf8_else_fails_at_once(
    start_relay: Callable[..., Relay], smtputf8: bool
) -> None:
    relay = start_relay(smtputf8=smtputf8)

    intl = relay.sent(to="用户@bücher.example")
    plain = relay.sent(to="next@example.com")
    result = relay.result(intl)

    assert relay.mail_of(plain).rcpt_tos == ["next@example.com"]
    if smtputf8:
        assert result["status"] == "success"
        mail = relay.mail_of(intl)
        assert mail.rcpt_tos == ["用户@bücher.example"]
        assert "SMTPUTF8" in relay.handler.mails[0][1]
        return
    # Never sendable through this relay: failed on its first attempt of three, permanently,
    # saying why; no MAIL FROM was even tried for it.
    assert (result["status"], result["attempts"]) == ("failed", 1), result
    assert result["reason"].startswith("permanent error after 1 attempt(s): ")
    assert "SMTPUTF8" in result["reason"]
    assert [e["outcome"] for e in result["attempt_log"]] == ["failed"]
    assert relay.handler.rcpts == ["next@example.com"]


# -- the relay refuses the sender ----------------------------------------------------------


def test_a_refused_sender_fails_each_mail_at_once_saying_so(
    start_relay: Callable[..., Relay],
) -> None:
    relay = start_relay(refuse_sender="550 5.7.1 Access denied")

    ids = [relay.sent(to=f"user{n}@example.com") for n in range(3)]
    results = [relay.result(task_id) for task_id in ids]

    for result in results:
        assert (result["status"], result["attempts"]) == ("failed", 1), result
        assert result["reason"] == ("permanent error after 1 attempt(s): 550 sender "
                                    "noreply@example.com refused at MAIL FROM: 5.7.1 Access "
                                    "denied")  # fmt: skip
    # One MAIL FROM per mail, and no RCPT: nothing retried behind the operator's back.
    assert [address for address, _ in relay.handler.mails] == ["noreply@example.com"] * 3
    assert relay.handler.rcpts == []
    assert relay.handler.received == []
