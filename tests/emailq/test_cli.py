"""The ``emailq`` queue commands, run in-process against the real Redis (and, for delivery,
a real worker process and SMTP server)."""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from emailq.cli.main import _parser, main
from emailq.cli.output import Progress, table
from emailq.settings import Settings
from tests.helpers.ports import refused_redis_url
from tests.helpers.processes import Procs
from tests.helpers.smtpd import SmtpServer


@dataclass
class Run:
    """One finished CLI invocation."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Run]


@pytest.fixture
def cli(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Cli:  # fmt: skip
    """``cli("stats", "--json")`` runs ``emailq.cli.main`` with Settings from a clean
    environment pointing at the test Redis, and no .env file (cwd is tmp_path)."""
    for name in list(os.environ):
        if name.startswith(("REDIS_", "SMTP_", "MAX_", "RESULT_", "JOB_", "MAIL_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> Run:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def send(cli: Cli, to: str = "user@example.com", *extra: str) -> str:
    result = cli("send", "--to", to, "--subject", "Hello", "--body", "본문", *extra)
    assert result.code == 0, result.err
    task_id = result.out.strip()
    uuid.UUID(task_id)
    return task_id


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
        + "\n",
        encoding="utf-8",
    )
    return path


# -- send and status, end to end ---------------------------------------------------------


def test_send_from_flags_is_delivered_and_status_waits_for_success(
    cli: Cli, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    procs.worker(make_settings())
    sent = cli(
        "send", "--to", "user@example.com", "--subject", "Hi {username}",
        "--body", "{username}님, 코드는 {code}", "--username", "홍길동", "--var", "code=1234",
        "--cc", "cc@example.com", "--reply-to", "help@example.com", "--priority", "high",
        "--ttl", "300",
    )  # fmt: skip
    assert sent.code == 0, sent.err
    task_id = sent.out.strip()

    waited = cli("status", task_id, "--wait", "10", "--json")
    assert waited.code == 0
    record = waited.json()
    assert record["task_id"] == task_id
    assert record["status"] == "success"
    assert record["priority"] == "high"
    assert record["attempts"] == 1
    assert record["attempt_log"][0]["outcome"] == "success"
    datetime.fromisoformat(record["sent_at"])  # RFC 3339, as the API writes times

    [mail] = [r for r in smtp.handler.received if r.task_id == task_id]
    assert mail.message["Subject"] == "Hi 홍길동"
    assert "홍길동님, 코드는 1234" in mail.message.get_body().get_content()  # type: ignore[union-attr]
    assert sorted(mail.rcpt_tos) == ["cc@example.com", "user@example.com"]
    assert mail.message["Reply-To"] == "help@example.com"

    shown = cli("status", task_id)
    assert shown.code == 0
    assert "status      success" in shown.out
    assert "OUTCOME" in shown.out  # the attempt log's table header


def test_send_file_queues_the_good_lines_and_reports_the_bad_ones(
    cli: Cli, tmp_path: Path, procs: Procs, make_settings: Callable[..., Settings],
    smtp: SmtpServer,
) -> None:  # fmt: skip
    path = write_lines(tmp_path / "messages.jsonl", [
        {"to": "a@example.com", "subject": "one", "body": "{username}님", "username": "홍길동"},
        {"to": "not-an-address", "subject": "two", "body": "x"},
        {"to": "c@example.com", "subject": "three", "body": "x", "priority": "low"},
        '{"to": "d@example.com", "subject": ',
        {"to": "e@example.com", "subject": "five", "body": "x", "variables": {"k": "v"}},
    ])  # fmt: skip
    result = cli("send", "--file", str(path), "--json")
    # Some lines were rejected: exit 1, though the good ones are queued.
    assert result.code == 1
    report = result.json()
    assert [q["line"] for q in report["queued"]] == [1, 3, 5]
    assert [r["line"] for r in report["rejected"]] == [2, 4]
    assert report["rejected"][0]["error"].startswith("to:")
    assert "JSON" in report["rejected"][1]["error"]
    # As the README shows it: no "Value error, " before the reason.
    not_an_address = "value is not a valid email address: An email address must have an @-sign."
    assert f"line 2: to: {not_an_address}" in result.err
    assert "queued 3, rejected 2" in result.err

    procs.worker(make_settings())
    ids = [q["task_id"] for q in report["queued"]]
    for task_id in ids:
        assert cli("status", task_id, "--wait", "10").code == 0
    assert sorted(smtp.handler.task_ids()) == sorted(ids)


def test_send_file_in_text_mode_prints_a_table_and_draws_progress(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = [{"to": f"u{i}@example.com", "subject": "s", "body": "b"} for i in range(3)]
    path = write_lines(tmp_path / "ok.jsonl", [*messages, ""])  # a blank line is skipped
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    result = cli("send", "--file", str(path))
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].split() == ["LINE", "TASK_ID"]
    assert len(result.out.splitlines()) == 4
    assert "\rsending [" in result.err
    assert "4/4 100%" in result.err


def test_send_file_enqueues_in_chunks(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emailq.cli import commands

    calls: list[int] = []
    original = commands.Queue.enqueue_many

    async def counting(self: Any, items: Any) -> None:
        calls.append(len(items))
        await original(self, items)

    monkeypatch.setattr(commands.Queue, "enqueue_many", counting)
    messages = [{"to": f"u{i}@example.com", "subject": "s", "body": "b"} for i in range(20)]
    path = write_lines(tmp_path / "many.jsonl", messages)
    monkeypatch.setattr(commands, "send_file", _with_chunk(commands.send_file, 7))
    result = cli("send", "--file", str(path), "--json")
    assert result.code == 0
    assert calls == [7, 7, 6]
    assert len(result.json()["queued"]) == 20
    assert cli("stats", "--json").json()["lanes"][1]["depth"] == 20


def _with_chunk(fn: Callable[..., Any], size: int) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, chunk_size=size, **kwargs)

    return wrapped


def test_invalid_send_is_refused_with_the_reason(cli: Cli) -> None:
    result = cli("send", "--to", "nobody", "--subject", "s", "--body", "b")
    assert result.code == 1
    assert "not queued: to:" in result.err
    assert result.out == ""
    ahead = (datetime.now(UTC) + timedelta(days=31)).isoformat()
    result = cli("send", "--to", "a@example.com", "--subject", "s", "--body", "b",
                 "--send-at", ahead)  # fmt: skip
    assert result.code == 1
    assert "30 days" in result.err


def test_scheduled_send_is_pending_with_its_time_and_counted(cli: Cli) -> None:
    at = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    task_id = send(cli, "a@example.com", "--send-at", at.isoformat())
    result = cli("status", task_id, "--json")
    assert result.code == 2  # pending
    assert datetime.fromisoformat(result.json()["scheduled_at"]) == at
    assert cli("stats", "--json").json()["scheduled"] == 1


def test_status_of_a_pending_task_after_wait_exits_2(cli: Cli) -> None:
    task_id = send(cli)
    result = cli("status", task_id, "--wait", "0.2", "--json")
    assert result.code == 2
    assert result.json()["status"] == "pending"


def test_unknown_task_exits_3(cli: Cli) -> None:
    missing = str(uuid.uuid4())
    result = cli("status", missing, "--json")
    assert result.code == 3
    assert result.json() == {"task_id": missing, "status": "unknown"}
    result = cli("status", missing, "--wait", "0.1")
    assert result.code == 3
    assert "no task" in result.err
    assert cli("cancel", missing).code == 3


# -- operating: failed, requeue, cancel, stats -------------------------------------------


def test_cancel_failed_requeue_and_stats_round_trip(cli: Cli) -> None:
    ids = [send(cli, f"u{i}@example.com") for i in range(3)]
    cancelled = cli("cancel", ids[0], "--json")
    assert cancelled.code == 0
    assert cancelled.json() == {"task_id": ids[0], "result": "cancelled"}
    assert cli("cancel", ids[1]).out.strip() == f"cancelled {ids[1]}"
    again = cli("cancel", ids[1], "--json")
    assert again.code == 1
    assert again.json()["result"] == "failed"

    listed = cli("failed", "--json").json()
    assert [t["task_id"] for t in listed["tasks"]] == [ids[1], ids[0]]  # newest first
    assert {t["reason"] for t in listed["tasks"]} == {"cancelled"}
    assert [t["task_id"] for t in cli("failed", "--json", "--limit", "1", "--offset", "1")
            .json()["tasks"]] == [ids[0]]  # fmt: skip
    text = cli("failed").out
    assert text.splitlines()[0].split() == ["TASK_ID", "FAILED_AT", "TO", "ATTEMPTS", "REASON"]
    assert ids[0] in text

    stats = cli("stats", "--json").json()
    assert {lane["priority"]: lane["depth"] for lane in stats["lanes"]}["default"] == 1
    assert stats["failed"] == 2
    assert stats["failed_last_minute"] == 2

    requeued = cli("requeue", ids[0], ids[2], "--json")
    assert requeued.code == 1  # ids[2] was never failed
    assert requeued.json() == {"requeued": [ids[0]], "skipped": [ids[2]]}
    assert f"not requeued: {ids[2]}" in requeued.err
    record = cli("status", ids[0], "--json").json()
    assert record["status"] == "pending"
    assert [entry["outcome"] for entry in record["attempt_log"]] == ["cancelled", "requeued"]

    everything = cli("requeue", "--all")
    assert everything.code == 0
    assert everything.out.strip() == "requeued 1 of 1"
    stats = cli("stats", "--json").json()
    assert stats["failed"] == 0
    assert {lane["priority"]: lane["depth"] for lane in stats["lanes"]}["default"] == 3
    assert cli("failed", "--json").json()["tasks"] == []


def test_stats_table_has_headers(cli: Cli) -> None:
    send(cli, "a@example.com", "--priority", "low")
    result = cli("stats")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["PRIORITY", "DEPTH", "OLDEST"]
    assert lines[3].split()[:2] == ["low", "1"]
    assert "COUNTER" in result.out
    assert "live workers" in result.out


def test_bulk_requeue_goes_in_chunks_with_progress(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [send(cli, f"u{i}@example.com") for i in range(5)]
    for task_id in ids:
        assert cli("cancel", task_id).code == 0
    from emailq.cli import commands

    calls: list[int] = []
    original = commands.Queue.requeue

    async def counting(self: Any, task_ids: Any) -> list[str]:
        calls.append(len(task_ids))
        return await original(self, task_ids)

    monkeypatch.setattr(commands.Queue, "requeue", counting)
    monkeypatch.setattr(commands, "requeue", _with_chunk(commands.requeue, 2))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    result = cli("requeue", "--all", "--json")
    assert result.code == 0
    assert sorted(result.json()["requeued"]) == sorted(ids)
    assert calls == [2, 2, 1]
    assert "\rrequeueing [" in result.err
    assert "5/5 100%" in result.err


def test_a_dead_letter_requeued_from_the_cli_is_sent_once(
    cli: Cli, procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    smtp.handler.replies = ["550 5.1.1 no such user"]
    procs.worker(make_settings())
    task_id = send(cli)
    failed = cli("status", task_id, "--wait", "10", "--json")
    assert failed.code == 1
    assert failed.json()["status"] == "failed"
    [dead] = cli("failed", "--json").json()["tasks"]
    assert dead["task_id"] == task_id
    assert dead["attempt_log"][0]["code"] == 550

    assert cli("requeue", task_id).code == 0
    sent = cli("status", task_id, "--wait", "10", "--json")
    assert sent.code == 0
    assert [e["outcome"] for e in sent.json()["attempt_log"]] == ["failed", "requeued", "success"]
    assert smtp.handler.task_ids() == [task_id]


# -- errors and the parser ---------------------------------------------------------------


def test_redis_down_exits_4_naming_the_url(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    with refused_redis_url() as url:
        monkeypatch.setenv("REDIS_URL", url)
        result = cli("stats")
    assert result.code == 4
    assert "Redis is unavailable" in result.err
    assert f"REDIS_URL={url}" in result.err  # where it looked, so a wrong URL is plain
    assert len(result.err.strip().splitlines()) == 1


def test_missing_file_is_reported(cli: Cli, tmp_path: Path) -> None:
    result = cli("send", "--file", str(tmp_path / "nope.jsonl"))
    assert result.code == 1
    assert "nope.jsonl" in result.err


def test_a_file_that_is_not_utf8_stops_with_a_reason(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"to": "a@example.com", "subject": "s", "body": "b"}\n\xff\xfe\n')
    result = cli("send", "--file", str(path), "--json")
    assert result.code == 1
    assert "not UTF-8" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "--to", "a@example.com"],
        ["send", "--file", "x.jsonl", "--to", "a@example.com"],
        ["requeue"],
        ["requeue", "id", "--all"],
        ["failed", "--limit", "0"],
        ["send", "--to", "a@example.com", "--subject", "s", "--body", "b", "--var", "novalue"],
    ],
)
def test_usage_errors_exit_2(cli: Cli, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_dev_and_capture_still_parse() -> None:
    dev = _parser().parse_args(["dev", "--port", "9000"])
    assert (dev.command, dev.port, dev.smtp_port) == ("dev", 9000, 1025)
    capture = _parser().parse_args(["capture", "--port", "2525"])
    assert (capture.command, capture.port) == ("capture", 2525)


# -- formatting --------------------------------------------------------------------------


def test_table_aligns_columns() -> None:
    assert table(["A", "LONGER"], [("xyz", 1), ("q", None)]) == "A    LONGER\nxyz  1\nq    -"


def test_progress_draws_only_on_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("work", 4, stream, enabled=True) as bar:
        bar.advance(4)
    assert stream.getvalue().endswith("\rwork [" + "#" * 30 + "] 4/4 100%\n")
    quiet = io.StringIO()
    with Progress("work", 4, quiet, enabled=False) as bar:
        bar.advance(4)
    assert quiet.getvalue() == ""


def test_a_full_store_exits_4_naming_the_limit(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    send(cli)
    held = int(redis.Redis.from_url(redis_url).hget("{emailq}:stored", "total") or 0)
    monkeypatch.setenv("MAX_STORED_BYTES", str(held + 10))  # no room for another
    result = cli("send", "--to", "user@example.com", "--subject", "Hi", "--body", "more")
    assert result.code == 4
    assert "MAX_STORED_BYTES" in result.err
    assert "is Redis running" not in result.err  # it answered: only the room is missing
    assert len(redis.Redis.from_url(redis_url).keys("{emailq}:task:*")) == 1
