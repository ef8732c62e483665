"""shape_schedule studies: spec rules, the trial grid, trials run in-process, and the /schedule answer."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_transfer_check import run_all

from service.kinds.shape_schedule import trial_config
from service.settings import Settings
from service.spec import STUDY_SPEC, ShapeScheduleSpec, SpecError, parse_spec
from service.studies import create_study
from workers.trial_task import WorkerContext

SCHEDULE_SPEC: dict[str, Any] = {
    "name": "schedule-mlp", "kind": "shape_schedule",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 40, "batch_size": 32, "eval_every": 10},
    "hyperparameters": {"lr": 0.01},
    "axis": "width", "values": [8, 32], "seeds": 2, "budgets": [5, 10, 20, 40],
}


@pytest.fixture
def ctx(migrated: Settings, session_factory: Any, sent: Any) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


@pytest.fixture
def finished_study(ctx: WorkerContext, storage: Any) -> str:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(copy.deepcopy(SCHEDULE_SPEC)))
    assert set(run_all(ctx, study.id)) == {"complete"}
    return study.id


def test_the_grid_is_shapes_x_sizes_x_seeds_x_budgets_each_a_wsd_run_to_its_budget() -> None:
    spec = STUDY_SPEC.validate_python({**SCHEDULE_SPEC, "sizes": [1, 2, 4]})
    assert isinstance(spec, ShapeScheduleSpec) and spec.n_trials == 2 * 3 * 2 * 4
    config = trial_config(spec, {"value_index": 1, "size_index": 2, "seed": 1, "budget_index": 1})
    assert config.shape.width == 32 and config.shape.depth == 4  # the axis is width, so sizes grow depth
    assert config.budget.steps == 10 and config.budget.schedule == "wsd" and config.budget.eval_every == 10


@pytest.mark.parametrize(("change", "loc", "says"), [
    ({"values": [8]}, ("values",), "at least 2"),
    ({"seeds": 1}, ("seeds",), "greater than or equal to 2"),
    ({"axis": "heads"}, ("axis",), "Input should be"),
    ({"budgets": [5, 10**6]}, ("budgets", 1), "MAX_STEPS"),
    ({"axis": "patch_size", "values": [2, 4]}, ("values", 0, "sizes", 0), ""),
])
def test_bad_specs_are_refused_with_the_field(migrated: Settings, change: dict[str, Any], loc: tuple[Any, ...],
                                             says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**SCHEDULE_SPEC, **change}, migrated)
    assert any(p.loc == loc and says in p.msg for p in error.value.problems), error.value.problems


def test_schedule_returns_fits_segments_saving_and_flags(client: TestClient, finished_study: str) -> None:
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    assert len(trials) == 16 and all(t["flops"] > 0 for t in trials)
    budget = sorted(t["flops"] for t in trials)[len(trials) // 2]

    response = client.get(f"/v1/studies/{finished_study}/schedule", params={"budget_flops": budget})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tier"] == "proxy" and not body["heuristic"] and body["final"]
    assert set(body["fits"]) == {"width=8", "width=32"}
    assert all(f["form"] and f["n_runs"] == 2 and f["param_intervals"] for f in body["fits"].values())
    assert body["segments"] and all(s["flops_enter"] < s["flops_exit"] and s["loss_enter"] > s["loss_exit"]
                                    for s in body["segments"])
    assert body["segments"][-1]["flops_exit"] == pytest.approx(body["adaptive_flops"])
    assert body["static"]["shape"] in body["fits"]
    assert body["saving_interval"]["lo"] <= body["saving_interval"]["hi"]
    assert isinstance(body["low_confidence"], bool) and isinstance(body["reasons"], list)


BAD_QUERIES: list[tuple[dict[str, Any], str]] = [
    ({}, "exactly one of"), ({"target_loss": 1.0, "budget_flops": 1e9}, "exactly one of"),
    ({"target_loss": 1.0, "target_width": 64}, "the schedule's to choose"),
    ({"target_loss": 100.0}, "need start_loss > target_loss"),
]


def test_one_proxy_size_projects_by_the_heuristic_tier_b_and_bad_queries_are_422(
        client: TestClient, finished_study: str) -> None:
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    loss = sorted(t["value"] for t in trials)[len(trials) // 2]
    body = client.get(f"/v1/studies/{finished_study}/schedule",
                      params={"target_loss": loss, "target_depth": 4}).json()
    assert body["tier"] == "B" and body["heuristic"] and body["compute_factor"] > 1
    assert body["target_loss"] == pytest.approx(loss) and body["segments"]

    for params, says in BAD_QUERIES:
        response = client.get(f"/v1/studies/{finished_study}/schedule", params=params)
        assert response.status_code == 422 and says in response.text, (params, response.text)
