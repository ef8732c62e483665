"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

The body has ``type`` (``about:blank``: the status says what kind of problem it is), ``title`` (the status
phrase), ``status``, ``detail`` (one readable sentence, what a client shows a person) and ``instance`` (the
request path); a 422 adds ``errors``, one ``{loc, msg, type}`` per invalid field, paths as in the request.
The OpenAPI document describes each error response with the shared ``Problem`` schema, and the 401 and 422 of
every operation (the 413 of one with a body, the 400 of one with a study id) as the shared response components
``Unauthorized``, ``ValidationFailed``, ``BodyTooLarge`` and ``AmbiguousId``.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import FieldError, Problem
from service.kinds.registry import without_kind_tag
from service.spec import SpecError
from service.study_ids import AmbiguousStudyId

PROBLEM_JSON = "application/problem+json"
SCHEMA_REF = "#/components/schemas/"
SHARED_RESPONSES = {
    "400": ("AmbiguousId", "the study id prefix matches several studies: `candidates` lists them"),
    "401": ("Unauthorized", "no token, or an unknown, expired or revoked one"),
    "413": ("BodyTooLarge", "the request body is larger than the server accepts (SCALETUNE_MAX_REQUEST_BYTES)"),
    "422": ("ValidationFailed", "invalid fields: `errors` lists each with its location, `detail` sums them up"),
}


class InvalidField(Exception):
    """A 422 that a route finds after Pydantic's own checks, in the same shape: where the field is and why."""

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(msg)
        self.error = FieldError(loc=list(loc), msg=msg, type="value_error")


def problem_body(status: int, detail: str, instance: str | None = None,
                 errors: list[FieldError] | None = None) -> dict[str, Any]:
    problem = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, instance=instance,
                      errors=errors)
    return problem.model_dump(mode="json", exclude_none=True)


def problem_response(request: Request, status: int, detail: str, errors: list[FieldError] | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    return JSONResponse({**problem_body(status, detail, request.url.path, errors), **extensions},
                        status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _where(loc: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def invalid_fields(request: Request, errors: list[FieldError]) -> JSONResponse:
    """A 422 whose ``detail`` lists every field error, so a client that shows only ``detail`` says it all."""
    detail = "; ".join(f"{_where(error.loc)}: {error.msg}" for error in errors)
    return problem_response(request, 422, detail, errors)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else str(jsonable_encoder(error.detail))
    return problem_response(request, error.status_code, detail, headers=error.headers)


async def _request_invalid(request: Request, error: Exception) -> JSONResponse:
    """Pydantic's errors at their paths, with the spec-kind tag taken out so they match the user's document."""
    assert isinstance(error, RequestValidationError)
    errors = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        if loc[:1] == ("body",):
            loc = ("body", *without_kind_tag(loc[1:]))
        errors.append(FieldError(loc=list(loc), msg=problem["msg"], type=problem["type"]))
    return invalid_fields(request, errors)


async def _spec_invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SpecError)
    return invalid_fields(request, [FieldError(loc=["body", *p.loc], msg=p.msg, type="value_error")
                                    for p in error.problems])


async def _field_invalid(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, InvalidField)
    return invalid_fields(request, [error.error])


async def _ambiguous_id(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AmbiguousStudyId)
    return problem_response(request, 400, str(error), candidates=[study_id for study_id, _ in error.candidates])


def _is_problem(code: str, response: dict[str, Any]) -> bool:
    """Every 4xx; a 5xx when the route says so (a probe's 503 has a body of its own)."""
    schemas = [media.get("schema", {}).get("$ref") for media in response.get("content", {}).values()]
    return code.startswith("4") or f"{SCHEMA_REF}Problem" in schemas


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with every error response as problem+json and the common ones shared."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    problem = {PROBLEM_JSON: {"schema": {"$ref": f"{SCHEMA_REF}Problem"}}}
    components = schema.setdefault("components", {})
    components["responses"] = {name: {"description": description, "content": problem}
                               for name, description in SHARED_RESPONSES.values()}
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if "requestBody" in operation:
                responses["413"] = {}
            if any(parameter["name"] == "study_id" for parameter in operation.get("parameters", [])):
                responses["400"] = {}
            for code, response in responses.items():
                if code in SHARED_RESPONSES:
                    responses[code] = {"$ref": f"#/components/responses/{SHARED_RESPONSES[code][0]}"}
                elif _is_problem(code, response):
                    response["content"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's own 422 body, replaced by ours
        components.get("schemas", {}).pop(unused, None)
    app.openapi_schema = schema
    return schema


def install_problem_details(app: FastAPI) -> None:
    """Every error the app answers, and its OpenAPI document, in the problem details shape."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(SpecError, _spec_invalid)
    app.add_exception_handler(InvalidField, _field_invalid)
    app.add_exception_handler(AmbiguousStudyId, _ambiguous_id)
    app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
