"""The files a user reads agree with the code: every setting documented, container
commands match the README, the compose file gives every setting to the containers."""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from emailq.settings import Settings
from server.routes.email import MAX_WAIT_SECONDS

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


def env_example() -> dict[str, str]:
    """Every setting .env.example lists, with its value: those compose gives a value of its
    own (COMPOSE_DEFAULTS) commented out, so a copied .env does not replace it."""
    text = (ROOT / ".env.example").read_text()
    listed = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    commented = dict(re.findall(r"^# ([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    assert sorted(commented) == sorted(COMPOSE_DEFAULTS)
    return {**listed, **commented}


def test_every_setting_is_in_env_example_with_its_default() -> None:
    listed = env_example()
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
    services = compose()["services"]
    assert set(services) >= {"redis", "api", "worker", "mailpit"}
    assert services["api"]["command"][:3] == ["python", "-m", "server"]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert services["webhooks"]["command"] == ["python", "-m", "worker.webhooks"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    # --scale worker=3 needs no fixed name or host port on the worker
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    readme = (ROOT / "README.md").read_text()
    assert "python -m server" in readme
    assert "python -m worker" in readme
    assert "python -m worker.webhooks" in readme


def test_dockerfile_is_slim_non_root_and_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.MULTILINE)
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert 'CMD ["python", "-m", "server"' in dockerfile


def test_every_launcher_runs_the_api_as_python_m_server() -> None:
    # Bare uvicorn believes X-Forwarded-For from loopback peers; `python -m server` does not.
    for path in ("emailq/devtools/runner.py", "tests/helpers/processes.py"):
        text = (ROOT / path).read_text()
        assert '"-m", "server"' in text or '("server",)' in text, path
    assert '"uvicorn", "server.main:app"' not in (ROOT / "emailq/devtools/runner.py").read_text()


def test_dockerfile_has_a_healthcheck_and_pins_its_build_backend() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^HEALTHCHECK .*\n?.*/ready", dockerfile, flags=re.MULTILINE)
    # The wheel is built with the backend from its own hashed lock, in a build stage...
    assert "--require-hashes -r requirements-build.lock" in dockerfile
    assert "pip wheel --no-deps --no-build-isolation" in dockerfile
    build_lock = (ROOT / "requirements-build.lock").read_text()
    assert re.search(r"^setuptools==\S+ \\\n\s+--hash=sha256:", build_lock, flags=re.MULTILINE)
    # ...and the image installs that wheel, never building with the base image's setuptools.
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert "--no-build-isolation" not in final_stage
    assert "pip install --no-deps --no-index /wheels/" in final_stage


# -- docker-compose.yml ----------------------------------------------------------------------

EMAILQ_SERVICES = ("api", "worker", "webhooks")
# Where the containers find Redis and the relay: compose's own services, so that a .env
# written for a host install (SMTP_HOST=localhost) does not point the containers at
# themselves. Overridden only on purpose, through EMAILQ_<NAME>.
FROM_COMPOSE = {
    "REDIS_URL": "redis://redis:6379/0", "SMTP_HOST": "mailpit", "SMTP_PORT": "1025",
    "SMTP_SECURITY": "none", "SMTP_USER": "", "SMTP_PASS": "", "ALLOW_OPEN_RELAY": "true",
}  # fmt: skip
COMPOSE_DEFAULTS = {
    "MAIL_FROM": "emailq <noreply@example.com>",  # a valid sender for Mailpit
    # Each worker's metrics, on for the stack, on the compose network (no published port).
    "WORKER_METRICS_PORT": "9102", "WORKER_METRICS_HOST": "0.0.0.0",
}  # fmt: skip


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def interpolation(value: str) -> tuple[str, str]:
    """``${NAME-default}`` -> (NAME, default); anything else fails the test."""
    found = re.fullmatch(r"\$\{([A-Z_]+)-([^}]*)\}", value)
    assert found, f"{value!r} is not ${{NAME-default}}"
    return found[1], found[2]


def test_compose_gives_every_setting_to_the_containers_with_its_default() -> None:
    services = compose()["services"]
    example = env_example()
    for service in EMAILQ_SERVICES:
        environment = services[service]["environment"]
        assert sorted(environment) == SETTING_NAMES, service  # every setting, nothing else
        for name, value in environment.items():
            source, default = interpolation(value)
            if name in FROM_COMPOSE:
                assert (source, default) == (f"EMAILQ_{name}", FROM_COMPOSE[name])
            else:
                assert source == name  # .env's own name reaches the container
                field = Settings.model_fields[name.lower()]
                expected = COMPOSE_DEFAULTS.get(name, example[name])
                assert default == expected, name
                assert name in COMPOSE_DEFAULTS or _same(default, field.default), name


def test_compose_services_are_healthchecked_pinned_and_drained() -> None:
    services = compose()["services"]
    assert not services["mailpit"]["image"].endswith(":latest")
    assert re.fullmatch(r"axllent/mailpit:v\d+\.\d+\.\d+", services["mailpit"]["image"])
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "python", "-m", "worker", "--check"]
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    grace = int(services["api"]["stop_grace_period"].removesuffix("s"))
    assert grace > MAX_WAIT_SECONDS  # a `wait=` long-poll ends before the SIGKILL
    worker_grace = int(services["worker"]["stop_grace_period"].removesuffix("s"))
    assert worker_grace > Settings.model_fields["worker_shutdown_grace_seconds"].default


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="no docker-compose binary (apt-get install "
                    "docker-compose); the YAML checks above still run")  # fmt: skip
