"""A first day that goes wrong gently: the dev runner and every entry point, run for real.

Each test is a row of issue 10's table: `make dev | tee log` then Ctrl-C (orphans, and a
capture server answering 500); `make dev` again (Redis on a random port); a busy port, a bad
setting, a missing FORMS_FILE (a banner, then a traceback).
"""

from __future__ import annotations

import os
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest

from emailq.settings import Settings
from emailq.startup import misspelt_settings
from emailq.webhooks.signing import new_secret
from tests.helpers.polling import BOUND, wait_until
from tests.helpers.ports import port_of, refused_port
from tests.helpers.webhooks import receiving

PY = sys.executable
API = [PY, "-m", "uvicorn", "server.main:app", "--host", "127.0.0.1", "--port", "0"]


def clean_env() -> dict[str, str]:
    """This environment without any emailq setting, so only what a test sets applies."""
    return {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}


@contextmanager
def held_ports(count: int) -> Iterator[list[socket.socket]]:
    """``count`` ports nobody else can take while held (bound, not listening)."""
    with ExitStack() as stack:
        yield [stack.enter_context(refused_port()) for _ in range(count)]


def dev_args(data_dir: Path, api: int, redis: int, smtp: int) -> list[str]:
    return [PY, "-m", "emailq.cli", "dev", "--data-dir", str(data_dir), "--port", str(api),
            "--redis-port", str(redis), "--smtp-port", str(smtp)]  # fmt: skip


# -- a bad setting is one line and exit 2, wherever it is read ------------------------------

BAD_SETTINGS = [
    ("MAX_ATTEMPTS", "abc", "emailq: MAX_ATTEMPTS: must be an integer (got 'abc')"),
    ("LOG_LEVEL", "verbose",
     "emailq: LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (got 'verbose')"),
]  # fmt: skip


def entry_point(name: str, tmp_path: Path, ports: list[socket.socket]) -> list[str]:
    api, redis, smtp = (port_of(s) for s in ports)
    return {
        "api": API,
        "worker": [PY, "-m", "worker"],
        "cli": [PY, "-m", "emailq.cli", "stats"],
        # Held ports: had the setting passed, the runner would stop at the port check, not
        # start on ports that belong to someone's `make dev`.
        "dev": dev_args(tmp_path / "dev", api, redis, smtp),
    }[name]


@pytest.mark.parametrize(("name", "value", "line"), BAD_SETTINGS, ids=["int", "log-level"])
@pytest.mark.parametrize("program", ["api", "worker", "cli", "dev"])
def test_a_bad_setting_is_one_line_and_exit_2(
    program: str, name: str, value: str, line: str, tmp_path: Path
) -> None:
    with held_ports(3) as ports:
        done = subprocess.run(entry_point(program, tmp_path, ports), cwd=tmp_path,
                              env={**clean_env(), name: value}, capture_output=True,
                              timeout=60, check=False)  # fmt: skip
    err = done.stderr.decode()
    assert (done.returncode, err.strip()) == (2, line), err
    assert done.stdout == b""  # no banner saying it is running
    assert not (tmp_path / "dev").exists()  # the runner started nothing


