"""transfer_check studies: spec rules, the enqueued grid, trials run in-process, and the /check analysis."""

from __future__ import annotations

import copy
import math
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select

import service.studies
from service.dispatch import dispatch
from service.models import Event, Study, TrialAttempt
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC, kind_of, parse_spec
from service.spec import SpecError, TransferCheckSpec
from service.kinds.transfer_check import KIND
from service.studies import create_study
from service.tokens import create_token
from test_transfer_api import tune_spec, tuned_study  # noqa: F401  (fixtures shared with the transfer tests)
from workers.trial_task import WorkerContext, run_attempt

CHECK_SPEC: dict[str, Any] = {
    "name": "check-mlp", "kind": "transfer_check",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 10, "batch_size": 32, "eval_every": 10, "schedule": "constant"},
    "hyperparameters": {"lr": 0.01},
    "sizes": [{"width": 16, "depth": 1}, {"width": 32, "depth": 1}, {"width": 64, "depth": 1}],
    "octaves": 1.0, "step": 0.5, "seeds": 2, "max_extensions": 0,
}


@pytest.fixture
def check_spec() -> dict[str, Any]:
    return copy.deepcopy(CHECK_SPEC)


def run_all(ctx: WorkerContext, study_id: str) -> list[str]:
    """Run the study's attempts in this process, as a single worker would (packs take several at once); the final
    state of every attempt, in the order they were queued."""
    sent = ctx.enqueue
    dispatch(ctx.session_factory, study_id, sent)
    while sent:
        run_attempt(ctx, sent.pop(0)[0])
    with ctx.session_factory() as session:
        return list(session.scalars(select(TrialAttempt.state).where(TrialAttempt.study_id == study_id)
                                    .order_by(TrialAttempt.queued_at, TrialAttempt.id)))


@pytest.fixture
def ctx(migrated: Settings, session_factory: Any, sent: Any) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


def test_the_default_grid_is_13_lr_points_per_size_and_seed() -> None:
    spec = STUDY_SPEC.validate_python({**CHECK_SPEC, "octaves": 3.0, "step": 0.5})
    assert isinstance(spec, TransferCheckSpec)
    assert spec.multipliers_log2() == [k / 2 for k in range(-6, 7)]
    assert spec.n_trials == 3 * 13 * 2


@pytest.mark.parametrize(("change", "loc", "says"), [
    ({"sizes": CHECK_SPEC["sizes"][:2]}, ("sizes",), "at least 3"),
    ({"seeds": 1}, ("seeds",), "greater than or equal to 2"),
    ({"model": None}, (), "give a source tune study, or all of"),
    ({"n_trials": 7}, (), "the grid has 30 points"),
    ({"sizes": [{"width": 16, "depth": 1}] * 2 + [{"width": 4096, "depth": 1000}]}, ("sizes", 2), "parameters, above"),
    ({"model": {"family": "nope", "base": {"width": 16, "depth": 1}}}, ("model", "family"), "unknown model family"),
])
def test_bad_specs_are_refused_with_the_field_and_a_reason(migrated: Settings, change: dict[str, Any],
                                                           loc: tuple[Any, ...], says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**CHECK_SPEC, **change}, migrated)
    assert any(p.loc == loc and says in p.msg for p in error.value.problems), error.value.problems


def test_every_grid_point_is_enqueued_once(session_factory: Any, storage: Any) -> None:
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python(CHECK_SPEC))
    trials = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials
    fixed = [t.system_attrs["fixed_params"] for t in trials]
    points = {(p["size_index"], p["log2_mult"], p["seed"]) for p in fixed}
    assert all(t.state == OptunaState.WAITING for t in trials) and len(trials) == 30
    assert points == {(i, m, s) for i in range(3) for m in (-1.0, -0.5, 0.0, 0.5, 1.0) for s in range(2)}
    assert study.spec["n_trials"] == 30


