"""Schemathesis against the real app and a real Redis: every check, no failures.

The schema is the one the app serves (``create_app(...).openapi()``, built without Redis at
import so that pytest can parametrize over its operations); each case is then sent to an
app of this test's own, on the test's Redis, through schemathesis' ASGI transport, which
runs that app's lifespan. API keys are configured, so the bearer scheme, 401 and the admin
scope are exercised; generation is seeded and derandomized, so every run sends the same
cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from emailq.settings import Settings
from server.deps import state_of
from server.main import create_app
from server.openapi import BEARER
from tests.helpers.api import ADMIN, API_KEYS
from tests.helpers.forms import FORMS_TOML

# A send's rules reach past what JSON Schema can say: times relative to now (send_at at
# most 30 days ahead, expires_at in the future), at most 50 recipients across to, cc and
# bcc, header-safe subjects after substitution, addresses email-validator accepts (no
# quoted local parts). A schema-valid request may so be refused 422 (documented as such);
# every other check, and this one's other statuses, stand.
_SEND_RULES = {"positive_data_acceptance": {
    "expected-statuses": ["2xx", "401", "403", "404", "409", "413", "422", "429", "5xx"],
}}  # fmt: skip
# Registering or changing a webhook also checks, beyond JSON Schema, that its URL is not a
# private or link-local target (SSRF) and that each secret is whsec_ + base64 of a bounded
# length: 422.
_WEBHOOK_RULES = _SEND_RULES
CONFIG: dict[str, Any] = {
    "seed": 20250131,
    "generation": {"max-examples": 25, "deterministic": True},
    # Through the schema's own scheme, so the auth checks know the key is a real one and
    # probe with none and with a wrong one.
    "auth": {"openapi": {BEARER: {"bearer": ADMIN}}},
    "operations": [
        *(
            {"include-path": path, "checks": _SEND_RULES}
            for path in ("/api/v1/email/received", "/api/v1/emails/batch")
        ),
        {
            "include-path": "/api/v1/admin/webhooks",
            "include-method": "POST",
            "checks": _WEBHOOK_RULES,
        },
        {
            "include-path": "/api/v1/admin/webhooks/{endpoint_id}",
            "include-method": "PATCH",
            "checks": _WEBHOOK_RULES,
        },
    ],
}


def _schema() -> Any:
    app = create_app(Settings(_env_file=None, api_keys=API_KEYS))  # type: ignore[call-arg]
    config = schemathesis.Config.from_dict(CONFIG)
    loaded = schemathesis.openapi.from_dict(app.openapi(), config=config)
    loaded.app = app  # the ASGI transport; each test passes its own app
    return loaded


schema = _schema()


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[FastAPI]:
    forms = tmp_path / "forms.toml"
    forms.write_text(FORMS_TOML)
    # Every case comes from one address: the failed-authentication throttle (429 after
    # AUTH_FAILURE_LIMIT) would otherwise answer the auth checks' 401 probes.
    app = create_app(make_settings(api_keys=API_KEYS, forms_file=forms,
                                   auth_failure_limit=1_000_000))  # fmt: skip
    # The admin event stream never ends by itself, and a case needs a whole answer: as
    # when the server stops, the stream sends its first frame and ends. Everything before
    # the stream (key, scope, Last-Event-ID, Redis) is checked as ever.
    state_of(app).stopping.set()
    yield app
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_api_answers_as_its_schema_says(case: schemathesis.Case, app: FastAPI) -> None:
    case.call_and_validate(app=app)
