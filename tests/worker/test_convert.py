"""convert_error: aiosmtplib and socket errors become SendError with code and permanence."""

from __future__ import annotations

import aiosmtplib
import pytest

from emailq.errors import RelayThrottled, SenderRefused
from worker.sender import convert_error


def refused(*codes: int) -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(code, f"reply {code}", f"r{i}@example.com")
            for i, code in enumerate(codes)
        ]
    )


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPResponseException(421, "service not available"),
        aiosmtplib.SMTPDataError(451, "local error"),
        aiosmtplib.SMTPConnectResponseError(421, "too busy"),
        aiosmtplib.SMTPResponseException(554, "transaction failed"),
        aiosmtplib.SMTPDataError(552, "message too big"),
        aiosmtplib.SMTPAuthenticationError(535, "bad credentials"),
    ],
)
def test_reply_keeps_its_code_and_only_5xx_is_permanent(
    exc: aiosmtplib.SMTPResponseException,
) -> None:
    err = convert_error(exc)
    assert (err.code, err.permanent) == (exc.code, exc.code >= 500)
    assert str(err) == f"{exc.code} {exc.message}"


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPSenderRefused(452, "insufficient storage", "me@example.com"),
        aiosmtplib.SMTPSenderRefused(553, "sender rejected", "me@example.com"),
    ],
)
def test_a_refused_mail_from_names_the_sender_and_keeps_its_code(
    exc: aiosmtplib.SMTPSenderRefused,
) -> None:
    err = convert_error(exc)
    assert isinstance(err, SenderRefused)
    assert (err.code, err.permanent) == (exc.code, exc.code >= 500)
    assert str(err) == f"{exc.code} sender me@example.com refused at MAIL FROM: {exc.message}"


def test_a_throttling_reply_to_mail_from_stays_throttling() -> None:
    err = convert_error(aiosmtplib.SMTPSenderRefused(451, "slow down", "me@example.com"))
    assert type(err) is RelayThrottled
    assert (err.code, err.permanent) == (451, False)


def test_all_recipients_refused_with_5xx_is_permanent() -> None:
    err = convert_error(refused(550, 553))
    assert (err.code, err.permanent) == (550, True)
    assert "r0@example.com: 550 reply 550" in str(err)
    assert "r1@example.com: 553 reply 553" in str(err)


@pytest.mark.parametrize("codes", [(550, 450), (450, 550), (421,)])
def test_recipients_refused_with_any_4xx_is_transient(codes: tuple[int, ...]) -> None:
    err = convert_error(refused(*codes))
    assert (err.code, err.permanent) == (codes[0], False)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        OSError("network unreachable"),
        aiosmtplib.SMTPConnectError("cannot connect"),
        aiosmtplib.SMTPConnectTimeoutError("connect timed out"),
        aiosmtplib.SMTPReadTimeoutError("read timed out"),
        aiosmtplib.SMTPServerDisconnected("server closed the connection"),
    ],
)
def test_connection_errors_and_timeouts_are_transient_without_code(exc: Exception) -> None:
    err = convert_error(exc)
    assert (err.code, err.permanent) == (None, False)
    assert str(err).startswith(type(exc).__name__)


def test_error_without_text_is_named_by_its_type() -> None:
    assert str(convert_error(TimeoutError())) == "TimeoutError"
