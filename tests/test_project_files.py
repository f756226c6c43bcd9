"""The files a user reads agree with the code: every setting documented, container
commands match the README, the compose file parses."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from emailq.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = sorted(name.upper() for name in Settings.model_fields)


def _same(written: str, default: object) -> bool:
    """Does ``written`` (as in .env.example) denote ``default``?"""
    default = getattr(default, "value", default)  # enums
    if default is None:
        return written == ""
    if isinstance(default, bool):
        return written == str(default).lower()
    if isinstance(default, int | float):
        return float(written) == default
    return written == default


def test_every_setting_is_in_env_example_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    assert sorted(listed) == SETTING_NAMES
    wrong = [
        name for name, field in Settings.model_fields.items()
        if not _same(listed[name.upper()], field.default)
    ]  # fmt: skip
    assert wrong == []


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in SETTING_NAMES if f"`{name}`" not in readme]
    assert missing == []


def test_compose_file_parses_and_runs_the_readme_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "api", "worker", "mailpit"}
    assert services["api"]["command"][:3] == ["python", "-m", "server"]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    # --scale worker=3 needs no fixed name or host port on the worker
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    readme = (ROOT / "README.md").read_text()
    assert "python -m server" in readme
    assert "python -m worker" in readme


def test_dockerfile_is_slim_non_root_and_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.MULTILINE)
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert 'CMD ["python", "-m", "server"' in dockerfile


def test_every_launcher_runs_the_api_as_python_m_server() -> None:
    # Bare uvicorn believes X-Forwarded-For from loopback peers; `python -m server` does not.
    for path in ("emailq/dev.py", "tests/conftest.py"):
        text = (ROOT / path).read_text()
        assert '"-m", "server"' in text or '("server",)' in text, path
    assert '"uvicorn", "server.main:app"' not in (ROOT / "emailq/dev.py").read_text()
