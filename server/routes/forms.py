"""Contact forms for browsers: ``POST /api/v1/forms/{form_id}`` and its CORS preflight.

A plain HTML ``<form>`` (urlencoded) gets a 303 to the form's configured thank-you page;
a JSON client gets 202 ``{task_id, status}``. Where mail goes is fixed by ``FORMS_FILE``:
nothing in the request can change recipients, sender or redirect. The Origin header
decides CORS headers only; a request with any Origin, or none, is processed the same way.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any
from urllib.parse import parse_qsl

import httpx
from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from emailq.errors import InvalidMessage
from emailq.forms import (
    DUPLICATE_WINDOW_SECONDS,
    HONEYPOT,
    MAX_FIELDS,
    OWNER_PREFIX,
    Captcha,
    Form,
    content_fields,
    submission_key,
)  # fmt: skip
from emailq.queue import EnqueueItem, Idempotency
from emailq.submit import prepare_form
from server.clientaddr import client_address
from server.cors import allow_origin
from server.deps import QueueDep, RequestIdDep, SettingsDep, forms_of, http_of, metrics_of
from server.errors import BodyTooDeep
from server.openapi import errors
from server.ratelimit import check_form_rate
from server.schemas import Accepted

router = APIRouter(prefix="/forms", tags=["forms"])
log = logging.getLogger("emailq.api")

CAPTCHA_TIMEOUT_SECONDS = 5.0
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


FormId = Annotated[str, Path(description="the form's id in FORMS_FILE", examples=["contact"])]


async def get_form(request: Request, form_id: FormId) -> Form:
    """The configured form ``form_id``; 404 when there is none."""
    form = forms_of(request).get(form_id)
    if form is None:
        raise HTTPException(404, f"no form {form_id!r}")
    return form


FormDep = Annotated[Form, Depends(get_form)]


def _allowed_origin(form: Form, request: Request) -> str | None:
    # Only an exact allow-listed origin is echoed; never "*", never the Origin as given.
    origin = request.headers.get("Origin")
    return origin if origin is not None and origin in form.allowed_origins else None


def _cors(form: Form, request: Request, response: Response) -> None:
    response.headers["Vary"] = "Origin"
    origin = _allowed_origin(form, request)
    if origin is not None:
        allow_origin(response.headers, origin)


def _scalar(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return json.dumps(value)
    raise InvalidMessage(f"field {name!r} must be a string", field=name)


async def _fields(request: Request) -> tuple[dict[str, str], bool]:
    """The submitted fields, and whether the body was JSON."""
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if media == "application/json":
        try:
            data = json.loads(raw)
        except RecursionError as exc:  # nested past the decoder's limit: bad JSON, not a 500
            raise BodyTooDeep from exc
        except ValueError as exc:
            raise InvalidMessage("the body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise InvalidMessage("the body must be a JSON object of fields")
        return {str(k): _scalar(str(k), v) for k, v in data.items()}, True
    if media != FORM_CONTENT_TYPE:
        raise HTTPException(415, f"send {FORM_CONTENT_TYPE} (a plain <form>) or application/json")
    try:
        pairs = parse_qsl(raw.decode(), keep_blank_values=True, max_num_fields=MAX_FIELDS * 2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessage("the form body is not valid UTF-8 urlencoded fields") from exc
    fields: dict[str, str] = {}
    for name, value in pairs:  # a repeated name (checkboxes) keeps every value
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields, False


async def _verify_captcha(
    http: httpx.AsyncClient, captcha: Captcha, token: str, client: str
) -> None:
    """Ask the provider whether ``token`` is a solved challenge; 400 if not or unanswered."""
    if not token:
        raise HTTPException(400, f"CAPTCHA required: the {captcha.token_field} field is missing")
    data = {"secret": captcha.secret, "response": token, "remoteip": client}
    try:
        reply = await http.post(captcha.url, data=data, timeout=CAPTCHA_TIMEOUT_SECONDS)
        success = reply.status_code == 200 and reply.json().get("success") is True
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.warning("CAPTCHA verification failed: %s", exc.__class__.__name__)
        raise HTTPException(400, "the CAPTCHA could not be verified; try again") from exc
    if not success:
        raise HTTPException(400, "the CAPTCHA was not solved; try again")


def _answer(form: Form, task_id: str, wants_json: bool) -> Response:
    if wants_json:
        return JSONResponse(Accepted(task_id=task_id).model_dump(), status_code=202)
    # Always the configured page: a `_next`/`redirect` field in the request is ignored.
    return RedirectResponse(form.redirect, status_code=303)


@router.options("/{form_id}", status_code=204, include_in_schema=False)
async def form_preflight(form: FormDep, request: Request) -> Response:
    """CORS preflight: allowed only for the form's ``allowed_origins``."""
    response = Response(status_code=204)
    _cors(form, request, response)
    if "Access-Control-Allow-Origin" in response.headers:
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Accept"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


