"""The OpenAPI schema documents every field, example, error shape and status a client needs.

These read the schema the app serves. A new field without a description, a route without
an example, an error status documented in another shape than the API's one, or an /api/v1
route that does not ask for the key fails here; whether the API then answers as documented
is tests/server/test_openapi_fuzz.py's part (schemathesis).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emailq.settings import Settings
from server.main import create_app
from server.openapi import BEARER
from tests.helpers.api import API_KEYS, assert_error, mail, task_keys

METHODS = {"get", "post", "put", "patch", "delete"}
REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    # Built without Redis: the schema needs none.
    return create_app(Settings(_env_file=None, api_keys=API_KEYS)).openapi()  # type: ignore[call-arg]


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield f"{method.upper()} {path}", operation


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].removeprefix(REF)]
    return node


def properties(node: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of ``node``, inline objects and alternatives included."""
    for name, prop in node.get("properties", {}).items():
        yield f"{where}.{name}", prop
        yield from properties(prop, f"{where}.{name}")
        for key in ("anyOf", "oneOf", "allOf"):
            for alternative in prop.get(key, []):
                yield from properties(alternative, f"{where}.{name}")
        if isinstance(prop.get("items"), dict):
            yield from properties(prop["items"], f"{where}.{name}[]")


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    undescribed = [
        where
        for name, component in schema["components"]["schemas"].items()
        for where, prop in properties(component, name)
        if not prop.get("description")
    ]
    assert undescribed == []


def test_every_operation_and_parameter_is_described_with_an_example(
    schema: dict[str, Any],
) -> None:
    missing = []
    for name, operation in operations(schema):
        if not operation.get("description"):
            missing.append(f"{name}: description (the route's docstring)")
        for parameter in operation.get("parameters", []):
            if not parameter.get("description"):
                missing.append(f"{name}: {parameter['name']} description")
            in_schema = parameter.get("schema", {})
            has_example = "example" in parameter or "examples" in parameter
            if not (has_example or in_schema.get("examples") or "default" in in_schema):
                missing.append(f"{name}: {parameter['name']} example")
    assert missing == []


def _has_example(schema: dict[str, Any], media: dict[str, Any]) -> bool:
    return bool(
        media.get("example") or media.get("examples")
        or resolve(schema, media.get("schema", {})).get("examples")
    )  # fmt: skip


def test_every_body_and_success_answer_has_an_example(schema: dict[str, Any]) -> None:
    missing = []
    for name, operation in operations(schema):
        body = operation.get("requestBody", {}).get("content", {})
        missing += [f"{name}: {media} body" for media, spec in body.items()
                    if not _has_example(schema, spec)]  # fmt: skip
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                content = response.get("content", {})
                missing += [f"{name}: {status} {media}" for media, spec in content.items()
                            if not _has_example(schema, spec)]  # fmt: skip
    assert missing == []


def test_every_error_is_documented_in_the_one_error_shape(schema: dict[str, Any]) -> None:
    wrong = []
    for name, operation in operations(schema):
        for status, response in operation["responses"].items():
            if status[0] not in "45":
                continue
            body = resolve(schema, response.get("content", {}).get("application/json", {})
                           .get("schema", {}))  # fmt: skip
            if not {"error", "detail", "request_id"} <= set(body.get("required", [])):
                wrong.append(f"{name} {status}")
            if not response.get("description"):
                wrong.append(f"{name} {status}: description")
    assert wrong == []
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_inputs_document_their_refusals(schema: dict[str, Any]) -> None:
    missing = []
    for name, operation in operations(schema):
        expected = set()
        if operation.get("parameters") or "requestBody" in operation:
            expected.add("422")
        if "requestBody" in operation:
            expected |= {"413", "415"}
        missing += [f"{name} {s}" for s in sorted(expected - set(operation["responses"]))]
    assert missing == []


def test_every_api_route_but_the_forms_asks_for_the_key(schema: dict[str, Any]) -> None:
    # By path, not by how routes are built: a new /api/v1 endpoint that forgot to
    # authenticate fails here.
    assert schema["components"]["securitySchemes"][BEARER] == {
        "type": "http", "scheme": "bearer",
        "description": schema["components"]["securitySchemes"][BEARER]["description"],
    }  # fmt: skip
    wrong = []
    for name, operation in operations(schema):
        public = not name.split(" ")[1].startswith("/api/v1/") or "/forms/" in name
        secured = operation.get("security") == [{BEARER: []}]
        if secured == public:
            wrong.append(name)
        if secured and not {"401", "403", "429"} <= set(operation["responses"]):
            wrong.append(f"{name}: 401/403/429")
    assert wrong == []


def test_without_api_keys_no_key_is_required(make_settings: Callable[..., Settings]) -> None:
    schema = create_app(make_settings()).openapi()
    secured = [name for name, op in operations(schema) if op.get("security") not in (None, [{}])]
    assert secured == []
    assert BEARER in schema["components"]["securitySchemes"]  # Swagger can still send one


def test_the_last_page_of_dead_letters_needs_no_next_offset(schema: dict[str, Any]) -> None:
    assert "next_offset" not in schema["components"]["schemas"]["FailedPage"]["required"]


def test_the_form_endpoint_documents_both_of_its_bodies(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/api/v1/forms/{form_id}"]["post"]["requestBody"]
    assert set(body["content"]) == {"application/x-www-form-urlencoded", "application/json"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_type_is_415_and_stores_nothing(
    client: TestClient, store: redis.Redis, content_type: str | None
) -> None:
    # curl's -d without -H sends application/x-www-form-urlencoded.
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/api/v1/email/received", content=json.dumps(mail()), headers=headers)
    body = assert_error(response, 415, "unsupported_media_type")
    assert "application/json" in body["detail"]
    assert task_keys(store) == []


def test_a_json_content_type_with_parameters_is_still_json(client: TestClient) -> None:
    body = b'{"to": "not an address", "subject": "Hi", "body": "Hello"}'
    response = client.post("/api/v1/email/received", content=body,
                           headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert_error(response, 422, "validation_error")  # read as JSON: the address is checked
