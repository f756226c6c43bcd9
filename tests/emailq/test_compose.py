"""compose(): a request becomes a complete, safe ``Job`` or an error, never half of one."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from emailq import compose as compose_module
from emailq.compose import MAX_RECIPIENTS, EmailRequest, compose, normalize_address
from emailq.errors import HeaderInjection, InvalidMessage, MessageTooLarge
from emailq.models import Job

LIMIT = 4096


def request(**fields: Any) -> EmailRequest:
    """A valid request with ``fields`` changed."""
    base: dict[str, Any] = {"to": "user@example.com", "subject": "Hello", "body": "Hi"}
    return EmailRequest.model_validate({**base, **fields})


def build(**fields: Any) -> Job:
    return compose(request(**fields), max_body_bytes=LIMIT)


def addresses(n: int) -> list[str]:
    return [f"r{i}@example.com" for i in range(n)]


def test_korean_subject_and_body_pass_through_intact() -> None:
    job = build(
        subject="{username}님 환영합니다", body="{username}님 안녕하세요!", username="홍길동"
    )
    assert job.subject == "홍길동님 환영합니다"
    assert job.text == "홍길동님 안녕하세요!"
    assert job.to == "user@example.com"


def test_variables_and_html_are_rendered() -> None:
    job = build(body="code {code}", html="<b>{code}</b>", variables={"code": "42"})
    assert (job.text, job.html) == ("code 42", "<b>42</b>")


def test_addresses_are_normalized() -> None:
    job = build(
        to="User@EXAMPLE.COM",
        cc=["Cc@Example.Org"],
        bcc=["hidden@EXAMPLE.net"],
        reply_to="Reply@Example.COM",
    )
    assert job.to == "User@example.com"
    assert job.cc == ["Cc@example.org"]
    assert job.bcc == ["hidden@example.net"]
    assert job.reply_to == "Reply@example.com"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "not-an-address"),
        ("to", "user@"),
        ("to", "a@example.com, b@example.com"),
        ("to", "user@example.com\r\nBcc: evil@example.com"),
        ("reply_to", "nobody"),
        ("cc", ["ok@example.com", "bad@@example.com"]),
        ("bcc", ["x y@example.com"]),
    ],
)
def test_invalid_addresses_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        request(**{field: value})


def test_unknown_request_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        request(from_="boss@example.com")


def test_bad_variable_name_is_rejected() -> None:
    with pytest.raises(ValidationError):
        request(variables={"a.b": "x"})


@pytest.mark.parametrize("subject", ["a\rb", "a\nb", "Hi\r\nBcc: evil@example.com", "a\0b"])
def test_line_breaks_and_nul_in_the_raw_subject_are_rejected(subject: str) -> None:
    with pytest.raises(HeaderInjection):
        build(subject=subject)


@pytest.mark.parametrize("username", ["x\r\nBcc: evil@example.com", "x\nBcc: e@example.com"])
def test_line_breaks_from_substitution_are_rejected(username: str) -> None:
    with pytest.raises(HeaderInjection):
        build(subject="Hi {username}", username=username)


def test_line_breaks_from_substitution_are_fine_in_the_body() -> None:
    job = build(body="Dear {username}", username="a\r\nb")
    assert job.text == "Dear a\r\nb"


def test_subject_over_the_line_limit_after_substitution_is_rejected() -> None:
    with pytest.raises(InvalidMessage):
        build(subject="{username}" * 5, username="x" * 200)


def test_more_than_fifty_recipients_in_total_are_rejected() -> None:
    half = MAX_RECIPIENTS // 2
    ok = build(cc=addresses(half), bcc=addresses(MAX_RECIPIENTS - half - 1))
    assert len(ok.recipients) == MAX_RECIPIENTS
    with pytest.raises(InvalidMessage):
        build(cc=addresses(half), bcc=addresses(MAX_RECIPIENTS - half))


def test_more_than_fifty_cc_are_rejected_by_validation() -> None:
    with pytest.raises(ValidationError):
        request(cc=addresses(MAX_RECIPIENTS + 1))


def test_body_size_counts_utf8_bytes() -> None:
    fits = "가" * (LIMIT // 3)  # 3 bytes per character in UTF-8
    assert build(body=fits).text == fits
    with pytest.raises(MessageTooLarge):
        build(body=fits + "가")


def test_text_and_html_together_must_fit() -> None:
    half = "x" * (LIMIT // 2)
    assert build(body=half, html=half).html == half
    with pytest.raises(MessageTooLarge):
        build(body=half, html=half + "x")


def test_body_growing_past_the_limit_by_substitution_is_rejected() -> None:
    with pytest.raises(MessageTooLarge):
        build(body="{username}" * 100, username="y" * 100)


@pytest.mark.parametrize("fields", [{"body": "a\0b"}, {"html": "<p>\0</p>"}])
def test_nul_in_the_body_is_rejected(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidMessage):
        build(**fields)


def test_nul_from_substitution_into_the_body_is_rejected() -> None:
    with pytest.raises(InvalidMessage):
        build(body="{username}", username="\0")


# Every line break str.splitlines() knows, other C0 controls, DEL and a C1 control: each
# was accepted (202) and then failed in the worker as "internal error: ValueError".
CONTROL_CHARS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x01",
                 "\x1b", "\x7f", "\x9b"]  # fmt: skip


@pytest.mark.parametrize("char", CONTROL_CHARS)
def test_control_characters_in_the_subject_are_rejected(char: str) -> None:
    with pytest.raises(HeaderInjection) as info:
        build(subject=f"Hello{char}Bcc: x@evil.test")
    assert info.value.field == "subject"


@pytest.mark.parametrize("char", CONTROL_CHARS)
def test_a_value_feeding_the_subject_is_rejected_under_its_own_name(char: str) -> None:
    with pytest.raises(HeaderInjection) as info:
        build(subject="Hi {username}", username=f"Ada{char}")
    assert info.value.field == "username"
    with pytest.raises(HeaderInjection) as info:
        build(subject="Order {order}", variables={"order": f"42{char}"})
    assert info.value.field == "variables.order"


def test_control_characters_in_values_used_only_in_the_body_are_fine() -> None:
    job = build(subject="Hi", body="{username}", username="a\x0bb")
    assert job.text == "a\x0bb"


def test_a_tab_is_allowed_in_the_subject() -> None:
    assert build(subject="a\t{username}", username="b\tc").subject == "a\tb\tc"


@pytest.mark.parametrize(
    "address",
    ["=?us-ascii?q?victim=40evil.test=2C?=@example.com", "=?UTF-8?B?dkBldmlsLnRlc3Q=?=@x.example",
     "a=?b@example.com"],
)  # fmt: skip
@pytest.mark.parametrize("field", ["to", "cc", "bcc", "reply_to"])
def test_an_encoded_word_in_an_address_is_rejected(field: str, address: str) -> None:
    value: object = [address] if field in ("cc", "bcc") else address
    with pytest.raises(ValidationError, match="encoded word"):
        request(**{field: value})


def test_validated_addresses_are_cached_within_bounds() -> None:
    # A flood of distinct addresses (an attacker's, or a mailing) keeps at most the cache's
    # size; an address too long to be valid takes no slot.
    cache = compose_module._cached_normalized
    for i in range(compose_module.ADDRESS_CACHE_SIZE + 50):
        normalize_address(f"flood{i}@example.com")
    assert cache.cache_info().currsize == compose_module.ADDRESS_CACHE_SIZE
    before = cache.cache_info()
    with pytest.raises(ValueError, match="too long"):
        normalize_address("a" * 400 + "@example.com")
    assert cache.cache_info() == before


def test_a_cached_address_answers_as_it_was_validated() -> None:
    # Each spelling is its own entry, with its own normalized form; a refusal is never
    # remembered as an answer, however often it is asked after a valid neighbour.
    assert normalize_address("User@EXAMPLE.com") == "User@example.com"
    assert normalize_address("user@example.com") == "user@example.com"
    assert normalize_address("User@EXAMPLE.com") == "User@example.com"
    for _ in range(2):
        with pytest.raises(ValueError, match="two periods"):
            normalize_address("user@example..com")
        with pytest.raises(ValueError, match="=\\?"):
            normalize_address("=?us-ascii?q?x?=@example.com")
