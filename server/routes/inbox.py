"""``/dev/inbox``: the mail the capture server caught, in a browser and as JSON for tests.

Mounted only when ``DEV_PAGES`` is on and ``DEV_INBOX_DIR`` names the capture folder
(``emailq dev`` sets both). It shows every captured message, Bcc included, so it answers
local requests only (a loopback client, a local ``Host``, no other page's ``Origin``),
whatever ``API_KEYS`` says: it is a tool for the developer's own machine.

A message's HTML part is served on its own, for a sandboxed ``<iframe>``: the response's
CSP ``sandbox`` (no ``allow-scripts``, no ``allow-same-origin``) gives it an opaque origin
and no script even when opened directly, and it may load no remote image or style, so
opening a mail neither runs its code nor tells its sender.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel

from emailq.mailfolder import MESSAGE_ID, Inbox, Message, Summary
from server.auth import local_refusal
from server.deps import settings_of
from server.pages import PAGE_CSP, StaticPages, security_headers

# The page frames its own HTML-part endpoint, and nothing else.
INBOX_CSP = PAGE_CSP + "; frame-src 'self'"
# The HTML part of a mail: no script, an opaque origin, inline styles and data: images only.
PART_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
            "font-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'self'")  # fmt: skip

MessageId = Annotated[str, PathParam(pattern=MESSAGE_ID)]


class MessagePage(BaseModel):
    """Captured messages, newest first."""

    messages: list[Summary]
    total: int  # matching the query, in all
    offset: int
    limit: int


class Deleted(BaseModel):
    """How many messages were deleted."""

    deleted: int


def _local_only(request: Request) -> None:
    refusal = local_refusal(request, settings_of(request))
    if refusal is not None:
        raise HTTPException(403, f"the dev inbox answers local requests only: {refusal}")


def _missing(message_id: str) -> HTTPException:
    return HTTPException(404, f"no captured message {message_id}")


def _framed(body: str | bytes, media_type: str) -> Response:
    headers = {**security_headers(PART_CSP), "X-Frame-Options": "SAMEORIGIN"}
    return Response(body, media_type=media_type, headers=headers)


def router_for(folder: Path) -> APIRouter:  # noqa: C901  # one small route per line of the API
    """The inbox's page and JSON API over the capture folder ``folder``."""
    inbox = Inbox(folder)
    pages = StaticPages("inbox", csp=INBOX_CSP)
    router = APIRouter(prefix="/dev/inbox", include_in_schema=False,
                       dependencies=[Depends(_local_only)])  # fmt: skip

    @router.get("")
    def page() -> Response:
        return pages.response("index.html")

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        return pages.response(name)

    @router.get("/api/messages")
    def messages(
        q: Annotated[str, Query(max_length=200)] = "",
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> MessagePage:
        found, total = inbox.messages(q, offset=offset, limit=limit)
        return MessagePage(messages=found, total=total, offset=offset, limit=limit)

    @router.delete("/api/messages")
    def delete_all() -> Deleted:
        return Deleted(deleted=inbox.clear())

    @router.get("/api/latest")
    def latest() -> Message:
        found = inbox.latest()
        if found is None:
            raise HTTPException(404, "no captured messages")
        return found

    @router.get("/api/messages/{message_id}")
    def message(message_id: MessageId) -> Message:
        found = inbox.message(message_id)
        if found is None:
            raise _missing(message_id)
        return found

    @router.delete("/api/messages/{message_id}", status_code=204)
    def delete(message_id: MessageId) -> Response:
        if not inbox.delete(message_id):
            raise _missing(message_id)
        return Response(status_code=204)

    @router.get("/api/messages/{message_id}/html")
    def html(message_id: MessageId) -> Response:
        found = inbox.message(message_id)
        if found is None or found.html is None:
            raise _missing(message_id) if found is None else HTTPException(404, "no HTML part")
        return _framed(found.html, "text/html; charset=utf-8")

    @router.get("/api/messages/{message_id}/raw")
    def raw(message_id: MessageId) -> Response:
        found = inbox.raw(message_id)
        if found is None:
            raise _missing(message_id)
        return _framed(found, "text/plain; charset=utf-8")

    return router
