"""Signing secrets and signatures exactly as the Standard Webhooks spec has them.

A secret is ``whsec_`` + standard base64 of 24 to 64 random bytes; the HMAC key is the
decoded bytes. ``webhook-signature`` holds ``v1,<base64 HMAC-SHA256 of
"{webhook-id}.{webhook-timestamp}.{body}">`` once per current secret, space separated, so
a receiver that knows any one of them verifies it while a secret is being rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 (the spec's prefix, not a secret)
SECRET_BYTES = 32  # generated secrets; the spec asks 24 to 64 bytes
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64


def new_secret() -> str:
    """A fresh random signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``; ValueError (never quoting it) if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a secret starts with 'whsec_' followed by base64")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a secret is 'whsec_' followed by standard base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret must decode to {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} "
                         "bytes")  # fmt: skip
    return key


def signature(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,`` signature per secret."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), signed, hashlib.sha256).digest()).decode()
        for s in secrets_
    )


def headers(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt (``timestamp``: Unix seconds)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secrets_, msg_id, timestamp, body),
    }


def mask(secret: str) -> str:
    """A secret as lists show it: enough to tell two apart, not enough to sign."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"
