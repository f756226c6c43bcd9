"""Settings that would quietly open the service are refused at startup, each with one line
naming the setting. (tests/e2e/test_startup_refusals.py starts the real API with them.)"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from emailq.apikeys import hash_key
from emailq.settings import Settings

KEY = hash_key("eq_one-key")

# (setting, value, what the one line says): each a configuration that starts today.
REFUSED = [
    ("trusted_proxies", "0.0.0.0/0", "TRUSTED_PROXIES: 0.0.0.0/0 is wider than /8"),
    ("trusted_proxies", "::/0", "TRUSTED_PROXIES: ::/0 is wider than /24"),
    ("trusted_proxies", "10.0.0.1, 128.0.0.0/1", "TRUSTED_PROXIES: 128.0.0.0/1 is wider"),
    ("trusted_proxies", "2000::/3", "TRUSTED_PROXIES: 2000::/3 is wider than /24"),
    ("trusted_proxies", "1.2.3.4/7", "TRUSTED_PROXIES: 0.0.0.0/7 is wider than /8"),
    ("trusted_proxies", "::ffff:0:0/96", "TRUSTED_PROXIES: ::ffff:0:0/96 is wider than /104"),
    ("trusted_proxies", "64:ff9b::/97", "TRUSTED_PROXIES: 64:ff9b::/97 is wider than /104"),
    ("trusted_proxies", "::/24", "TRUSTED_PROXIES: ::/24 is wider than /104"),
    ("cors_origins", "*", "CORS_ORIGINS: '*' would let every web page call the API"),
    ("cors_origins", "https://a.example.com *", "CORS_ORIGINS: '*' would let every web page"),
    ("cors_origins", "https://*.example.com", "CORS_ORIGINS: 'https://*.example.com' would"),
    ("cors_origins", "null", "CORS_ORIGINS: 'null' is not an origin"),
    ("mail_from", "App\u2028Bcc: x@evil.example <a@example.com>", "MAIL_FROM holds U+2028"),
    ("mail_from", "App <a@example.com>\u2029", "MAIL_FROM holds U+2029"),
    ("mail_from", "App\x85 <a@example.com>", "MAIL_FROM holds U+0085"),
    ("mail_from", "App\x0b <a@example.com>", "MAIL_FROM holds U+000B"),
    ("mail_from", "App\t<a@example.com>", "MAIL_FROM holds U+0009"),
    ("mail_from", "App\x7f <a@example.com>", "MAIL_FROM holds U+007F"),
    ("mail_from", "App\r\nBcc: x@evil.example <a@example.com>", "MAIL_FROM holds U+000D"),
    ("mail_from", "\u202eelgoog <a@example.com>", "MAIL_FROM holds U+202E"),
    ("api_keys", f"app:send:{KEY} ops:admin:{KEY}", "API_KEYS: 'app' and 'ops' have the same"),
    ("api_keys", f"a:send:{KEY};b:send:{KEY.upper()}", "API_KEYS: 'a' and 'b' have the same"),
]
ACCEPTED = [
    ("trusted_proxies", "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 127.0.0.1 ::1"),
    ("trusted_proxies", "173.245.48.0/20 104.16.0.0/13 2606:4700::/32 2a06:98c0::/29"),
    ("trusted_proxies", "fd00:1234::/48 ::ffff:10.0.0.0/104 64:ff9b::a00:0/104"),
    ("cors_origins", "https://app.example.com, http://localhost:3000"),
    ("mail_from", "Zoë Ünïcode-Café <noreply@example.com>"),
    ("api_keys", f"app:send:{KEY} ops:admin:{hash_key('eq_other-key')}"),
]


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("name", "value", "line"), REFUSED, ids=[f"{n}={v!r}" for n, v, _ in REFUSED]
)
def test_refused_with_one_line_naming_the_setting(name: str, value: str, line: str) -> None:
    with pytest.raises(ValidationError) as refused:
        settings(**{name: value})
    [error] = refused.value.errors()
    assert error["loc"] == (name,)
    assert line in error["msg"]
    assert "\n" not in error["msg"]


@pytest.mark.parametrize(("name", "value"), ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_what_a_deployment_needs_still_starts(name: str, value: str) -> None:
    assert getattr(settings(**{name: value}), name)
