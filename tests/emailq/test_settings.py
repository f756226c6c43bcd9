"""Settings: the original service's environment names, defaults and checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from emailq.settings import Settings, SmtpSecurity

ENV_NAMES = [
    "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASS", "SMTP_SECURITY", "MAIL_FROM",
    "MAX_ATTEMPTS", "RESULT_TTL_SECONDS", "MAX_BODY_BYTES", "REDIS_URL", "SMTP_CA_FILE",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from this process's own environment must not leak into the tests."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_defaults() -> None:
    s = settings()
    assert s.max_attempts == 3
    assert s.result_ttl_seconds == 604800
    assert s.max_body_bytes == 1048576
    assert s.smtp_user is None
    assert s.smtp_pass is None
    assert s.smtp_security is SmtpSecurity.STARTTLS


def test_environment_names_map_to_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SMTP_HOST": "smtp.example.com", "SMTP_PORT": "465", "SMTP_USER": "mailer",
        "SMTP_PASS": "hunter2", "SMTP_SECURITY": "tls", "MAX_ATTEMPTS": "5",
        "RESULT_TTL_SECONDS": "60", "MAX_BODY_BYTES": "2048",
        "MAIL_FROM": "App <noreply@example.com>", "REDIS_URL": "redis://redis:6379/1",
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = settings()
    assert (s.smtp_host, s.smtp_port, s.smtp_user) == ("smtp.example.com", 465, "mailer")
    assert s.smtp_pass is not None
    assert s.smtp_pass.get_secret_value() == "hunter2"
    assert s.smtp_security is SmtpSecurity.TLS
    assert (s.max_attempts, s.result_ttl_seconds, s.max_body_bytes) == (5, 60, 2048)
    assert s.mail_from == "App <noreply@example.com>"
    assert s.mail_from_address == "noreply@example.com"
    assert s.redis_url == "redis://redis:6379/1"


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("SMTP_HOST=relay.example.com\nSMTP_USER=\nMAX_ATTEMPTS=7\n")
    s = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert (s.smtp_host, s.smtp_user, s.max_attempts) == ("relay.example.com", None, 7)


@pytest.mark.parametrize("name", ["SMTP_USER", "SMTP_PASS", "SMTP_CA_FILE"])
def test_empty_value_means_unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "")
    assert getattr(settings(), name.lower()) is None


def test_password_is_secret_and_hidden_from_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASS", "hunter2")
    s = settings()
    assert isinstance(s.smtp_pass, SecretStr)
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s)
    assert "hunter2" not in repr(s.smtp_pass)
    assert "hunter2" not in s.model_dump_json()


@pytest.mark.parametrize(
    "mail_from",
    ["not-an-address", "", "App <>", "a@example.com\r\nBcc: evil@example.com", "a@b.com\0"],
)
def test_bad_mail_from_is_rejected(mail_from: str) -> None:
    with pytest.raises(ValidationError):
        settings(mail_from=mail_from)


def test_bad_mail_from_from_the_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_FROM", "nobody")
    with pytest.raises(ValidationError):
        settings()


@pytest.mark.parametrize(
    "values",
    [
        {"smtp_port": 0},
        {"smtp_port": 70000},
        {"max_attempts": 0},
        {"max_body_bytes": 10},
        {"smtp_security": "ssl"},
        {"redis_key_prefix": "a}b"},
    ],
)
def test_out_of_range_values_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settings(**values)


def test_request_limit_leaves_room_for_json_escaping() -> None:
    s = settings(max_body_bytes=4096)
    assert s.max_request_bytes >= 2 * 4096
