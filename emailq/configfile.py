"""Reading the operator's configuration files (FORMS_FILE, WEBHOOKS_FILE): TOML, or JSON by
extension, with every read or parse error converted to the caller's one-line ConfigError."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from emailq.errors import ConfigError


def read_config_file(path: Path, setting: str, error: type[ConfigError]) -> Any:
    """The data of ``path`` (``.json``: JSON, else TOML); ``error`` naming ``setting`` and
    the path if it cannot be read or parsed."""
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".json":
            return json.loads(raw)
        return tomllib.loads(raw.decode())
    except (OSError, ValueError) as exc:
        raise error(f"{setting} {path}: {exc}") from exc