def test_check_reports_an_optimum_per_size_and_a_verdict(client: TestClient, ctx: WorkerContext,
                                                          storage: Any, check_spec: dict[str, Any]) -> None:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(check_spec))
    assert run_all(ctx, study.id) == ["complete"] * 30

    body = client.get(f"/v1/studies/{study.id}/check").json()
    assert body["status"] == "completed" and body["final"] and body["tuned_value"] == 0.01
    assert [s["size"] for s in body["sizes"]] == ["w16xd1", "w32xd1", "w64xd1"]
    grid = [math.log2(0.01) + m for m in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    for size in body["sizes"]:
        assert size["log2_values"] == pytest.approx(grid)
        assert grid[0] <= size["optimum_log2"] <= grid[-1]
        low, high = size["interval"]
        assert low <= high
    assert body["verdict"] == "inconclusive" and body["seeds_needed"] == 3  # 2 seeds: no bootstrap interval
    assert any("at least 3" in reason for reason in body["reasons"])
    assert [s["seeds"] for s in body["sizes"]] == [2, 2, 2] and body["sizes"][1]["drift_interval"] is not None
    assert len(body["points"]) == 30 and {p["state"] for p in body["points"]} == {"complete"}
    assert sorted({p["seed"] for p in body["points"]}) == [0, 1]

    detail = client.get(f"/v1/studies/{study.id}").json()["result"]
    assert detail == {"kind": "transfer_check", "hparam": "lr", "verdict": body["verdict"], "drift": body["max_drift"],
                      "drift_interval": body["max_drift_interval"], "seeds_needed": 3,
                      "direction": body["direction"], "monotone": body["monotone"], "reasons": body["reasons"]}
    other = create_token(ctx.session_factory, "other-user", tenant="other")
    assert client.get(f"/v1/studies/{study.id}/check", headers={"Authorization": f"Bearer {other}"}).status_code == 404

    png = client.get(f"/v1/studies/{study.id}/check.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert png.content == client.get(f"/v1/studies/{study.id}/plots/landscape.png").content, "one picture"


@pytest.mark.parametrize("step", [5e-324, 0.01])
def test_a_grid_step_finer_than_a_tenth_of_an_octave_is_422(client: TestClient, check_spec: dict[str, Any],
                                                             step: float) -> None:
    """The grid is built from octaves / step: a denormal step once made a 10^300-point grid and took the server down."""
    response = client.post("/v1/studies", json={**check_spec, "step": step})
    assert response.status_code == 422, response.text
    assert any(p["loc"] == ["body", "step"] and "greater than or equal to 0.1" in p["msg"]
               for p in response.json()["errors"]), response.text


def test_diverged_points_are_recorded_and_shown_as_diverged(client: TestClient, ctx: WorkerContext,
                                                             storage: Any, check_spec: dict[str, Any]) -> None:
    check_spec.update(hyperparameters={"lr": 1e6}, octaves=0.5)
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(check_spec))
    states = run_all(ctx, study.id)
    assert "diverged" in states

    body = client.get(f"/v1/studies/{study.id}/check").json()
    diverged = [p for p in body["points"] if p["diverged"]]
    assert len(diverged) == states.count("diverged") and all(p["loss"] is None for p in diverged)
    assert sum(sum(s["diverged"]) for s in body["sizes"]) == len(diverged)
    assert client.get(f"/v1/studies/{study.id}/check.png").status_code == 200


def test_a_check_takes_setup_and_best_values_from_its_source_study(
        client: TestClient, ctx: WorkerContext, storage: Any, tuned_study: str) -> None:
    spec = {"name": "from-source", "kind": "transfer_check", "source": {"study_id": tuned_study},
            "sizes": [{"width": 16, "depth": 1}, {"width": 32, "depth": 1}, {"width": 32, "depth": 2}],
            "octaves": 0.5, "seeds": 2, "max_extensions": 0}
    submitted = STUDY_SPEC.validate_python(spec)
    with ctx.session_factory() as session:
        resolved = kind_of(submitted).resolve(session, submitted, "default")
    study = create_study(ctx.session_factory, storage, resolved)
    assert set(run_all(ctx, study.id)) == {"complete"}

    best = min(client.get(f"/v1/studies/{tuned_study}/trials").json()["items"], key=lambda t: t["value"])
    body = client.get(f"/v1/studies/{study.id}/check").json()
    assert body["tuned_value"] == pytest.approx(best["params"]["lr"])
    assert len(body["sizes"]) == 3 and len(body["points"]) == 18


def test_check_answers_409_for_other_kinds_and_before_results(client: TestClient, session_factory: Any,
                                                              storage: Any, tuned_study: str) -> None:
    assert client.get(f"/v1/studies/{tuned_study}/check").status_code == 409
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python(CHECK_SPEC))
    response = client.get(f"/v1/studies/{study.id}/check")
    assert response.status_code == 409 and "not enough finished trials" in response.json()["detail"]
    with session_factory() as session:
        assert session.get(Study, study.id) is not None


