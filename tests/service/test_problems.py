"""Every error is an RFC 9457 problem (application/problem+json), and the OpenAPI document says so."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance"}


def assert_problem(response: Response, status: int, path: str) -> dict[str, Any]:
    """The shape every error has; the title is the status phrase."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert PROBLEM_FIELDS <= set(body), body
    assert (body["type"], body["title"], body["status"], body["instance"]) == ("about:blank", HTTPStatus(status).phrase,
                                                                                 status, path)
    assert isinstance(body["detail"], str) and body["detail"], body
    return body


@pytest.mark.parametrize(("method", "path", "status", "words"), [
    ("get", "/v1/studies/nope", 404, "no study with id nope"),
    ("post", "/v1/studies/nope/cancel", 404, "no study with id nope"),
    ("get", "/v1/no-such-route", 404, "Not Found"),
    ("delete", "/v1/studies", 405, "Method Not Allowed"),
])
def test_http_errors_are_problems(client: TestClient, method: str, path: str, status: int, words: str) -> None:
    body = assert_problem(client.request(method, path), status, path)
    assert words in body["detail"] and "errors" not in body


def test_a_missing_token_is_a_problem_with_the_bearer_challenge(client: TestClient) -> None:
    response = client.get("/v1/studies", headers={"Authorization": ""})
    assert_problem(response, 401, "/v1/studies")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_structurally_invalid_request_lists_each_field_and_sums_them_up_in_detail(
        client: TestClient, spec_dict: dict[str, Any]) -> None:
    spec_dict["n_trials"] = 0
    del spec_dict["budget"]["steps"]
    body = assert_problem(client.post("/v1/studies", json=spec_dict), 422, "/v1/studies")
    locs = {tuple(error["loc"]): error for error in body["errors"]}
    assert set(locs) == {("body", "n_trials"), ("body", "budget", "steps")}, body["errors"]
    assert all(set(error) == {"loc", "msg", "type"} for error in body["errors"])
    assert locs[("body", "budget", "steps")]["type"] == "missing"
    assert "n_trials: " in body["detail"] and "budget.steps: Field required" in body["detail"]


def test_a_spec_refused_by_its_checks_has_the_same_shape(client: TestClient, spec_dict: dict[str, Any]) -> None:
    spec_dict["model"]["family"] = "no-such-family"
    body = assert_problem(client.post("/v1/studies", json=spec_dict), 422, "/v1/studies")
    [error] = body["errors"]
    assert error["loc"] == ["body", "model", "family"] and error["type"] == "value_error"
    assert body["detail"] == f"model.family: {error['msg']}"


def test_an_invalid_query_parameter_is_located_in_the_query(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/studies", params={"limit": -1}), 422, "/v1/studies")
    assert [error["loc"] for error in body["errors"]] == [["query", "limit"]]
    assert body["detail"].startswith("query.limit: ")


def test_an_oversized_body_is_a_problem(client: TestClient) -> None:
    response = client.post("/v1/studies", content=b"{" + b" " * 2_000_000 + b"}",
                           headers={"Content-Type": "application/json"})
    assert "larger than" in assert_problem(response, 413, "/v1/studies")["detail"]


def test_openapi_documents_every_error_as_a_problem_with_shared_components(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    shared = {"400": "AmbiguousId", "401": "Unauthorized", "413": "BodyTooLarge", "422": "ValidationFailed"}
    assert {name: response["content"] for name, response in schema["components"]["responses"].items()} == {
        name: problem for name in shared.values()}
    properties = schema["components"]["schemas"]["Problem"]["properties"]
    assert {"type", "title", "status", "detail", "errors"} <= set(properties)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    errors = [(f"{method} {path} {code}", code, response) for path, operations in schema["paths"].items()
              for method, operation in operations.items() for code, response in operation["responses"].items()
              if code.startswith("4")]
    assert len(errors) > 30
    for where, code, response in errors:
        if code in shared:
            assert response == {"$ref": f"#/components/responses/{shared[code]}"}, where
        else:
            assert response["content"] == problem, where
