"""``/docs`` (Swagger UI) and ``/redoc``, with every script, style and icon served by this API.

FastAPI's own pages load them from a CDN: they break on a network without one, and tell the
CDN each time an operator opens them. The assets come from the ``fastapi-offline`` package
(pinned and hashed in the locks like any dependency), mounted under ``ASSETS``. Whether the
pages, and ``/openapi.json`` with them, exist at all is ``API_DOCS`` (server/main.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

OPENAPI_URL = "/openapi.json"
ASSETS = "/docs/assets"
# The pages may load from this API only: a stray reference to another host (a validator
# badge, a web font) is blocked by the browser, not just absent. The pages' own bootstrap
# script is inline; ReDoc runs its search in a worker made from a blob.
_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
        "frame-ancestors 'none'")  # fmt: skip
# Swagger UI's default sends the schema's URL to validator.swagger.io for a badge.
_SWAGGER_PARAMETERS = {"validatorUrl": None}


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = _CSP
    return page


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets (``app`` serves ``OPENAPI_URL``)."""
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=None, swagger_ui_parameters=_SWAGGER_PARAMETERS,
        ))  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _with_csp(get_redoc_html(
            openapi_url=root + OPENAPI_URL, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False,
        ))  # fmt: skip
