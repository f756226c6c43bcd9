"""The project's own errors. Library errors are converted where they enter.

::

    EmailqError
    ├── StoreUnavailable     Redis unreachable or too slow   (API answers 503)
    │   └── StoreOutcomeUnknown  a write was sent, its reply never came: it may have run
    ├── InvalidMessage       input that must not be sent      (API answers 422)
    │   └── HeaderInjection  a control character or line break in a header value
    ├── MessageTooLarge      content over MAX_BODY_BYTES      (API answers 413)
    ├── SendError            one SMTP attempt failed (worker); ``permanent`` decides retry
    │   └── OutcomeUnknown   the message was sent, its final reply never came
    ├── LeaseLost            the worker no longer owns the job it was about to send
    └── ConfigError          a setting or file the operator must fix (entry points exit 2)
"""

from __future__ import annotations


class EmailqError(Exception):
    """Base of every error this project raises on purpose."""


class StoreUnavailable(EmailqError):
    """Redis could not be reached or did not answer in time."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A write reached Redis's socket but no reply came (a timeout, a cut connection): Redis
    may have run it. Unlike its parent, which means nothing was sent, so nothing stored."""


class InvalidMessage(EmailqError):
    """A request that validated as JSON but must not become a mail."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HeaderInjection(InvalidMessage):
    """A header value carries a control character or line break, raw or after substitution."""


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


class OutcomeUnknown(SendError):
    """The whole message was sent but the relay's reply to the end of DATA never came (a
    timeout, a dropped connection): it may have been delivered. Never retried as a plain
    failure; ON_UNKNOWN_OUTCOME decides."""


class LeaseLost(EmailqError):
    """The job's lease lapsed or passed to another worker before the send: not ours to send."""


class ConfigError(EmailqError):
    """A setting (or a file a setting names) is invalid; the message is one line naming it.

    Every entry point turns it into that line on stderr and exit code 2 (``emailq.startup``).
    """
