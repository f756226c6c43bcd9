"""Stored templates: list them, and preview one without sending (``TEMPLATES_DIR``).

Both need what a send needs (the same authentication: a key of any scope, or, without
API_KEYS, a local client), since a preview shows what a send would put in a mail.
Sending with a template is the send endpoints' ``"template"`` field.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from emailq.compose import TEMPLATE_NAME, VariableName
from emailq.errors import InvalidMessage
from emailq.templates import PartResult
from server.auth import PrincipalDep
from server.deps import SettingsDep, TemplatesDep
from server.errors import ErrorBody, error_response
from server.openapi import errors
from server.ratelimit import check_key_rate
from server.schemas import _example

router = APIRouter(prefix="/templates", tags=["templates"])


class TemplateInfo(BaseModel):
    """One stored template."""

    model_config = _example(
        {"name": "otp", "parts": ["subject", "body", "html"], "variables": ["code", "username"]}
    )

    name: str = Field(description="what a send gives as `template`")
    parts: list[str] = Field(description="subject, body and, if it has one, html")
    variables: list[str] = Field(description="every variable its parts read")


class TemplateList(BaseModel):
    """Every stored template, by name."""

    model_config = _example(
        {"templates": [{"name": "otp", "parts": ["subject", "body"], "variables": ["code"]}]}
    )

    templates: list[TemplateInfo] = Field(description="each template of TEMPLATES_DIR")


class PreviewRequest(BaseModel):
    """The values to render with, as a send's `variables`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"variables": {"code": "482913"}}]}
    )

    variables: dict[VariableName, str] = Field(
        default_factory=dict,
        max_length=100,
        description="the values the template reads",
        # patternProperties alone would let the schema allow any other key and value.
        json_schema_extra={"additionalProperties": False},
    )


class PartPreview(BaseModel):
    """One part rendered: its text, or the error that stopped it."""

    content: str | None = Field(default=None, description="the rendered text of the part")
    error: str | None = Field(default=None, description="why the part could not be rendered")
    field: str | None = Field(default=None, description="`variables.<name>` or `template`")
    line: int | None = Field(default=None, description="the line of the part's file")


class Preview(BaseModel):
    """What a send with these variables would put in the mail."""

    model_config = _example({
        "template": "otp",
        "parts": {"subject": {"content": "Your code"}, "body": {"content": "Code: 482913"}},
    })  # fmt: skip

    template: str = Field(description="the template's name")
    parts: dict[str, PartPreview] = Field(description="subject, body and html, by name")


class PreviewError(ErrorBody):
    """The error shape; a preview that could not render every part adds each part (a request
    that is itself invalid does not)."""

    template: str | None = Field(default=None, description="the template's name")
    parts: dict[str, PartPreview] | None = Field(
        default=None, description="each part's text or error"
    )


TemplateName = Annotated[str, Path(pattern=TEMPLATE_NAME, description="the template's name",
                                   examples=["otp"])]  # fmt: skip


def _part(result: PartResult) -> PartPreview:
    if result.error is None:
        return PartPreview(content=result.content)
    field = result.error.field if isinstance(result.error, InvalidMessage) else None
    return PartPreview(error=str(result.error), field=field,
                       line=getattr(result.error, "line", None))  # fmt: skip


@router.get("", response_model=TemplateList)
async def list_templates(principal: PrincipalDep, templates: TemplatesDep) -> TemplateList:
    """The stored templates, each with its parts and the variables it reads."""
    return TemplateList(templates=[
        TemplateInfo(name=t.name, parts=[p.name for p in t.parts], variables=t.variables)
        for t in templates.all()
    ])  # fmt: skip


@router.post(
    "/{name}/preview",
    response_model=Preview,
    response_model_exclude_none=True,
    responses=errors(
        404,
        why={
            404: "no such template",
            422: "a part could not be rendered: see `parts`",
            429: "over RATE_LIMIT_PER_KEY: previews count in a budget of their own",
        },
        model=PreviewError,
    ),
)
async def preview_template(
    name: TemplateName,
    body: PreviewRequest,
    principal: PrincipalDep,
    request: Request,
    response: Response,
    templates: TemplatesDep,
    settings: SettingsDep,
) -> Preview | JSONResponse:
    """Render a template without sending it: 200 with every part, or 422 with each part's
    text or error."""
    if templates.get(name) is None:
        raise HTTPException(404, f"no template {name!r}")
    # Counted before rendering, which is the work the limit bounds (RATE_LIMIT_PER_KEY).
    usage = await check_key_rate(request, response, principal, use="preview")
    results = templates.preview(name, body.variables, max_body_bytes=settings.max_body_bytes)
    answer = Preview(template=name, parts={r.part: _part(r) for r in results})
    failed = [r.error for r in results if r.error is not None]
    if not failed:
        return answer
    fields: list[dict[str, Any]] = [
        {"loc": ["body", e.field], "msg": str(e)}
        for e in failed if isinstance(e, InvalidMessage) and e.field
    ]  # fmt: skip
    refused = error_response(request, 422, "invalid_message", str(failed[0]), fields=fields,
                             **answer.model_dump(exclude_none=True))  # fmt: skip
    refused.headers.update(usage.headers if usage else {})
    return refused
