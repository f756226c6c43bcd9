"""/docs and /redoc reference this API only, their assets are served by it, and API_DOCS=false
turns the pages and the schema off. (tests/e2e/test_docs_browser.py renders them.)"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from tests.helpers.api import assert_error

# Every URL a page names: attributes, Swagger UI's `url: '...'` and ReDoc's spec-url.
_URL = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
PAGES = {"/docs": "SwaggerUIBundle", "/redoc": "Redoc"}  # page: the global its script defines


def urls_in(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


@pytest.mark.parametrize(("page", "global_name"), PAGES.items())
def test_docs_pages_load_everything_from_this_api(
    client: TestClient, page: str, global_name: str
) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "http:" not in html
    assert "https:" not in html
    assert "//" not in "".join(urls_in(html))  # not even protocol-relative
    urls = urls_in(html)
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts
    assert "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
    for url in scripts:
        script = client.get(url)
        assert script.headers["content-type"].startswith("text/javascript")
        assert global_name in script.text
    # A browser may not fetch from anywhere else either (a badge, a font).
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_swagger_ui_sends_the_schema_to_no_validator(client: TestClient) -> None:
    assert '"validatorUrl": null' in client.get("/docs").text


OFF = [
    "/docs",
    "/redoc",
    "/openapi.json",
    "/docs/assets/swagger-ui-bundle.js",
    "/docs/oauth2-redirect",
]


@pytest.mark.parametrize("path", OFF)
def test_api_docs_false_turns_the_pages_and_the_schema_off(
    make_settings: Callable[..., Settings], path: str
) -> None:
    with TestClient(create_app(make_settings(api_docs=False))) as client:
        assert_error(client.get(path), 404, "not_found")
        assert client.get("/health").status_code == 200


def test_the_assets_folder_serves_nothing_else(client: TestClient) -> None:
    for path in ["/docs/assets/", "/docs/assets/../../server/main.py",
                 "/docs/assets/%2e%2e/core.py", "/docs/assets/nope.js"]:  # fmt: skip
        assert client.get(path).status_code == 404, path
