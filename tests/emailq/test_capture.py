"""The dev-mode capture server, started for real and fed by smtplib."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from emailq.capture import CaptureHandler
from emailq.redis_server import free_port


def _send(port: int, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", subject
    msg.set_content("홍길동님 안녕하세요!")
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.send_message(msg)


def _session(out: Path, subjects: list[str]) -> None:
    port = free_port()
    controller = Controller(CaptureHandler(out), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for subject in subjects:
            _send(port, subject)
    finally:
        controller.stop()


def test_mail_is_printed_and_saved_and_a_new_session_does_not_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _session(tmp_path, ["첫 번째", "second"])
    _session(tmp_path, ["third"])

    saved = sorted(p.name for p in tmp_path.glob("*.eml"))
    assert saved == ["000001.eml", "000002.eml", "000003.eml"]
    assert b"third" in (tmp_path / "000003.eml").read_bytes()
    printed = capsys.readouterr().out
    assert "Subject: 첫 번째" in printed
    assert "홍길동님 안녕하세요!" in printed
