"""The dev-mode capture server, started for real and fed by smtplib."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from emailq.devtools.capture import BoundController, CaptureHandler
from tests.helpers.polling import wait_until


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", subject
    msg.set_content("홍길동님 안녕하세요!")
    return msg


def _send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.send_message(_message(subject))


@contextmanager
def _capture(out: Path) -> Iterator[int]:
    """A capture server on port 0, in this process; yields the port it got."""
    controller = BoundController(CaptureHandler(out), hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


def _session(out: Path, subjects: list[str]) -> None:
    with _capture(out) as port:
        for subject in subjects:
            _send(port, subject)


def _saved(out: Path) -> list[Path]:
    """The saved messages, in the order their names sort (arrival)."""
    return sorted(out.glob("*.eml"))


def test_mail_is_printed_and_saved_and_a_new_session_does_not_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _session(tmp_path, ["첫 번째", "second"])
    _session(tmp_path, ["third"])

    saved = _saved(tmp_path)
    assert len(saved) == 3
    assert [b"third" in p.read_bytes() for p in saved] == [False, False, True]
    assert all(re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{16}\.eml", p.name) for p in saved)
    printed = capsys.readouterr().out
    assert "Subject: 첫 번째" in printed
    assert "홍길동님 안녕하세요!" in printed


def test_a_deleted_mail_does_not_make_the_next_session_overwrite_the_newest(
    tmp_path: Path,
) -> None:
    # Names used to be the count of files + 1: with 000001 deleted and 000002 kept, the
    # next session wrote 000002 again, over the newest mail. The dev inbox deletes mail.
    _session(tmp_path, ["first", "second"])
    oldest = _saved(tmp_path)[0]
    oldest.unlink()
    _session(tmp_path, ["third"])

    bodies = [p.read_bytes() for p in _saved(tmp_path)]
    assert len(bodies) == 2
    assert b"Subject: second" in bodies[0]
    assert b"Subject: third" in bodies[1]


def test_the_envelope_is_kept_beside_each_mail(tmp_path: Path) -> None:
    # Bcc recipients are in the envelope only; the inbox shows them from the sidecar.
    with _capture(tmp_path) as port, smtplib.SMTP("127.0.0.1", port) as client:
        client.send_message(_message("with bcc"), from_addr="bounce@example.com",
                            to_addrs=["b@example.com", "hidden@example.com"])  # fmt: skip

    [eml] = _saved(tmp_path)
    envelope = json.loads(eml.with_suffix(".json").read_text())
    assert envelope["mail_from"] == "bounce@example.com"
    assert envelope["rcpt_tos"] == ["b@example.com", "hidden@example.com"]
    assert b"hidden@example.com" not in eml.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([eml.name, f"{eml.stem}.json"])


def test_a_message_it_cannot_save_is_a_4xx_never_a_5xx(tmp_path: Path) -> None:
    # A worker treats 5xx as the mail's fault and fails it for good; the capture server's
    # own trouble must read as "try again later".
    blocked = tmp_path / "mail"
    blocked.write_text("a file where the mail folder should be")
    with _capture(blocked) as port, smtplib.SMTP("127.0.0.1", port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.send_message(_message("kept for later"))
        assert refused.value.smtp_code == 451
        blocked.unlink()  # the trouble goes away: the same mail is accepted and saved
        client.send_message(_message("kept for later"))
    assert len(_saved(blocked)) == 1


def test_a_console_that_went_away_still_accepts_and_saves(tmp_path: Path) -> None:
    # `emailq dev | head`: the pipe closes, and every print fails from then on. Before, the
    # print's BrokenPipeError became "500 Error" for every mail.
    out = tmp_path / "mail"
    capture = subprocess.Popen(
        [sys.executable, "-m", "emailq.cli", "capture", "--port", "0", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert capture.stdout is not None
        first = capture.stdout.readline().decode()  # "SMTP capture server on 127.0.0.1:N; ..."
        port = int(first.split(";")[0].rsplit(":", 1)[1])
        capture.stdout.close()  # the reader goes away, as `head` or `tee` would
        for n in range(3):
            _send(port, f"after the pipe closed {n}")  # raises on anything but 250
        wait_until(lambda: len(list(out.glob("*.eml"))) == 3, what="3 saved mails",
                   proc=None)  # fmt: skip
        assert capture.poll() is None
    finally:
        capture.kill()
        capture.wait()
