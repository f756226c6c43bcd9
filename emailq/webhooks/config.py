"""``WEBHOOKS_FILE``: endpoints configured by the operator, read and checked at startup.

The file holds ``[[webhooks]]`` tables (JSON by extension: ``{"webhooks": [...]}``), each
with an ``id``, a ``url``, ``events`` and its ``secrets`` (required here: a generated one
could not be read back from the file). API-created endpoints have ids starting ``ep_``,
which file ids may not use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from emailq.configfile import read_config_file
from emailq.errors import ConfigError, validation_message
from emailq.webhooks.models import Endpoint, Source
from emailq.webhooks.targets import TargetRefused, check_url

API_ID_PREFIX = "ep_"
MAX_ENDPOINTS = 100  # per installation, file and API together: each event fans out to all


class WebhooksConfigError(ConfigError, ValueError):
    """``WEBHOOKS_FILE`` is unreadable or invalid; the message names the entry and field."""


def _endpoint(path: Path, index: int, entry: Any, allow_private: bool) -> Endpoint:
    name = entry.get("id", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
    where = f"WEBHOOKS_FILE {path}: webhook {name!r}"
    try:
        endpoint = Endpoint.model_validate({**entry, "source": Source.FILE})
    except (ValidationError, TypeError) as exc:
        if not isinstance(exc, ValidationError):
            raise WebhooksConfigError(f"{where}: expected a table") from exc
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(webhook)"
        why = validation_message(first)
        raise WebhooksConfigError(f"{where}, field {field}: {why}") from None
    if not endpoint.secrets:
        raise WebhooksConfigError(f"{where}, field secrets: give at least one whsec_ secret")
    if endpoint.id.startswith(API_ID_PREFIX):
        raise WebhooksConfigError(f"{where}, field id: ids starting {API_ID_PREFIX!r} are "
                                  "the API's")  # fmt: skip
    try:
        check_url(endpoint.url, allow_private=allow_private)
    except TargetRefused as exc:
        raise WebhooksConfigError(f"{where}, field url: {exc}") from None
    return endpoint


def load_webhooks(path: Path | None, *, allow_private: bool) -> list[Endpoint]:
    """The endpoints of ``path`` (none when it is None), or ``WebhooksConfigError``."""
    if path is None:
        return []
    data = read_config_file(path, "WEBHOOKS_FILE", WebhooksConfigError)
    entries = data.get("webhooks", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise WebhooksConfigError(f"WEBHOOKS_FILE {path}: expected a list under 'webhooks'")
    if len(entries) > MAX_ENDPOINTS:
        raise WebhooksConfigError(f"WEBHOOKS_FILE {path}: at most {MAX_ENDPOINTS} webhooks")
    endpoints: dict[str, Endpoint] = {}
    for index, entry in enumerate(entries):
        endpoint = _endpoint(path, index, entry, allow_private)
        if endpoint.id in endpoints:
            raise WebhooksConfigError(f"WEBHOOKS_FILE {path}: webhook {endpoint.id!r} is "
                                      "defined twice")  # fmt: skip
        endpoints[endpoint.id] = endpoint
    return list(endpoints.values())