def test_an_unfinished_study_has_no_verdict_yet(client: TestClient, session_factory: Any, storage: Any) -> None:
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python(CHECK_SPEC))
    assert client.get(f"/v1/studies/{study.id}").json()["result"] is None


def test_a_source_that_cannot_give_a_setup_is_refused_at_submit(client: TestClient, session_factory: Any,
                                                                 storage: Any, tuned_study: str,
                                                                 tune_spec: dict[str, Any]) -> None:
    running = create_study(session_factory, storage, STUDY_SPEC.validate_python(tune_spec))
    theirs = create_study(session_factory, storage, STUDY_SPEC.validate_python(tune_spec), tenant="other")
    check = create_study(session_factory, storage, STUDY_SPEC.validate_python(CHECK_SPEC))
    sources = [("no-such-study", "you have no study with id"), (theirs.id, "you have no study with id"),
               (check.id, "a source must be a completed tune study"), (running.id, "once it has completed")]
    spec = {"name": "from-source", "kind": "transfer_check", "sizes": CHECK_SPEC["sizes"], "octaves": 0.5}
    for study_id, says in sources:
        response = client.post("/v1/studies", json={**spec, "source": {"study_id": study_id}})
        assert response.status_code == 422, response.text
        [problem] = response.json()["errors"]
        assert problem["loc"] == ["body", "source", "study_id"] and says in problem["msg"], problem

    response = client.post("/v1/studies", json={**spec, "source": {"study_id": tuned_study}})
    assert response.status_code == 201, response.text
    stored = client.get(f"/v1/studies/{response.json()['id']}").json()["spec"]
    source = client.get(f"/v1/studies/{tuned_study}").json()
    assert stored["source"] == {"study_id": tuned_study}, "the submitted source is kept as provenance"
    assert stored["model"]["base"] == source["spec"]["model"]["base"] and stored["budget"] == source["spec"]["budget"]
    assert stored["hyperparameters"]["lr"] == pytest.approx(source["best_params"]["lr"])


def test_a_source_may_be_named_by_a_unique_prefix_of_its_id(client: TestClient, session_factory: Any, storage: Any,
                                                            tuned_study: str, tune_spec: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As every id the service takes: the spec stores the full id the prefix stands for; an ambiguous one is a 422."""
    spec = {"name": "from-prefix", "kind": "transfer_check", "sizes": CHECK_SPEC["sizes"], "octaves": 0.5,
            "source": {"study_id": tuned_study[:8]}}
    response = client.post("/v1/studies", json=spec)
    assert response.status_code == 201, response.text
    stored = client.get(f"/v1/studies/{response.json()['id']}").json()["spec"]
    assert stored["source"] == {"study_id": tuned_study}
    best = client.get(f"/v1/studies/{tuned_study}").json()["best_params"]
    assert stored["hyperparameters"]["lr"] == pytest.approx(best["lr"])

    twin_id = tuned_study[:12] + ("1" if tuned_study[12] != "1" else "2") + tuned_study[13:]
    monkeypatch.setattr(service.studies, "new_id", lambda: twin_id)
    create_study(session_factory, storage, STUDY_SPEC.validate_python(tune_spec))
    response = client.post("/v1/studies", json=spec)
    assert response.status_code == 422, response.text
    [problem] = response.json()["errors"]
    assert problem["loc"] == ["body", "source", "study_id"] and "ambiguous" in problem["msg"], problem
    assert tuned_study in problem["msg"] and twin_id in problem["msg"]


def test_a_grid_grows_by_octaves_while_an_optimum_sits_at_its_edge(client: TestClient, ctx: WorkerContext,
                                                                    storage: Any, check_spec: dict[str, Any]) -> None:
    """An LR far too small puts every size's optimum at the top edge: the grid grows there, up to the bound."""
    check_spec.update(hyperparameters={"lr": 1e-5}, octaves=0.5, max_extensions=2)
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(check_spec))
    states = run_all(ctx, study.id)

    body = client.get(f"/v1/studies/{study.id}/check").json()
    grown = {(e["size_index"], e["log2_mult"]) for e in body["extensions"]}
    assert grown == {(i, m) for i in range(3) for m in (1.5, 2.5)}  # +1 octave twice above the 0.5 edge
    assert len(states) == len(body["points"]) == (3 * 3 + 6) * 2
    assert client.get(f"/v1/studies/{study.id}").json()["spec"]["n_trials"] == 30
    assert all(s["log2_values"][-1] == pytest.approx(math.log2(1e-5) + 2.5) for s in body["sizes"])
    assert body["verdict"] == "inconclusive" and all(s["at_edge"] for s in body["sizes"])  # the bound was reached