def test_docker_compose_config_with_the_example_env_keeps_the_stack_working(
    tmp_path: Path,
) -> None:
    # What .env.example says to do: `cp .env.example .env && docker compose up`. The
    # containers must still send to Mailpit, and a setting in .env must reach them.
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text()
                                   + "WORKER_CONCURRENCY=5\nRATE_LIMIT_PER_KEY=\n")  # fmt: skip
    done = subprocess.run([str(DOCKER_COMPOSE), "-f", str(ROOT / "docker-compose.yml"),
                           "--project-directory", str(tmp_path), "config"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    for service in EMAILQ_SERVICES:
        env = {k: str(v) for k, v in resolved[service]["environment"].items()}
        assert (env["SMTP_HOST"], env["SMTP_PORT"], env["SMTP_SECURITY"]) == (
            "mailpit", "1025", "none",
        )  # fmt: skip
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["WORKER_CONCURRENCY"] == "5"
        assert env["RATE_LIMIT_PER_KEY"] == ""  # empty means off, not the default
        # compose's own values stand (a copied .env.example turned worker metrics off)
        assert {name: env[name] for name in COMPOSE_DEFAULTS} == COMPOSE_DEFAULTS
        Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports, at any depth (lazy imports inside functions count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _importers(package: str, *forbidden: str) -> dict[str, set[str]]:
    """Modules under ``package`` that import any of ``forbidden`` (or their submodules)."""
    bad: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = {m for m in _imports(path) for f in forbidden if m == f or m.startswith(f + ".")}
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_core_never_imports_the_apps_on_top_of_it() -> None:
    # STYLE.md "The house": the core never imports server/ or worker/; the CLI and the dev
    # tooling sit on top of it, so the core's own modules do not import them either.
    assert _importers("emailq", "server", "worker") == {}
    core = {p: m for p, m in _importers("emailq", "emailq.cli", "emailq.devtools").items()
            if not p.startswith(("emailq/cli/", "emailq/devtools/"))}  # fmt: skip
    assert core == {}
    assert _importers("server", "worker", "emailq.devtools") == {}
    assert _importers("worker", "server", "emailq.devtools") == {}


def test_the_wheel_ships_every_page_file() -> None:
    # /dashboard and /dev/inbox are read from the installed package (server/pages.py): a
    # file left out of package-data is a 404 in the Docker image, not in a checkout.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["server"]  # fmt: skip
    files = [p.relative_to(ROOT / "server").as_posix()
             for p in (ROOT / "server" / "static").rglob("*") if p.is_file()]  # fmt: skip
    assert files
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
