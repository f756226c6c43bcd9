"""Stored templates for tests: a TEMPLATES_DIR from a dict, and the Korean OTP mail as the
original service sent it.

``OTP_SUBJECT`` and ``OTP_TEXT`` are copied from the original's ``EmailService``
(``send_otp_email`` and ``_create_otp_email_body``: an f-string, then ``.strip()``), with
``{code}`` where it had ``{otp_code}``. They are what the shipped example template
(``examples/templates/otp``) must render, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "templates"
FILES = {"subject": "subject.txt", "body": "body.txt", "html": "body.html"}

OTP_SUBJECT = "\U0001f510 Your OTP Code - Todo API"  # 🔐
OTP_TEXT = (
    "안녕하세요! 👋\n"
    "\n"
    "Todo API에서 요청하신 OTP 코드입니다.\n"
    "\n"
    "🔐 **OTP 코드: {code}**\n"
    "\n"
    "\u26a0\ufe0f **중요 사항:**\n"  # ⚠️: the warning sign and its emoji variation selector
    "- 이 코드는 5분 후에 만료됩니다\n"
    "- 보안을 위해 다른 사람과 공유하지 마세요\n"
    "- 이 코드는 한 번만 사용할 수 있습니다\n"
    "\n"
    "문의사항이 있으시면 언제든지 연락주세요.\n"
    "\n"
    "감사합니다! 🙏\n"
    "Todo API Team"
)


def otp_text(code: str) -> str:
    """The original's text body for ``code``."""
    return OTP_TEXT.replace("{code}", code)


def write_templates(root: Path, templates: Mapping[str, Mapping[str, str]]) -> Path:
    """A TEMPLATES_DIR at ``root``: ``{"otp": {"subject": ..., "body": ..., "html": ...}}``,
    each part written as given (UTF-8)."""
    for name, parts in templates.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for part, source in parts.items():
            (folder / FILES[part]).write_text(source, encoding="utf-8")
    return root
