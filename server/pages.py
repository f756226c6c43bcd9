"""Static pages shipped in the package (``server/static/``): the dashboard and the dev inbox.

Plain files, no build step. Each is read from the installed package once, when the app is
built, and served with headers that keep the page to itself: a strict Content-Security-
Policy (scripts and styles from this API only, nothing inline), no framing, no sniffing, no
referrer. The pages put server text (SMTP replies, reasons, addresses) into the document
with ``textContent`` only; the CSP is the second wall if that ever slips.
"""

from __future__ import annotations

from importlib import resources

from fastapi import HTTPException
from fastapi.responses import Response

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# No default source; the page's own script and style, its API calls, and (for the inbox)
# frames of this API, which are sandboxed on their own (see server/routes/inbox.py).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")  # fmt: skip


class StaticPages:
    """The files of one folder of ``server/static``, served with security headers."""

    def __init__(self, folder: str, *, csp: str = PAGE_CSP) -> None:
        root = resources.files("server") / "static" / folder
        self.files = {
            entry.name: entry.read_bytes()
            for entry in root.iterdir()
            if entry.is_file() and any(entry.name.endswith(ext) for ext in _TYPES)
        }
        self.csp = csp

    def response(self, name: str) -> Response:
        """One file by name (a fixed set: nothing from the request reaches a path); 404
        for any other name."""
        body = self.files.get(name)
        if body is None:
            raise HTTPException(404, f"no such file: {name}")
        media_type = next(t for ext, t in _TYPES.items() if name.endswith(ext))
        return Response(body, media_type=media_type, headers=security_headers(self.csp))


def security_headers(csp: str) -> dict[str, str]:
    """The headers every page and frame of ours carries."""
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
