"""Signatures exactly as the Standard Webhooks spec has them, checked with its reference
library (``standardwebhooks``) and its published test vector."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks import Webhook

from emailq.webhooks.signing import headers, new_secret, secret_key, signature


def test_every_secret_signs_and_the_reference_library_verifies_each() -> None:
    current, previous = new_secret(), new_secret()
    body = json.dumps({"type": "email.sent", "data": {"to": "éa@example.com"}},
                      ensure_ascii=False).encode()  # fmt: skip
    sent = headers([current, previous], "msg_abc", int(time.time()), body)
    assert sent["webhook-signature"].count("v1,") == 2
    for secret in (current, previous):
        assert Webhook(secret).verify(body, sent)["type"] == "email.sent"
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(new_secret()).verify(body, sent)


def test_the_spec_test_vector() -> None:
    # standard-webhooks' own libraries test against this secret, id, time and body.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 (the spec's test vector)
    got = signature([secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                    b'{"test": 2432232314}')  # fmt: skip
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "bad", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_!!!!", "whsec_c2hvcnQ=",
            "whsec_" + "A" * 100],
)  # fmt: skip
def test_a_secret_that_is_not_one_is_refused_without_being_echoed(bad: str) -> None:
    with pytest.raises(ValueError, match="secret") as caught:
        secret_key(bad)
    assert bad.removeprefix("whsec_") not in str(caught.value) or not bad.removeprefix("whsec_")
