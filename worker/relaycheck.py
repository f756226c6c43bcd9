"""The worker's startup check of its relay: what is wrong, in one line an operator can act on.

A relay that cannot be reached may come up later (it starts after us, it is being
restarted, DNS is not there yet), so the worker keeps running and waits for it. Only an
answer that proves our own settings wrong is fatal, because no amount of waiting fixes
it and mail would pile up behind it unseen:

- SMTP_SECURITY=starttls and the server does not offer STARTTLS;
- SMTP_SECURITY=tls and the server answered in plain text (it expects starttls or none);
- SMTP_USER is set and the server does not offer AUTH on this connection;
- the server refused the login with a 5xx (535: wrong SMTP_USER or SMTP_PASS).

Everything else (refused, DNS, timeouts, an untrusted certificate, a 4xx greeting) is
reported and waited out.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import aiosmtplib

from emailq.errors import RelayUnavailable
from emailq.settings import Settings, SmtpSecurity


@dataclass(frozen=True)
class Diagnosis:
    """One line for the log, and whether it is certainly a configuration error."""

    line: str
    fatal: bool


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def diagnose(exc: RelayUnavailable, settings: Settings) -> Diagnosis:
    """What ``exc`` (from ``Sender.probe``) means for these settings."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    chain = _causes(exc)
    for cause in chain:
        found = _explain(cause, where, settings)
        if found is not None:
            return found
    return Diagnosis(f"SMTP relay {where} is not usable: {exc}; waiting for it", False)


def _explain(cause: BaseException, where: str, settings: Settings) -> Diagnosis | None:
    return _network(cause, where, settings) or _smtp(cause, where, settings)


def _network(cause: BaseException, where: str, settings: Settings) -> Diagnosis | None:
    """Below SMTP: TCP, DNS, TLS, timeouts."""
    if isinstance(cause, ConnectionRefusedError):
        return Diagnosis(f"SMTP relay: connection refused at {where} (nothing listens there: "
                         "wrong SMTP_HOST/SMTP_PORT, or the relay is down); waiting for it",
                         False)  # fmt: skip
    if isinstance(cause, socket.gaierror):
        return Diagnosis(f"SMTP relay: cannot resolve SMTP_HOST {settings.smtp_host!r} "
                         f"({cause}); waiting for it", False)  # fmt: skip
    if isinstance(cause, ssl.SSLCertVerificationError):
        return Diagnosis(f"SMTP relay {where}: its TLS certificate is not trusted "
                         f"({cause.verify_message}); set SMTP_CA_FILE to its CA; waiting",
                         False)  # fmt: skip
    if isinstance(cause, ssl.SSLError) and settings.smtp_security is SmtpSecurity.TLS:
        return Diagnosis(f"SMTP relay {where}: TLS handshake failed ({cause.reason}): the "
                         "server does not speak implicit TLS; try SMTP_SECURITY=starttls "
                         "or none", True)  # fmt: skip
    if isinstance(cause, TimeoutError) and not isinstance(cause, aiosmtplib.SMTPException):
        return Diagnosis(f"SMTP relay: connecting to {where} timed out; waiting for it", False)
    return None


def _smtp(cause: BaseException, where: str, settings: Settings) -> Diagnosis | None:
    """What the server said (or did not say)."""
    text = str(cause)
    if "STARTTLS extension not supported" in text:
        return Diagnosis(f"SMTP relay {where}: server does not offer STARTTLS; try "
                         "SMTP_SECURITY=none or tls", True)  # fmt: skip
    if "AUTH extension is not supported" in text:
        return Diagnosis(f"SMTP relay {where}: server does not offer AUTH on this "
                         "connection; use SMTP_SECURITY=starttls or tls, or leave SMTP_USER "
                         "empty", True)  # fmt: skip
    if isinstance(cause, aiosmtplib.SMTPAuthenticationError):
        fatal = cause.code >= 500
        return Diagnosis(f"SMTP relay {where}: login as SMTP_USER {settings.smtp_user!r} "
                         f"refused: {cause.code} {cause.message}; check SMTP_USER and "
                         "SMTP_PASS" + ("" if fatal else "; waiting"), fatal)  # fmt: skip
    if isinstance(cause, aiosmtplib.SMTPConnectResponseError):
        return Diagnosis(f"SMTP relay {where} refuses service: {cause.code} {cause.message}; "
                         "waiting for it", False)  # fmt: skip
    if isinstance(cause, aiosmtplib.SMTPConnectTimeoutError) and "ready message" in text:
        hint = (
            ""
            if settings.smtp_security is SmtpSecurity.TLS
            else "; if it expects implicit TLS (often port 465), set SMTP_SECURITY=tls"
        )
        return Diagnosis(f"SMTP relay {where}: connected, but no greeting within "
                         f"{settings.smtp_timeout_seconds:g}s{hint}; waiting", False)  # fmt: skip
    if isinstance(cause, aiosmtplib.SMTPConnectTimeoutError):
        return Diagnosis(f"SMTP relay: connecting to {where} timed out; waiting for it", False)
    return None
