"""``emailq send --template``: the CLI renders stored templates through the same pipeline
as the API, against the real Redis."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from emailq.cli.main import main
from emailq.models import Job
from emailq.queue import Keys
from tests.helpers.templates import EXAMPLES, OTP_SUBJECT, otp_text, write_templates

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Cli:  # fmt: skip
    """``main(argv)`` with TEMPLATES_DIR set to the shipped examples; (code, out, err)."""
    for name in list(os.environ):
        if name.startswith(("REDIS_", "SMTP_", "MAX_", "TEMPLATES_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TEMPLATES_DIR", str(EXAMPLES))
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def stored(redis_url: str, task_id: str) -> Job:
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return Job.model_validate_json(store.hget(Keys().task(task_id), "job") or "")
    finally:
        store.close()


def test_send_with_a_template_queues_the_rendered_mail(cli: Cli, redis_url: str) -> None:
    code, out, err = cli("send", "--to", "user@example.com", "--template", "otp",
                         "--var", "code=123456")  # fmt: skip
    assert code == 0, err
    job = stored(redis_url, str(uuid.UUID(out.strip())))
    assert (job.subject, job.text) == (OTP_SUBJECT, otp_text("123456"))


def test_send_file_lines_may_name_a_template(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    lines = [{"to": "a@example.com", "template": "otp", "variables": {"code": "1"}},
             {"to": "b@example.com", "template": "otp"}]  # fmt: skip
    path = tmp_path / "mail.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, _ = cli("send", "--file", str(path), "--json")
    assert code == 1  # one line rejected
    report = json.loads(out)
    assert [r["line"] for r in report["queued"]] == [1]
    assert stored(redis_url, report["queued"][0]["task_id"]).text == otp_text("1")
    assert "variable 'code' is not given" in report["rejected"][0]["error"]


def test_a_template_with_its_own_subject_is_refused(cli: Cli) -> None:
    code, out, err = cli("send", "--to", "user@example.com", "--template", "otp",
                         "--subject", "mine", "--var", "code=1")  # fmt: skip
    assert (code, out) == (1, "")
    assert "give a template or subject, not both" in err


def test_send_needs_to_with_a_template(cli: Cli) -> None:
    with pytest.raises(SystemExit) as usage:
        cli("send", "--template", "otp")
    assert usage.value.code == 2


def test_a_bad_templates_dir_stops_send_but_not_other_commands(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = write_templates(tmp_path / "bad", {"otp": {"subject": "s", "body": "{% for %}"}})
    monkeypatch.setenv("TEMPLATES_DIR", str(bad))
    with pytest.raises(SystemExit) as stopped:
        cli("send", "--to", "user@example.com", "--template", "otp")
    assert stopped.value.code == 2
    assert cli("stats", "--json")[0] == 0  # a broken template must not stop the operator