# The route reads the body itself (urlencoded or JSON, see `_fields`), so FastAPI cannot
# say what it takes: this does. Field names are the page's own; these are the usual ones.
def _fields_schema(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"the form's fields (at most {MAX_FIELDS}, names up to 64 characters); "
        "each becomes a line of the mail. `email` becomes Reply-To; `_gotcha` is the "
        "honeypot, left empty by people; a CAPTCHA's token field is checked, never mailed",
        "properties": {
            "name": {**value, "description": "the visitor's name"},
            "email": {**value, "description": "the visitor's address: the Reply-To"},
            "message": {**value, "description": "the message, last in the mail"},
            HONEYPOT: {**value, "description": "the honeypot: must stay empty"},
        },
        "additionalProperties": {**value, "description": "any other field"},
        "examples": [{"name": "Ada", "email": "ada@example.com", "message": "Hello!"}],
    }


_FORM_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            FORM_CONTENT_TYPE: {"schema": _fields_schema({"type": "string"})},
            # A JSON number or boolean is taken as its JSON text (`_scalar`).
            "application/json": {
                "schema": _fields_schema({"type": ["string", "number", "boolean"]})
            },
        },
    }
}
_SEE_OTHER = {"description": "a plain form post: to the form's configured thank-you page",
              "headers": {"Location": {"description": "the thank-you page",
                                       "schema": {"type": "string"}}}}  # fmt: skip
_FORM_ANSWERS = {303: _SEE_OTHER} | errors(400, 413, 415, 429, 507, why={
    404: "no form of that id in FORMS_FILE",
    422: "a field is invalid (`detail` names it): a line break in a field the subject "
         "uses, a bad `email`, too many fields ...",
    429: "over RATE_LIMIT_PER_FORM_ADDRESS for this address and form (`detail` names the "
         "window), or over the form's share of MAX_STORED_BYTES_PER_KEY",
})  # fmt: skip


@router.post("/{form_id}", status_code=202, response_model=Accepted, responses=_FORM_ANSWERS,
             openapi_extra=_FORM_DOCS)  # fmt: skip
async def submit_form(
    form: FormDep, request: Request, queue: QueueDep, settings: SettingsDep,
    request_id: RequestIdDep,
) -> Response:  # fmt: skip
    """Submit a contact form (urlencoded or JSON); mail goes to the form's fixed recipients."""
    # Error answers (server/errors.py) carry it too, so the page's script can read why.
    request.state.cors_origin = _allowed_origin(form, request)
    client = client_address(request)
    rate = await _form_rate(request, form.id)
    submitted, is_json = await _fields(request)
    wants_json = is_json or "application/json" in request.headers.get("Accept", "")
    # A bot that filled the hidden field goes through every check a visitor does (CAPTCHA,
    # fields, sizes): answered otherwise, a missing token or a bad address would tell it
    # that the field is a trap. Only storing and sending are skipped.
    if form.captcha is not None:
        token = submitted.get(form.captcha.token_field, "")
        await _verify_captcha(http_of(request), form.captcha, token, client)
    fields = content_fields(submitted)
    item = prepare_form(form, fields, settings, request_id=request_id)
    if submitted.get(HONEYPOT):
        # Never stored: its id, unguessable like any, then reads as a real form task's
        # does: 404 to all but the operator (see the result route).
        log.info("honeypot filled", extra={"request_id": request_id})
        task_id = item.task_id
    else:
        task_id = await _enqueue(form, item, fields, client, queue)
        if task_id == item.task_id:  # stored now, not the duplicate of an earlier one
            metrics_of(request).accepted(item.lane)
    response = _answer(form, task_id, wants_json)
    _cors(form, request, response)
    response.headers.update(rate)
    return response


async def _form_rate(request: Request, form_id: str) -> dict[str, str]:
    """The RateLimit-* headers after counting this submission (429 when over)."""
    usage = await check_form_rate(request, form_id)
    return usage.headers if usage is not None else {}


async def _enqueue(
    form: Form, item: EnqueueItem, fields: dict[str, str], client: str, queue: QueueDep
) -> str:
    """Queue the mail, or return the task of the same submission in the last 10 minutes."""
    once = Idempotency(scope=OWNER_PREFIX + form.id,
                       key=submission_key(form.id, client, fields),
                       fingerprint="form", ttl_seconds=DUPLICATE_WINDOW_SECONDS)  # fmt: skip
    replay = await queue.enqueue_once(item, once)
    task_id = item.task_id if replay is None else replay.task_id
    log.info("form queued" if replay is None else "form duplicate dropped",
             extra={"request_id": item.request_id, "task_id": task_id})  # fmt: skip
    return task_id