def test_a_missing_forms_file_stops_the_api_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "forms.toml"
    done = subprocess.run(API, cwd=tmp_path,
                          env={**clean_env(), "FORMS_FILE": str(missing)}, capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    err = done.stderr.decode().strip()
    assert done.returncode == 2, err
    assert err.startswith(f"emailq: FORMS_FILE {missing}: ")
    assert "No such file" in err
    assert len(err.splitlines()) == 1


def test_a_settings_file_with_a_bad_value_is_one_line_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKER_CONCURRENCY=0\n")
    done = subprocess.run([PY, "-m", "worker"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    err = done.stderr.decode().strip()
    assert (done.returncode, err) == (2, "emailq: WORKER_CONCURRENCY: must be at least 1 (got '0')")


def test_misspelt_setting_names_are_found_in_env_file_and_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "MAX_ATTEMTPS=5\nCOMPOSE_PROJECT_NAME=shop\nmail_from=a@example.com\n"
        "SMTP_PASSWORD=s3cret\nEMAILQ_SMTP_HOST=relay\n"
        "REDIS_SENTINEL_PASSWORD:hunter2\n"
    )  # a malformed line: never echoed
    environ = {"LOG_LEVELS": "debug", "MAIL": "/var/mail/root", "PATH": "/bin", "REDIS_URL": "x",
               # other tools' names, close to a setting but not close enough in the environment
               "WEB_CONCURRENCY": "4", "REDIS_SENTINEL_PORT": "tcp://10.0.0.9:26379",
               "SMTP_PROT": "25"}  # fmt: skip
    warnings = misspelt_settings(env_file, environ)
    assert warnings == [
        f"{env_file} sets MAX_ATTEMTPS, which is no setting (did you mean MAX_ATTEMPTS?); it "
        "is ignored",
        f"{env_file} sets SMTP_PASSWORD, which is no setting (did you mean SMTP_PASS?); it is "
        "ignored",
        "the environment sets LOG_LEVELS, which is no setting (did you mean LOG_LEVEL?); it is "
        "ignored",
    ]  # fmt: skip
    assert not any("hunter2" in w or "s3cret" in w for w in warnings)
    assert misspelt_settings(tmp_path / "none", {}) == []


def test_a_misspelt_setting_in_env_is_warned_of_once_and_the_program_runs(
    tmp_path: Path, redis_url: str
) -> None:
    # A new user's .env: the typo used to leave the default in force without a word.
    (tmp_path / ".env").write_text(f"REDIS_URL={redis_url}\nMAX_ATTEMTPS=5\n")
    done = subprocess.run([PY, "-m", "emailq.cli", "stats"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("emailq: warning: .env sets MAX_ATTEMTPS, which is no setting (did "
                           "you mean MAX_ATTEMPTS?); it is ignored\n")  # fmt: skip


def test_a_secret_is_never_echoed() -> None:
    from emailq.startup import ConfigError, load_settings

    with pytest.raises(ConfigError) as bad:
        load_settings(_env_file=None, redis_url=12345678, smtp_pass=["hunter2-secret"])
    assert "hunter2" not in str(bad.value)
    assert "12345678" not in str(bad.value)
    assert "SMTP_PASS" in str(bad.value)
    assert "\n" not in str(bad.value)


# -- a busy port ------------------------------------------------------------------------------


def test_a_busy_port_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    with held_ports(2) as (api, smtp), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # someone else's server on the Redis port
        redis = port_of(taken)
        done = subprocess.run(dev_args(tmp_path / "dev", port_of(api), redis, port_of(smtp)),
                              cwd=tmp_path, env=clean_env(), capture_output=True, timeout=60,
                              check=False)  # fmt: skip
    err = done.stderr.decode().strip()
    assert done.returncode == 2, err
    assert len(err.splitlines()) == 1
    assert f"port {redis} (Redis) is already in use" in err
    assert "make dev REDIS_PORT=" in err
    assert done.stdout == b""
    assert not (tmp_path / "dev" / "redis").exists()  # no Redis was started


# -- make dev | tee log, then Ctrl-C ------------------------------------------------------------


class Dev:
    """``emailq dev`` with its stdout on a pipe we can close, as `| tee log` would."""

    def __init__(self, tmp_path: Path, ports: tuple[int, int, int]) -> None:
        self.api, self.redis, self.smtp = ports
        self.stderr_path = tmp_path / f"dev-{self.redis}.err"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(dev_args(tmp_path / "dev", *ports), cwd=tmp_path,
                                         env=clean_env(), stdout=subprocess.PIPE,
                                         stderr=err)  # fmt: skip
        self.out = ""

    def read_banner(self) -> str:
        """stdout up to the banner's last line; fails if the runner exits first."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 3 * BOUND
        while "Press Ctrl-C" not in self.out:
            assert self.proc.poll() is None, f"dev exited {self.proc.returncode}: {self.err()}"
            assert time.monotonic() < deadline, f"no banner: {self.out!r} {self.err()}"
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                self.out += os.read(self.proc.stdout.fileno(), 65536).decode(errors="replace")
        return self.out

    def err(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def children(self) -> list[int]:
        """Pids whose parent is the runner (its servers)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alive(pid: int) -> bool:
    """Is ``pid`` a running (not zombie) process?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def send_mail(port: int) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "after tee died"
    msg.set_content("hello")
    with smtplib.SMTP("127.0.0.1", port, timeout=BOUND) as client:
        client.send_message(msg)  # raises unless 250


def start_dev(tmp_path: Path) -> Dev:
    """The runner on three free ports; a port some other process took between choosing and
    binding it (exit 2, "already in use") is retried with fresh ones."""
    for _ in range(3):
        with held_ports(3) as socks:
            ports = (port_of(socks[0]), port_of(socks[1]), port_of(socks[2]))
        dev = Dev(tmp_path, ports)
        try:
            dev.read_banner()
            return dev
        except AssertionError:
            if dev.proc.wait() != 2 or "already in use" not in dev.err():
                raise
    raise AssertionError("no free ports in three tries")


def test_ctrl_c_after_the_console_pipe_closed_stops_every_child(tmp_path: Path) -> None:
    dev = start_dev(tmp_path)
    try:
        banner = dev.out
        assert f"export REDIS_URL=redis://127.0.0.1:{dev.redis}/0" in banner
        assert f"PORT={dev.api}" in banner
        assert f"SMTP_PORT={dev.smtp}" in banner
        # The example templates (the original's Korean OTP mail) are served, and shown.
        assert '"template":"otp"' in banner
        listed = httpx.get(f"http://127.0.0.1:{dev.api}/api/v1/templates", timeout=BOUND)
        assert [t["name"] for t in listed.json()["templates"]] == ["otp"]
        children = dev.children()
        assert len(children) == 5  # Redis, capture server, API, worker, dispatcher

        # `make dev` again while it runs: one line, exit 2, naming the setting to change.
        again = subprocess.run(dev_args(tmp_path / "dev2", dev.api, dev.redis, dev.smtp),
                               cwd=tmp_path, env=clean_env(), capture_output=True, timeout=60,
                               check=False)  # fmt: skip
        err = again.stderr.decode().strip()
        assert again.returncode == 2
        assert f"port {dev.redis} (Redis) is already in use" in err
        assert len(err.splitlines()) == 1

        assert dev.proc.stdout is not None
        dev.proc.stdout.close()  # `tee` is gone: every write to the console now fails
        send_mail(dev.smtp)  # still 250: the capture server's broken console is not the mail's
        dev.proc.send_signal(signal.SIGINT)
        assert dev.proc.wait(timeout=3 * BOUND) == 0, dev.err()

        assert [pid for pid in children if alive(pid)] == []
        assert not any(listening(port) for port in (dev.api, dev.redis, dev.smtp))
        assert len(list((tmp_path / "dev" / "mail").glob("*.eml"))) == 1
    finally:
        dev.stop()

    # `make dev` again at once: the same ports, so the CLI finds the same Redis.
    second = Dev(tmp_path, (dev.api, dev.redis, dev.smtp))
    try:
        assert f"export REDIS_URL=redis://127.0.0.1:{dev.redis}/0" in second.read_banner()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=3 * BOUND) == 0, second.err()
    finally:
        second.stop()


def test_a_webhook_registered_in_make_dev_is_delivered_signed(tmp_path: Path) -> None:
    """The banner's webhook example, with a receiver on this machine: `make dev` runs the
    dispatcher and lets a local endpoint be registered, so the first webhook a developer
    tries is delivered (and verifies with the Standard Webhooks library)."""
    secret = new_secret()
    dev = start_dev(tmp_path)
    try:
        assert "/api/v1/admin/webhooks" in dev.out
        api = f"http://127.0.0.1:{dev.api}"
        with receiving([secret], lambda _msg_id, _nth: 200) as receiver:
            made = httpx.post(f"{api}/api/v1/admin/webhooks", timeout=BOUND,
                              json={"url": receiver.url, "events": ["email.sent"],
                                    "secrets": [secret]})  # fmt: skip
            assert made.status_code == 201, made.text
            sent = httpx.post(
                f"{api}/api/v1/email/received",
                timeout=BOUND,
                json={"to": "user@example.com", "subject": "hi", "body": "hello"},
            )
            assert sent.status_code == 202, sent.text
            task_id = sent.json()["task_id"]
            wait_until(lambda: receiver.accepted() != {}, what="the email.sent webhook")
            payloads = [p for ps in receiver.accepted().values() for p in ps]
        assert receiver.unverified == []
        assert [(p["type"], p["data"]["task_id"]) for p in payloads] == [("email.sent", task_id)]
        children = dev.children()
        dev.proc.send_signal(signal.SIGTERM)
        assert dev.proc.wait(timeout=3 * BOUND) == 0, dev.err()
        assert [pid for pid in children if alive(pid)] == []  # the dispatcher stopped too
    finally:
        dev.stop()


def test_the_readmes_from_and_the_banners_cli_exports_work_in_make_dev(tmp_path: Path) -> None:
    """A new user's first `from` and first CLI template send, copied from the README: both
    used to be refused in `make dev` (403 for the from; "no templates here" from the CLI,
    whose shell had only REDIS_URL)."""
    dev = start_dev(tmp_path)
    try:
        api = f"http://127.0.0.1:{dev.api}"
        sent = httpx.post(f"{api}/api/v1/email/received", timeout=BOUND,
                          json={"to": "user@example.com", "subject": "Receipt", "body": "Thanks!",
                                "from": "Shop <shop@example.com>"})  # fmt: skip
        assert sent.status_code == 202, sent.text
        elsewhere = httpx.post(f"{api}/api/v1/email/received", timeout=BOUND,
                               json={"to": "user@example.com", "subject": "x", "body": "y",
                                     "from": "ceo@bank.example.net"})  # fmt: skip
        assert elsewhere.status_code == 403, elsewhere.text  # the limit itself still holds
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in dev.out.splitlines()
            if line.strip().startswith("export ")
        )
        assert exports["ALLOWED_SENDERS"] == "@example.com,@shop.example.com"
        assert exports["REDIS_URL"] == f"redis://127.0.0.1:{dev.redis}/0"
        cli = subprocess.run([PY, "-m", "emailq.cli", "send", "--to", "user@example.com",
                              "--template", "otp", "--var", "code=493817"],
                             cwd=tmp_path, env={**clean_env(), **exports}, capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        mail_dir = tmp_path / "dev" / "mail"
        wait_until(lambda: len(list(mail_dir.glob("*.eml"))) == 2, what="both mails captured")
        mails = [BytesParser(policy=policy.default).parsebytes(p.read_bytes())
                 for p in mail_dir.glob("*.eml")]  # fmt: skip
        assert sorted(str(m["From"]) for m in mails) == ["Shop <shop@example.com>",
                                                         "emailq@localhost"]  # fmt: skip
        assert sum("493817" in m.get_body(("plain",)).get_content() for m in mails) == 1
        children = dev.children()
        dev.proc.send_signal(signal.SIGTERM)  # dev.stop()'s SIGKILL would orphan them
        assert dev.proc.wait(timeout=3 * BOUND) == 0, dev.err()
        assert [pid for pid in children if alive(pid)] == []
    finally:
        dev.stop()
