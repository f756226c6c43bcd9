"""FastAPI's native OpenTelemetry: decided once when the app is built (server/main.py).

Left to FastAPI, every request asks OpenTelemetry for its providers. With none set when the
app is built, the app must not ask at all; with one set (as ``opentelemetry-instrument``
does before any app code runs), FastAPI's telemetry must run as it would have."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace

from emailq.errors import ConfigError
from emailq.settings import Settings
from server.main import _UNSET_PROVIDERS, create_app
from tests.helpers.api import local_client, mail


class _Asked:
    """Wraps ``trace.get_tracer_provider``, counting the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, provider: Any = None) -> None:
        self.calls = 0
        real = trace.get_tracer_provider

        def counted() -> Any:
            self.calls += 1
            return provider if provider is not None else real()

        monkeypatch.setattr(trace, "get_tracer_provider", counted)


class _RecordingProvider(trace.TracerProvider):
    """A configured provider, as far as FastAPI can tell (not a proxy, not a no-op one):
    it records the spans started."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        spans = self.spans

        class Tracer(trace.NoOpTracer):
            def start_span(self, name: str, *a: Any, **kw: Any) -> trace.Span:
                spans.append(name)
                return super().start_span(name, *a, **kw)

        return Tracer()


def _send(client: TestClient, count: int) -> None:
    for _ in range(count):
        response = client.post("/api/v1/email/received", json=mail())
        assert response.status_code == 202, response.text


def test_unconfigured_no_request_asks_for_a_provider(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    with local_client(create_app(settings)) as client:
        asked = _Asked(monkeypatch)
        _send(client, 3)
        assert client.get("/health").status_code == 200
    assert asked.calls == 0


def test_the_count_sees_fastapis_own_per_request_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the first test would count without server/main.py's decision: FastAPI's default.
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    with TestClient(app) as client:
        asked = _Asked(monkeypatch)
        for _ in range(3):
            assert client.get("/ping").status_code == 200
    assert asked.calls >= 3


def test_a_provider_set_before_the_app_is_built_gets_fastapis_spans(
    monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings]
) -> None:
    provider = _RecordingProvider()
    _Asked(monkeypatch, provider)
    with local_client(create_app(make_settings())) as client:
        _send(client, 2)
    # A server span a request, named by its method until the route is known (a no-op span
    # takes no new name).
    assert provider.spans == ["POST", "POST"], provider.spans


def test_a_provider_that_does_not_load_stops_the_start_with_its_setting_named(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    # FastAPI alone would fail every request with it; emailq refuses to start instead.
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "no_such_provider")
    with pytest.raises(ConfigError, match="OTEL_PYTHON_TRACER_PROVIDER"):
        create_app(settings)


def test_the_unset_provider_classes_are_fastapis() -> None:
    # server/main.py keeps a copy (FastAPI's is private); an upgrade that changes FastAPI's
    # set fails here rather than quietly bringing the per-request ask back.
    from fastapi.telemetry._api import _DEFERRED_PROVIDERS

    assert _UNSET_PROVIDERS == _DEFERRED_PROVIDERS
