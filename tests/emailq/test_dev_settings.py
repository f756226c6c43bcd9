"""`make dev` turns the rate limits off for its children, whatever the environment says."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailq.devtools.runner import DevConfig, _overrides, _with_senders
from emailq.startup import load_settings


def test_make_dev_runs_without_rate_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user's shell or .env might have them for their deployment.
    monkeypatch.setenv("RATE_LIMIT_PER_KEY", "10/minute")
    monkeypatch.setenv("RATE_LIMIT_PER_FORM_ADDRESS", "1/minute")
    monkeypatch.chdir(tmp_path)  # no .env of the worktree
    overrides = _overrides(DevConfig(data_dir=tmp_path / "dev"))
    # The children read their environment with these on top, as the runner starts them.
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.rate_limit_per_key == ""
    assert settings.rate_limit_per_form_address == ""


@pytest.mark.parametrize(
    ("env", "senders"),
    [
        # MAIL_FROM's default domain, localhost, is one no from can use
        ({}, "@example.com,@shop.example.com"),
        ({"MAIL_FROM": "Shop <noreply@shop.example>"}, None),  # its domain is the default
        ({"ALLOWED_SENDERS": "@mine.example"}, None),  # the user's own list stands
    ],
)
def test_make_dev_lets_from_use_example_com_only_when_nothing_else_could_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], senders: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MAIL_FROM", "ALLOWED_SENDERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    overrides = _overrides(DevConfig(data_dir=tmp_path / "dev"))
    _with_senders(overrides, load_settings())
    assert overrides.get("ALLOWED_SENDERS") == senders
