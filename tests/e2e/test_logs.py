"""The logs of the real API and worker processes: one JSON object per line (LOG_FORMAT=auto,
writing to a file), one request id from the POST to the SMTP reply, no secret, no message
content and no recipient address in any line, and no line lost at SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from emailq.settings import Settings
from tests.helpers.api import ALICE, API_KEYS, bearer
from tests.helpers.logs import RFC3339_MS, Piped, events, json_lines
from tests.helpers.polling import read_log, wait_until
from tests.helpers.processes import Procs, settings_env
from tests.helpers.smtpd import Authenticator, RecordingHandler, SmtpServer

SMTP_PASSWORD = "Zq-smtp-pa55-W7xK"  # noqa: S105  # a test relay's, to look for in the logs
SUBJECT = "Subject-Marker-7Q3Z"
BODY = "Body-Marker-K9X2 with private details"
BOUNCED = "secret.person@example.net"
DELIVERED = "another.person@example.org"
WRONG_KEY = "eq_not-a-key-of-ours-0123456789abcdef"


def _send(client: httpx.Client, to: str) -> httpx.Response:
    mail = {"to": to, "subject": SUBJECT, "body": BODY}
    response = client.post("/api/v1/email/received", json=mail, headers=bearer(ALICE))
    assert response.status_code == 202, response.text
    return response


def _settled(client: httpx.Client, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def final() -> bool:
        got = client.get("/api/v1/email/result", params={"task_id": task_id},
                         headers=bearer(ALICE)).json()  # fmt: skip
        found.update(got)
        return got["status"] in ("success", "failed")

    wait_until(final, what=f"task {task_id} to be final")
    return found


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_one_request_id_joins_the_api_and_worker_lines_and_no_secret_is_logged(
    procs: Procs,
    make_settings: Callable[..., Settings],
    smtp_factory: Callable[..., SmtpServer],
) -> None:
    # The relay needs a password and bounces the first mail with a reply that quotes the
    # address, as real relays do.
    bounce = f"550 5.1.1 <{BOUNCED}>: Recipient address rejected"
    smtp = smtp_factory(handler=RecordingHandler(replies=[bounce]),
                        auth=Authenticator("mailer", SMTP_PASSWORD))  # fmt: skip
    settings = make_settings(smtp_port=smtp.port, smtp_user="mailer",
                             smtp_pass=SMTP_PASSWORD, api_keys=API_KEYS)  # fmt: skip
    base = procs.api(settings)
    api = procs.started[-1]
    worker = procs.worker(settings)
    with httpx.Client(base_url=base, timeout=5.0) as client:
        bounced = _send(client, BOUNCED).json()["task_id"]
        assert _settled(client, bounced)["status"] == "failed"
        sent = _send(client, DELIVERED)
        task_id = sent.json()["task_id"]
        result = _settled(client, task_id)
        # Attempts on the way in: a wrong key, and a key pasted into a path.
        assert client.get("/health", headers=bearer(WRONG_KEY)).status_code == 200
        assert client.post("/api/v1/email/received", json={},
                           headers=bearer(WRONG_KEY)).status_code == 401  # fmt: skip
        assert client.get(f"/{ALICE}").status_code == 404
    assert result["status"] == "success"
    assert len(smtp.handler.received) == 1  # the mail really went out, once
    # Both processes flush their queued lines on the way out.
    _stop(worker)
    _stop(api)

    request_id = sent.headers["X-Request-ID"]
    [accepted] = [e for e in events(api, "accepted") if e["task_id"] == task_id]
    [delivered] = [e for e in events(worker, "sent") if e["task_id"] == task_id]
    assert accepted["request_id"] == delivered["request_id"] == request_id
    assert result["request_id"] == request_id  # the task carried it from one to the other
    assert accepted["lane"] == delivered["lane"] == "default"
    assert delivered["attempt"] == 1
    assert delivered["smtp_code"] == 250
    assert delivered["duration_ms"] > 0
    assert delivered["worker_id"].split(":")[1] == str(worker.pid)
    [failed] = [e for e in json_lines(worker) if e.get("task_id") == bounced]
    assert (failed["level"], failed["smtp_code"]) == ("warning", 550)
    assert "<***@example.net>" in failed["event"]  # the reply is logged, the address masked
    [refused] = [e for e in events(api, "request") if e.get("http_status") == 401]
    assert refused["path"] == "/api/v1/email/received"
    for line in json_lines(api) + json_lines(worker):
        assert RFC3339_MS.match(line["time"]), line
        assert {"time", "level", "logger", "event"} <= set(line), line

    logged = read_log(api) + read_log(worker)
    for never in (SMTP_PASSWORD, ALICE, WRONG_KEY, SUBJECT, "Body-Marker", "secret.person",
                  "another.person"):  # fmt: skip
        assert never not in logged, never


def test_a_stalled_log_reader_stalls_neither_process_and_sigterm_loses_no_line(
    procs: Procs, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    # Nobody reads either process's log while mail flows: their pipes fill up and the
    # listener threads block on write. The processes must go on serving (the loop never
    # writes), and on SIGTERM every queued line must still come out.
    settings = make_settings(log_level="DEBUG")  # a request line per POST as well
    api = Piped(procs, [sys.executable, "-m", "server", "--port", "0"], settings)
    port = api.read_until(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")[1]
    worker = Piped(procs, [sys.executable, "-m", "worker"], settings)
    worker.read_until(r"worker \S+ started")
    count = 400
    mail = {"to": "user@example.com", "subject": "s", "body": "b"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
        ids = [client.post("/api/v1/email/received", json=mail).json()["task_id"]
               for _ in range(count)]  # fmt: skip
    wait_until(lambda: len(smtp.handler.received) == count, what=f"{count} mails sent")

    api.proc.send_signal(signal.SIGTERM)
    worker.proc.send_signal(signal.SIGTERM)
    api_lines, worker_lines = api.rest(), worker.rest()

    # uvicorn re-raises SIGTERM after its graceful shutdown; the worker exits by itself.
    assert (api.proc.returncode, worker.proc.returncode) == (-signal.SIGTERM, 0)
    for lines in (api_lines, worker_lines):
        assert len(json.dumps(lines)) > 2 * 65536  # more than a pipe holds: it did fill
    assert sorted(e["task_id"] for e in api_lines if e["event"] == "accepted") == sorted(ids)
    assert api_lines[-1]["event"] == f"Finished server process [{api.proc.pid}]"
    assert sorted(e["task_id"] for e in worker_lines if e["event"] == "sent") == sorted(ids)
    assert worker_lines[-1]["event"].endswith("stopped")


@pytest.mark.parametrize("program", [["server", "--port", "0"], ["worker"], ["worker.webhooks"]])
def test_log_format_text_is_what_every_process_writes(
    program: list[str], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # The webhook dispatcher wrote JSON whatever LOG_FORMAT said (an integrator's
    # walkthrough): it configured its logs with the level alone.
    env = {**settings_env(make_settings(log_format="text")), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *program], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_until(lambda: log.read_text().count("\n") >= 2, what="two log lines", proc=proc)
        finally:
            _stop(proc)
    first, second = log.read_text().splitlines()[:2]
    for line in (first, second):
        assert not line.startswith("{"), line
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ", line)
