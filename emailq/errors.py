"""The project's own errors. Library errors are converted where they enter.

::

    EmailqError
    ├── StoreUnavailable     Redis unreachable or too slow   (API answers 503)
    ├── InvalidMessage       input that must not be sent      (API answers 422)
    │   └── HeaderInjection  CR, LF or NUL in a header value
    ├── MessageTooLarge      content over MAX_BODY_BYTES      (API answers 413)
    └── SendError            one SMTP attempt failed (worker); ``permanent`` decides retry
        ├── RelayUnavailable the relay, not the mail: unreachable, TLS, login, greeting,
        │                    a timeout or drop before DATA (no attempt is used up)
        └── RelayThrottled   421/451/454 to MAIL, RCPT or DATA: the relay's rate limit
                             (no attempt is used up; the shared send rate slows down)
"""

from __future__ import annotations


class EmailqError(Exception):
    """Base of every error this project raises on purpose."""


class StoreUnavailable(EmailqError):
    """Redis could not be reached or did not answer in time."""


class InvalidMessage(EmailqError):
    """A request that validated as JSON but must not become a mail."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HeaderInjection(InvalidMessage):
    """A header value carries a line break or NUL, raw or after substitution."""


class MessageTooLarge(EmailqError):
    """Message content (or the HTTP body carrying it) is over the configured limit."""


class SendError(EmailqError):
    """One SMTP attempt failed.

    ``permanent`` errors (5xx replies) fail the task at once; the rest are retried.
    ``code`` is the SMTP reply code when the server gave one.
    """

    def __init__(self, message: str, *, code: int | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.permanent = permanent

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.code} {text}" if self.code is not None else text


class RelayUnavailable(SendError):
    """The relay could not be used at all, so the mail was never judged: connection
    refused, DNS, TLS, login, a 4xx/5xx greeting, a timeout or a drop before DATA."""


class RelayThrottled(SendError):
    """The relay answered MAIL, RCPT or DATA with 421, 451 or 454: slow down, try later."""
