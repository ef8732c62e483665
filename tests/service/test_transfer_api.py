"""POST /v1/studies/{id}/transfer: the plan equals the core's transfer_plan for the best trial; 409s and 422s."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scaletune.client import Client
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.shapes import Shape
from scaletune.transfer import apply_transfer, factory_transfer_plan, transfer_plan
from service.tokens import create_token
from service.cli import app
from service.dispatch import dispatch
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC
from service.studies import create_study
from workers.trial_task import WorkerContext, run_attempt

TARGET = {"width": 256, "depth": 4}


@pytest.fixture
def tune_spec(spec_dict: dict[str, Any]) -> dict[str, Any]:
    spec_dict["model"] = {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}}
    spec_dict["parametrization"] = "completep"
    spec_dict["budget"] = {"steps": 10, "batch_size": 32, "eval_every": 10, "schedule": "cosine"}
    spec_dict["search_space"] = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    spec_dict["hyperparameters"] = {"output_mult": 2.0}
    spec_dict.update(n_trials=2, parallelism=1)
    return spec_dict


@pytest.fixture
def tuned_study(client: TestClient, migrated: Settings, session_factory: Any, storage: Any, sent: Any,
                tune_spec: dict[str, Any]) -> str:
    """A tune study whose two trials ran in this process."""
    ctx = WorkerContext(migrated, session_factory, sent)
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python(tune_spec))
    dispatch(session_factory, study.id, sent)
    while sent:
        assert run_attempt(ctx, sent.pop(0)[0]) == "complete"
    return study.id


def test_the_plan_equals_the_core_transfer_of_the_best_trial(client: TestClient, tuned_study: str,
                                                             migrated: Settings) -> None:
    response = client.post(f"/v1/studies/{tuned_study}/transfer",
                           json={"target": TARGET, "batch_size": 128, "batch_rule": "sqrt"})
    assert response.status_code == 200, response.text
    plan = response.json()

    trials = client.get(f"/v1/studies/{tuned_study}/trials").json()["items"]
    best = min(trials, key=lambda t: t["value"])
    expected = transfer_plan("mlp", dataset_spec("digits", {}, migrated.DATA_ROOT), {}, Shape(16, 1),
                             Shape(**TARGET), "completep", HParams(output_mult=2.0, weight_decay=0.0,
                                                                   lr=best["params"]["lr"]),
                             "adamw", tuned_batch_size=32, batch_size=128, tuned_steps=10, batch_rule="sqrt")
    assert plan["hparams"] == pytest.approx(expected.plan.hparams)
    assert plan["groups"] == expected.to_dict()["groups"]
    assert plan["branch_multiplier"] == expected.plan.branch_multiplier
    assert plan["branch_multiplier"] == pytest.approx(1 / 4)  # completep: depth ratio 4 -> 4^-1
    assert plan["batch_scaling"]["lr_factor"] == pytest.approx(2.0)
    assert plan["target"] == TARGET and plan["base"] == {"width": 16, "depth": 1}
    assert plan["provenance"]["study_id"] == tuned_study
    assert plan["provenance"]["best_trial"] == best["number"] and plan["provenance"]["value"] == best["value"]
    assert plan["provenance"]["scaletune_version"]
    assert list(plan) == list(expected.to_dict())  # the documented keys, in order
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TransferPlan"]
    assert list(schema["properties"]) == list(plan) and set(schema["required"]) == set(plan)
    assert "module_multipliers" in schema["description"]


def test_a_billion_parameter_target_is_planned_in_well_under_a_second(client: TestClient, tuned_study: str) -> None:
    start = time.process_time()
    response = client.post(f"/v1/studies/{tuned_study}/transfer", json={"target": {"width": 16384, "depth": 8}})
    assert response.status_code == 200, response.text
    assert response.json()["provenance"]["n_params"] > 1e9
    assert time.process_time() - start < 1.0


def test_no_plan_before_a_trial_completes(client: TestClient, tune_spec: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json=tune_spec).json()["id"]
    response = client.post(f"/v1/studies/{study_id}/transfer", json={"target": TARGET})
    assert response.status_code == 409 and "no completed trial" in response.json()["detail"]
    assert client.post("/v1/studies/nope/transfer", json={"target": TARGET}).status_code == 404


@pytest.mark.parametrize(("body", "loc", "says"), [
    ({"target": {"width": 0, "depth": 2}}, ["body", "target", "width"], "greater than or equal to 1"),
    ({"target": {"width": -8, "depth": 2}}, ["body", "target", "width"], "greater than or equal to 1"),
    ({"target": {"width": 64, "depth": 2}, "colour": "red"}, ["body", "colour"], "Extra inputs"),
    ({"target": {"width": 64, "depth": 2, "heads": 4}}, ["body", "target", "heads"], "Extra inputs"),
    ({"target": {"width": 65_536, "depth": 1024}}, ["body", "target"], "SCALETUNE_MAX_TARGET_PARAMS"),
    ({"target": {"width": 64, "depth": 2}, "optimizer": "sgd"}, ["body", "optimizer"], "do not transfer"),
    ({"target": {"width": 64, "depth": 2}, "batch_rule": "sqrt"}, ["body", "batch_size"], "needs batch_size"),
])
def test_bad_targets_are_422_with_a_reason(client: TestClient, tuned_study: str, body: dict[str, Any],
                                           loc: list[str], says: str) -> None:
    response = client.post(f"/v1/studies/{tuned_study}/transfer", json=body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["errors"]
    assert problem["loc"] == loc and says in problem["msg"]


def test_cli_transfer_plans_the_users_own_model_locally(tuned_study: str, live_url: str, session_factory: Any,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # where own_models.py, the "user's" code, lives
    token = create_token(session_factory, "own-model")
    env = {"SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": token}
    command = ["transfer", tuned_study, "--factory", "own_models:build", "--width", "64", "--depth", "4"]
    refused = CliRunner().invoke(app, command, env=env)
    assert refused.exit_code == 2
    assert "blocks.0, blocks.1, blocks.2, blocks.3" in refused.output and "branch_outputs" in refused.output

    out = tmp_path / "plan.json"
    made = CliRunner().invoke(app, [*command, "--branch-outputs", "blocks.*.fc2", "-o", str(out)], env=env)
    assert made.exit_code == 0, made.output
    plan = json.loads(out.read_text())

    own_models = importlib.import_module("own_models")
    best = Client(live_url, token=token).study(tuned_study).best_params
    x = next(get_dataset("digits", {}).train_batches(8, seed=0))[0]
    expected = factory_transfer_plan(own_models.build, "own_models:build", Shape(16, 1), Shape(64, 4), "completep",
                                     HParams(output_mult=2.0, lr=best["lr"]), branch_outputs=["blocks.*.fc2"],
                                     example_input=x)
    assert {k: v for k, v in plan.items() if k != "provenance"} == \
        {k: v for k, v in expected.to_dict().items() if k != "provenance"}
    assert plan["provenance"]["study_id"] == tuned_study

    model = own_models.build(64, 4)
    groups = apply_transfer(model, plan)
    assert torch.count_nonzero(model.out.weight) == 0  # muP readout zero-init
    assert model.stem.weight.std().item() == pytest.approx(1 / 8, rel=0.1)  # input init 1/sqrt(64 features)
    h = torch.randn(3, 64)
    block = model.blocks[2]
    torch.testing.assert_close(block(h), h + torch.nn.functional.linear(
        torch.relu(block.fc1(block.norm(h))), block.fc2.weight, block.fc2.bias) * 0.25)  # branch x r^-1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
