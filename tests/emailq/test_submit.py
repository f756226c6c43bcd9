"""The submission pipeline: what every entry point's request becomes, or why it is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from emailq.apikeys import ANONYMOUS, Principal, Scope
from emailq.compose import EmailRequest
from emailq.errors import Forbidden, InvalidMessage, MessageTooLarge
from emailq.forms import Form
from emailq.models import Priority
from emailq.submit import OPERATOR, REJECTED, OperatorLimits, prepare, prepare_form

NOW = datetime(2030, 1, 1, tzinfo=UTC)
LIMITS = OperatorLimits(max_body_bytes=4096)
WEB = Principal("web", Scope.SEND, frozenset({"example.com"}))


def request(**fields: Any) -> EmailRequest:
    base: dict[str, Any] = {"to": "user@example.com", "subject": "Hi {username}",
                            "body": "Hello", "username": "Kim"}  # fmt: skip
    return EmailRequest.model_validate({**base, **fields})


def test_a_request_becomes_a_task_of_its_principal() -> None:
    later = NOW + timedelta(hours=1)
    item = prepare(request(priority="high", send_at=later.isoformat(), ttl_seconds=60), WEB,
                   NOW, LIMITS, request_id="req-1", quota="key:web")  # fmt: skip

    assert (item.job.to, item.job.subject) == ("user@example.com", "Hi Kim")
    assert (item.lane, item.send_at_ms) == (Priority.HIGH, int(later.timestamp() * 1000))
    assert item.expires_at_ms == int((later + timedelta(seconds=60)).timestamp() * 1000)
    assert (item.key_id, item.quota, item.request_id) == ("web", "key:web", "req-1")


def test_every_task_gets_its_own_id() -> None:
    ids = {prepare(request(), ANONYMOUS, NOW, LIMITS, request_id="r").task_id for _ in range(50)}
    assert len(ids) == 50


def test_callers_without_a_key_and_the_operator_own_no_task() -> None:
    for principal in (ANONYMOUS, OPERATOR):
        assert prepare(request(), principal, NOW, LIMITS, request_id="r").key_id == ""


@pytest.mark.parametrize(
    ("principal", "allowed", "to"),
    [
        (WEB, None, "user@other.example.org"),  # outside the key's domains
        (OPERATOR, frozenset({"@example.com"}), "user@other.example.org"),  # outside the allow-list
        (WEB, frozenset({"@other.example.org"}), "user@other.example.org"),  # both must allow it
    ],
)
def test_a_recipient_the_principal_may_not_send_to_is_forbidden(
    principal: Principal, allowed: frozenset[str] | None, to: str
) -> None:
    limits = OperatorLimits(4096, allowed)
    with pytest.raises(Forbidden):
        prepare(request(to=to), principal, NOW, limits, request_id="r")
    with pytest.raises(Forbidden):  # cc and bcc count too
        prepare(request(bcc=[to]), principal, NOW, limits, request_id="r")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"subject": "a\r\nBcc: x@evil.test"}, InvalidMessage),
        ({"body": "x" * 5000}, MessageTooLarge),
        ({"send_at": (NOW + timedelta(days=31)).isoformat()}, InvalidMessage),
    ],
)
def test_every_refusal_is_one_of_rejected(fields: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        prepare(request(**fields), ANONYMOUS, NOW, LIMITS, request_id="r")
    assert isinstance(info.value, REJECTED)


def test_a_form_submission_is_a_task_of_the_form_sent_at_once() -> None:
    form = Form(id="contact", to=["owner@example.com"], subject="From {name}", redirect="/ok")
    item = prepare_form(form, {"name": "Kim", "message": "Hi"}, LIMITS, request_id="r")

    assert (item.job.to, item.job.subject) == ("owner@example.com", "From Kim")
    assert (item.key_id, item.quota) == ("form:contact", "form:contact")
    assert (item.lane, item.send_at_ms, item.expires_at_ms) == (Priority.DEFAULT, 0, 0)
    with pytest.raises(REJECTED):
        prepare_form(form, {"name": "a\r\nBcc: x@evil.example.org"}, LIMITS, request_id="r")