def test_any_tuned_value_can_be_checked(client: TestClient, ctx: WorkerContext, storage: Any,
                                        check_spec: dict[str, Any]) -> None:
    check_spec.update(hparam="init_std", hyperparameters={"lr": 0.01, "init_std": 0.5}, octaves=0.5)
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(check_spec))
    configs = [KIND.trial_config(STUDY_SPEC.validate_python(check_spec), p)
               for p in KIND.grid_points(STUDY_SPEC.validate_python(check_spec))]
    assert sorted({c.hparams.init_std for c in configs}) == pytest.approx([0.5 / 2 ** 0.5, 0.5, 0.5 * 2 ** 0.5])
    assert {c.hparams.lr for c in configs} == {0.01}
    assert set(run_all(ctx, study.id)) == {"complete"}
    body = client.get(f"/v1/studies/{study.id}/check").json()
    assert body["hparam"] == "init_std" and body["tuned_value"] == 0.5
    assert sorted({round(p["value"], 9) for p in body["points"]}) == pytest.approx([0.5 / 2 ** 0.5, 0.5,
                                                                                   0.5 * 2 ** 0.5])


@pytest.mark.parametrize(("change", "says"), [
    ({"hparam": "weight_decay"}, "give a positive tuned weight_decay"),
    ({"hparam": "warmup_frac", "hyperparameters": {"lr": 0.01, "warmup_frac": 0.6}}, "must stay below 1"),
])
def test_a_grid_that_cannot_train_is_refused(migrated: Settings, change: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**CHECK_SPEC, **change}, migrated)
    assert any(p.loc == ("hparam",) and says in p.msg for p in error.value.problems), error.value.problems


def test_attn_mult_is_checked_only_on_models_with_attention(client: TestClient, migrated: Settings) -> None:
    refused = client.post("/v1/studies", json={**CHECK_SPEC, "hparam": "attn_mult"})
    assert refused.status_code == 422, refused.text
    error, = [e for e in refused.json()["errors"] if e["loc"][-1] == "hparam"]
    assert "mlp family's model has no attention" in error["msg"] and "output_mult" in error["msg"]
    gpt = {**CHECK_SPEC, "hparam": "attn_mult", "model": {"family": "gpt", "base": {"width": 16, "depth": 1},
                                                          "args": {"head_dim": 8}},
           "dataset": {"name": "pytext", "args": {"max_bytes": 100_000, "seq_len": 16}}}
    assert parse_spec(gpt, migrated).hparam == "attn_mult"


def test_a_depth_mup_study_on_two_layer_blocks_carries_the_measured_warning(client: TestClient) -> None:
    created = client.post("/v1/studies", json={**CHECK_SPEC, "parametrization": "depth_mup"})
    assert created.status_code == 201, created.text
    (warning,) = created.json()["warnings"]
    assert "+0.56" in warning and "+0.60" in warning and "'completep'" in warning
    assert client.get(f"/v1/studies/{created.json()['id']}").json()["warnings"] == [warning]
    assert client.post("/v1/studies", json={**CHECK_SPEC, "name": "cp"}).json()["warnings"] == []


def test_a_packed_check_trains_each_sizes_points_together_and_gets_what_one_by_one_gets(
        ctx: WorkerContext, storage: Any, check_spec: dict[str, Any]) -> None:
    """Five points in flight: each size's five multipliers (one seed) are one pack; losses as when run alone."""
    losses = {}
    for pack in (1, "auto"):
        study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(
            {**check_spec, "parallelism": 5, "pack": pack}))
        assert set(run_all(ctx, study.id)) == {"complete"}
        with ctx.session_factory() as session:
            attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id)))
            packs = list(session.scalars(select(Event.payload["pack"].as_integer())
                                         .where(Event.study_id == study.id, Event.type == "trial_started")))
        losses[pack] = {(a.params["size_index"], a.params["log2_mult"], a.params["seed"]): a.value for a in attempts}
        assert set(packs) == ({1} if pack == 1 else {5})
    assert losses[1].keys() == losses["auto"].keys() and len(losses[1]) == 30
    for point, loss in losses[1].items():
        assert losses["auto"][point] == pytest.approx(loss, rel=1e-5), point
