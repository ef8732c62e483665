"""Property-based API testing from our own OpenAPI schema: no server errors, every response as documented.

Schemathesis generates requests for every operation (valid and invalid bodies, paths, queries, headers)
against the ASGI app in-process on SQLite, authenticated with a real token; at most MAX_EXAMPLES per operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.app import create_app
from service.db import SessionFactory
from service.settings import Settings
from service.tokens import create_token
from workers.trial_task import WorkerContext, run_attempt

if TYPE_CHECKING:
    from tests.service.conftest import SentTasks

MAX_EXAMPLES = 25
# A schema-valid spec may still be refused with 422: registries, limits and cross-field rules live in check_spec,
# not in JSON Schema. Every other check runs (server errors, status codes, response schemas, content types, ...).
NOT_EXPRESSIBLE_IN_THE_SCHEMA = [positive_data_acceptance]


def test_every_operation_conforms_to_the_schema(migrated: Settings, session_factory: SessionFactory,
                                                 sent: SentTasks, spec_dict: dict[str, Any]) -> None:
    app = create_app(migrated)
    headers = {"Authorization": f"Bearer {create_token(session_factory, 'schemathesis')}"}
    failures: dict[str, str] = {}
    with TestClient(app, headers=headers) as client:  # the lifespan opens database, storage and broker client
        tiny = {"model": {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}},
                "budget": {"steps": 20, "batch_size": 32, "eval_every": 10}, "n_trials": 2, "parallelism": 1}
        study_id = client.post("/v1/studies", json={**spec_dict, **tiny}).json()["id"]
        run_attempt(WorkerContext(migrated, session_factory, sent),
                    client.get(f"/v1/studies/{study_id}/trials").json()["items"][0]["id"])
        external = {"name": "ask/tell", "kind": "external", "search_space": spec_dict["search_space"],
                    "n_trials": 1000, "parallelism": 64, "parametrization": "mup", "optimizer": "adamw"}
        external_id = client.post("/v1/studies", json=external).json()["id"]
        asked = client.post(f"/v1/studies/{external_id}/trials/ask").json()["number"]
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                """As generated (mostly unknown ids), then again aimed at a real study with a finished trial
                (ask/tell routes: at an external study and a trial it handed out)."""
                case.call_and_validate(headers=headers, excluded_checks=NOT_EXPRESSIBLE_IN_THE_SCHEMA)
                if "study_id" in (case.path_parameters or {}):
                    asktell = case.method.upper() == "POST" and "/trials/" in case.path
                    case.path_parameters["study_id"] = external_id if asktell else study_id
                    if asktell and "number" in case.path_parameters:
                        case.path_parameters["number"] = asked
                    case.call_and_validate(headers=headers, excluded_checks=NOT_EXPRESSIBLE_IN_THE_SCHEMA)

            try:
                check()
            except (Exception, BaseExceptionGroup) as error:  # collect every operation's failure, not the first only
                failures[operation.label] = str(error)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{error}" for label, error in failures.items())
