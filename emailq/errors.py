"""The project's own errors. Library errors are converted where they enter.

::

    EmailqError
    ├── StoreUnavailable     Redis unreachable or too slow   (API answers 503)
    │   ├── StoreOutcomeUnknown  a write was sent, its reply never came: it may have run
    │   └── StoreFull        no room for new mail: Redis at maxmemory or within
    │                        REDIS_MEMORY_HEADROOM of it, or MAX_STORED_BYTES reached (507)
    ├── EventGroupLost       the webhook consumer group is gone (Redis lost its data)
    ├── QuotaExceeded        a sender's stored mail over MAX_STORED_BYTES_PER_KEY (429)
    ├── InvalidMessage       input that must not be sent      (API answers 422)
    │   └── HeaderInjection  a control character or line break in a header value
    ├── MessageTooLarge      content over MAX_BODY_BYTES      (API answers 413)
    ├── Forbidden            the caller may not send this mail (API answers 403)
    ├── SendError            one SMTP attempt failed (worker); ``permanent`` decides retry
    │   ├── OutcomeUnknown   the message was sent, its final reply never came
    │   ├── SenderRefused    MAIL FROM refused (a 4xx or 5xx but 421/451/454): the reason
    │   │                    names the sender, which is what to fix
    │   ├── RelayUnavailable the relay, not the mail: unreachable, TLS, login, greeting,
    │   │                    a timeout or drop before DATA (no attempt is used up)
    │   └── RelayThrottled   421/451/454 to MAIL, RCPT or DATA: the relay's rate limit
    │                        (no attempt is used up; the shared send rate slows down)
    ├── LeaseLost            the worker no longer owns the job it was about to send
    └── ConfigError          a setting or file the operator must fix (entry points exit 2)

``NotConnected`` is not one of them: a redis-py ``ConnectionError`` that the store's own
clients raise (emailq.queue's pool, emailq.rediscluster) when no command was sent, and
that emailq.queue converts to ``StoreUnavailable`` rather than ``StoreOutcomeUnknown``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError


class EmailqError(Exception):
    """Base of every error this project raises on purpose."""


class StoreUnavailable(EmailqError):
    """Redis could not be reached or did not answer in time."""


class NotConnected(RedisConnectionError):
    """No connection could be had (the pool's wait, a refused or timed-out connect, a
    cluster with no master for the slot): no command was sent on behalf of the call that
    got this, or every one sent was refused unrun."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A write reached Redis's socket but no reply came (a timeout, a cut connection): Redis
    may have run it. Unlike its parent, which means nothing was sent, so nothing stored."""


class StoreFull(StoreUnavailable):
    """Redis has no room for new mail. A kind of outage: workers wait it out as they wait
    out an unreachable Redis (their own writes still fit: see finish.lua), and the API
    answers 507 instead of 503, since only sending new mail is refused."""


class EventGroupLost(EmailqError):
    """The event stream's webhook consumer group is gone: Redis restarted without its data
    (or someone deleted it). The dispatcher registers it, and its endpoints, again."""


class QuotaExceeded(EmailqError):
    """One sender's pending and scheduled mail would hold more than its share of bytes.

    ``need`` is what the refused request would have added, ``held`` what the sender holds
    now, ``limit`` its budget; ``never_fits`` when the request alone is over it.
    """

    def __init__(self, message: str, *, need: int, held: int, limit: int) -> None:
        super().__init__(message)
        self.need, self.held, self.limit = need, held, limit

    @property
    def never_fits(self) -> bool:
        """The request is larger than the whole budget: waiting will not help."""
        return self.need > self.limit


class InvalidMessage(EmailqError):
    """A request that validated as JSON but must not become a mail."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HeaderInjection(InvalidMessage):
    """A header value carries a control character or line break, raw or after substitution."""


class MessageTooLarge(EmailqError):
    """Message content (or the HTTP body carrying it) is over the configured limit."""


class Forbidden(EmailqError):
    """The caller may not send this mail: a recipient outside ALLOWED_RECIPIENTS or its
    key's domains. The message says which rule refused it."""


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


class SenderRefused(SendError):
    """The relay refused the envelope sender (MAIL FROM); a 5xx fails the mail at once, as
    any 5xx does. The reply text alone ("550 5.7.1 Access denied") did not say that it
    was the sender, not the recipient or the message, that the relay turned down."""

    def __init__(self, sender: str, reply: str, *, code: int) -> None:
        super().__init__(f"sender {sender} refused at MAIL FROM: {reply}", code=code,
                         permanent=500 <= code < 600)  # fmt: skip
        self.sender = sender


class LeaseLost(EmailqError):
    """The job's lease lapsed or passed to another worker before the send: not ours to send."""


class ConfigError(EmailqError):
    """A setting (or a file a setting names) is invalid; the message is one line naming it.

    Every entry point turns it into that line on stderr and exit code 2 (``emailq.startup``).
    """


class RelayUnavailable(SendError):
    """The relay could not be used at all, so the mail was never judged: connection
    refused, DNS, TLS, login, a 4xx/5xx greeting, a timeout or a drop before DATA."""


class RelayThrottled(SendError):
    """The relay answered MAIL, RCPT or DATA with 421, 451 or 454: slow down, try later."""


@contextmanager
def closed_transport_is_dropped() -> Iterator[None]:
    """A write on a transport uvloop has already closed (the peer reset the connection: a
    Redis killed or failed over) as the dropped connection it is. uvloop raises a
    RuntimeError ("unable to perform operation on <TCPTransport closed=True ...>; the
    handler is closed") where asyncio's own loop raises an OSError that redis-py turns into
    a ConnectionError. Nothing was written; seen when a reconnect's HELLO met a killed
    master. redis-py's retry and our store errors then treat it like any other drop."""
    try:
        yield
    except RuntimeError as exc:
        if "handler is closed" not in str(exc):
            raise
        raise RedisConnectionError("connection closed by the server") from exc


def validation_message(error: Mapping[str, Any]) -> str:
    """Pydantic's message for one error, without the "Value error, " it writes before the
    text of a ValueError: our validators word their own messages, and users read them."""
    return str(error.get("msg", "")).removeprefix("Value error, ")
