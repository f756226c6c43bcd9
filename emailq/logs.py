"""Log setup shared by the API and the worker.

Every line carries ``request_id`` and ``task_id`` (``-`` when there is none), so one grep
follows a mail from the POST that accepted it to the SMTP reply that settled it. Secrets
never reach a log: SMTP_PASS is a ``SecretStr`` and Redis URLs are shown without passwords.
"""

from __future__ import annotations

import logging
import sys
from urllib.parse import urlsplit, urlunsplit

_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s task=%(task_id)s] %(message)s"


class _ContextDefaults(logging.Filter):
    """Give every record the context fields the format expects."""

    def filter(self, record: logging.LogRecord) -> bool:
        for field in ("request_id", "task_id"):
            if not hasattr(record, field):
                setattr(record, field, "-")
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send our log lines to stderr in one format; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(getattr(h, "_emailq", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_ContextDefaults())
        handler._emailq = True  # type: ignore[attr-defined]  # marks our handler for idempotence
        root.addHandler(handler)


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://***@host:6379/0``."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
