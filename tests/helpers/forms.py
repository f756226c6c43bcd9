"""The contact form the form tests share: its config, a visitor, a CAPTCHA verifier."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs

import redis

THANKS = "https://site.example/thanks"
SITE = "https://site.example"
FORM = "/api/v1/forms/contact"
VISITOR = {"name": "Ada", "email": "ada@visitor.example", "message": "Hello there"}

FORMS_TOML = f"""
[[forms]]
id = "contact"
to = ["owner@site.example", "sales@site.example"]
subject = "Contact from {{name}}"
allowed_origins = ["{SITE}"]
redirect = "{THANKS}"
"""


class Verifier(BaseHTTPRequestHandler):
    """A stand-in siteverify endpoint: the token "good" passes, anything else fails."""

    seen: ClassVar[list[dict[str, list[str]]]] = []

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        form = parse_qs(body)
        Verifier.seen.append(form)
        ok = form.get("response") == ["good"] and form.get("secret") == ["s3cret"]
        reply = json.dumps({"success": ok}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def tasks(store: redis.Redis) -> list[str]:
    """The task keys in Redis."""
    return [str(k) for k in store.keys("{emailq}:task:*")]


def captcha_config(provider: str, verify_url: str) -> str:
    """The [forms.captcha] table of the test form."""
    return f"""
[forms.captcha]
provider = "{provider}"
secret = "s3cret"
verify_url = "{verify_url}"
"""
