"""shape_schedule studies: spec rules, the trial grid, trials run in-process, and the /schedule answer."""

from __future__ import annotations

import copy
import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_transfer_check_study import run_all

import workers.trial_task
from scaletune.adaptive import CHECKPOINT
from scaletune.runner import prepare_trial
from service.db import create_db_engine, make_session_factory, upgrade_database, write_session
from service.kinds import shape_schedule
from service.kinds.shape_schedule import KIND as SCHEDULE
from service.kinds.shape_schedule import executable_moves
from service.models import TrialAttempt, TrialState, utcnow
from service.reconcile import reconcile_once
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC, parse_spec
from service.optuna_study import get_storage
from service.spec import ShapeScheduleSpec, SpecError
from service.studies import create_study
from tests.service.conftest import SentTasks
from workers.trial_task import WorkerContext, run_attempt

SCHEDULE_SPEC: dict[str, Any] = {
    "name": "schedule-mlp", "kind": "shape_schedule",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 40, "batch_size": 32, "eval_every": 10},
    "hyperparameters": {"lr": 0.01},
    "axis": "width", "values": [8, 32], "seeds": 2, "budgets": [5, 10, 20, 40],
}


@pytest.fixture(autouse=True)
def few_replicates(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 bootstrap refits per shape instead of 30: these tests check that intervals exist, not how wide they are."""
    monkeypatch.setattr(shape_schedule, "N_BOOTSTRAP", 8)


@pytest.fixture
def ctx(migrated: Settings, session_factory: Any, sent: Any) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


def sqlite_path(settings: Settings) -> Path:
    return Path(settings.DATABASE_URL.removeprefix("sqlite:///"))


@pytest.fixture(scope="session")
def trained_schedule(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """SCHEDULE_SPEC's study trained once per session, in its own database: its database file and the study id.

    Four grid points in flight, so each worker claim is a pack of one curve's four budgets."""
    folder = tmp_path_factory.mktemp("trained-schedule")
    settings = Settings(HOME=folder / "home", DATABASE_URL=f"sqlite:///{folder / 'st.db'}", DATA_ROOT=folder / "data")
    settings.ensure_dirs()
    upgrade_database(settings.DATABASE_URL)
    engine = create_db_engine(settings.DATABASE_URL)
    ctx = WorkerContext(settings, make_session_factory(engine), SentTasks())
    study = create_study(ctx.session_factory, get_storage(settings.DATABASE_URL),
                         STUDY_SPEC.validate_python(copy.deepcopy(SCHEDULE_SPEC) | {"parallelism": 4}))
    assert set(run_all(ctx, study.id)) == {"complete"}
    engine.dispose()
    return sqlite_path(settings), study.id


@pytest.fixture
def migrated(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The migrated database; a test that reads ``finished_study`` starts from a copy of the trained one."""
    if "finished_study" in request.fixturenames:
        trained, _ = request.getfixturevalue("trained_schedule")
        with closing(sqlite3.connect(trained)) as source, closing(sqlite3.connect(sqlite_path(settings))) as target:
            source.backup(target)  # WAL-safe: the copy holds every committed write
    upgrade_database(settings.DATABASE_URL)
    return settings


@pytest.fixture
def finished_study(migrated: Settings, trained_schedule: tuple[Path, str]) -> str:
    """SCHEDULE_SPEC's completed study (16 trials) in this test's database, trained once per session."""
    return trained_schedule[1]


def test_the_grid_is_shapes_x_sizes_x_seeds_x_budgets_each_a_wsd_run_to_its_budget() -> None:
    spec = STUDY_SPEC.validate_python({**SCHEDULE_SPEC, "sizes": [1, 2, 4]})
    assert isinstance(spec, ShapeScheduleSpec) and spec.n_trials == 2 * 3 * 2 * 4
    config = SCHEDULE.trial_config(spec, {"value_index": 1, "size_index": 2, "seed": 1, "budget_index": 1})
    assert config.shape.width == 32 and config.shape.depth == 4  # the axis is width, so sizes grow depth
    assert config.budget.steps == 10 and config.budget.schedule == "wsd" and config.budget.eval_every == 10


def test_a_packed_grid_trains_each_curve_as_one_pack(client: TestClient, finished_study: str) -> None:
    """Four points in flight, four budgets: each pack is one curve (one shape, size and seed; each member its own
    WSD run to its budget). That a member's losses equal its run alone is tests/core/test_packs.py's."""
    spec = STUDY_SPEC.validate_python(SCHEDULE_SPEC | {"parallelism": 4})
    assert SCHEDULE.pack_size(spec, None) >= 4
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    packs: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:  # a pack's members are claimed, hence started, in one transaction
        packs.setdefault(trial["started_at"], []).append(trial)
    assert len(packs) == 4
    for members in packs.values():
        curves = {(t["params"]["value_index"], t["params"]["size_index"], t["params"]["seed"]) for t in members}
        assert len(curves) == 1 and sorted(t["params"]["budget_index"] for t in members) == [0, 1, 2, 3]
        for trial in members:  # each member trained its own budget's steps
            config = SCHEDULE.trial_config(spec, trial["params"])
            budget = config.budget
            assert trial["flops"] == pytest.approx(
                prepare_trial(config).flops_per_sample * budget.batch_size * budget.steps)


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


def test_the_fits_are_kept_until_a_finished_trial_changes_the_runs(
        client: TestClient, ctx: WorkerContext, finished_study: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shape_schedule, "N_BOOTSTRAP", 2)  # a refit is what is counted, not its intervals
    fitted: list[list[str]] = []
    fit = shape_schedule.fit_shapes
    monkeypatch.setattr(shape_schedule, "fit_shapes", lambda runs, **kw: fitted.append(sorted(runs)) or fit(runs, **kw))
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    with write_session(ctx.session_factory) as session:  # a third seed of width 8 finishes: new runs, new fits
        session.add_all(TrialAttempt(study_id=finished_study, number=100 + i, state=TrialState.complete,
                                     params={**t["params"], "seed": 2}, value=t["value"] * 1.01, flops=t["flops"])
                        for i, t in enumerate(trials) if t["params"]["value_index"] == 0 and t["params"]["seed"] == 0)
    budget = sorted(t["flops"] for t in trials)[len(trials) // 2]
    first = client.get(f"/v1/studies/{finished_study}/schedule", params={"budget_flops": budget}).json()
    assert fitted == [["width=32", "width=8"]] and first["fits"]["width=8"]["n_runs"] == 3
    again = client.get(f"/v1/studies/{finished_study}/schedule", params={"budget_flops": budget}).json()
    other = client.get(f"/v1/studies/{finished_study}/schedule", params={"budget_flops": budget * 2})
    assert again == first and other.status_code == 200 and len(fitted) == 1


def test_the_schedule_is_kept_until_a_finished_trial_changes_the_runs(
        client: TestClient, ctx: WorkerContext, finished_study: str, monkeypatch: pytest.MonkeyPatch) -> None:
    planned: list[float] = []
    dp = shape_schedule.schedule_from_fits
    monkeypatch.setattr(shape_schedule, "schedule_from_fits",
                        lambda fits, start, target, budget, **kw: planned.append(budget) or dp(fits, start, target,
                                                                                             budget, **kw))
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    budget = sorted(t["flops"] for t in trials)[len(trials) // 2] * 1.003  # a query no other test plans
    url = f"/v1/studies/{finished_study}/schedule"
    first = client.get(url, params={"budget_flops": budget}).json()
    again = client.get(url, params={"budget_flops": budget}).json()
    assert planned == [budget] and again == first and first["fits"]["width=8"]["n_runs"] == 2
    with write_session(ctx.session_factory) as session:  # a third seed of width 8 finishes: new runs, a new plan
        session.add_all(TrialAttempt(study_id=finished_study, number=200 + i, state=TrialState.complete,
                                     params={**t["params"], "seed": 2}, value=t["value"] * 1.02, flops=t["flops"])
                        for i, t in enumerate(trials) if t["params"]["value_index"] == 0 and t["params"]["seed"] == 0)
    after = client.get(url, params={"budget_flops": budget}).json()
    assert planned == [budget, budget] and after["fits"]["width=8"]["n_runs"] == 3


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


def test_the_detail_of_a_finished_study_summarises_its_schedule(client: TestClient, finished_study: str) -> None:
    result = client.get(f"/v1/studies/{finished_study}").json()["result"]
    assert result["kind"] == "shape_schedule" and result["shapes"] and result["static_shape"] in ("width=8", "width=32")
    best = min(t["value"] for t in client.get(f"/v1/studies/{finished_study}/trials").json()["items"])
    assert result["target_loss"] == pytest.approx(best) and result["adaptive_flops"] <= result["static_flops"] * 1.001


def test_three_proxy_sizes_project_by_tier_a(client: TestClient, ctx: WorkerContext, storage: Any) -> None:
    spec = {**SCHEDULE_SPEC, "values": [8, 16], "sizes": [1, 2, 4], "parallelism": 4}  # packs of one curve
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(spec))
    assert set(run_all(ctx, study.id)) == {"complete"}
    loss = sorted(t["value"] for t in client.get(f"/v1/studies/{study.id}/trials?limit=100").json()["items"])[30]

    body = client.get(f"/v1/studies/{study.id}/schedule", params={"target_loss": loss, "target_depth": 16}).json()
    assert body.get("tier") == "A" and not body["heuristic"], body
    assert body["segments"] and body["segments"][-1]["flops_exit"] == pytest.approx(body["adaptive_flops"])
    proxy = client.get(f"/v1/studies/{study.id}/schedule", params={"target_loss": loss}).json()
    assert body["adaptive_flops"] > proxy["adaptive_flops"]  # a 4x deeper target than the largest proxy costs more


SWITCHING_SPEC = {**SCHEDULE_SPEC, "values": [2, 16], "budgets": [5, 10, 20, 40]}


@pytest.fixture
def switching_study(ctx: WorkerContext, storage: Any) -> str:
    """Width 2 is cheapest early and plateaus; the schedule switches to width 16."""
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(copy.deepcopy(SWITCHING_SPEC)))
    assert set(run_all(ctx, study.id)) == {"complete"}
    return study.id


def test_a_schedule_run_resumes_from_its_checkpoint_in_the_shape_it_reached(
        client: TestClient, ctx: WorkerContext, switching_study: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trials = client.get(f"/v1/studies/{switching_study}/trials").json()["items"]
    budget = max(t["flops"] for t in trials)  # at this budget the plan starts in width 2 and grows to 16
    response = client.post(f"/v1/studies/{switching_study}/schedule/run", json={"budget_flops": budget, "seed": 1})
    assert response.status_code == 202, response.text
    run = response.json()["run"]
    assert [p["shape"]["width"] for p in run["phases"]] == [2, 16] and run["status"] == "queued"

    recorded = workers.trial_task.record_point

    def killed_after_the_switch(session_factory: Any, attempt_id: str, point: dict[str, Any]) -> None:
        recorded(session_factory, attempt_id, point)
        if point["phase"] == 1:
            raise RuntimeError("worker killed")

    monkeypatch.setattr(workers.trial_task, "record_point", killed_after_the_switch)
    assert run_attempt(ctx, run["id"]) == "failed"
    monkeypatch.undo()
    [retry] = ctx.enqueue.ids()
    assert (ctx.settings.ARTIFACTS_DIR / switching_study / run["id"] / CHECKPOINT).exists()
    assert run_attempt(ctx, ctx.enqueue.pop(0)[0]) == "complete"
    attempts = [t for t in client.get(f"/v1/studies/{switching_study}/trials?limit=100").json()["items"]
                if t["params"].get("schedule_run") == run["id"]]
    killed, resumed = sorted(attempts, key=lambda t: t["attempt"])
    assert resumed["id"] == retry and resumed["retry_of"] == killed["id"]
    # It continued after the surgery, in the grown shape, and did not train width 2 again.
    assert killed["intermediate"][-1]["shape"]["width"] == 16
    assert all(p["shape"]["width"] == 16 for p in resumed["intermediate"])
    assert resumed["intermediate"][0]["step"] <= killed["intermediate"][-1]["step"]

    again = client.post(f"/v1/studies/{switching_study}/schedule/run", json={"budget_flops": budget, "seed": 1})
    assert run_attempt(ctx, again.json()["run"]["id"]) == "complete"
    body = client.get(f"/v1/studies/{switching_study}/schedule", params={"budget_flops": budget}).json()
    interrupted, uninterrupted = body["runs"]
    assert interrupted["id"] == run["id"] and interrupted["attempts"] == 2 and uninterrupted["attempts"] == 1
    assert interrupted["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-5)
    for r in body["runs"]:
        assert r["status"] == "complete" and r["predicted_flops"] == pytest.approx(run["predicted_flops"])
        assert r["saving_predicted"] == pytest.approx(run["saving_predicted"]) and r["shape"]["width"] == 16
        if r["realised_flops"] is not None:
            assert r["realised_flops"] <= r["predicted_flops"] * 1.01
            assert r["saving_realised"] == pytest.approx(1 - r["realised_flops"] / body["static"]["flops"], rel=1e-3)
    assert all(f["n_runs"] == 2 for f in body["fits"].values())  # the runs are not grid points


def test_a_schedule_run_needs_a_completed_shape_schedule_and_one_target(
        client: TestClient, session_factory: Any, storage: Any, finished_study: str) -> None:
    unfinished = create_study(session_factory, storage, STUDY_SPEC.validate_python(copy.deepcopy(SCHEDULE_SPEC)))
    response = client.post(f"/v1/studies/{unfinished.id}/schedule/run", json={"target_loss": 1.0})
    assert response.status_code == 409 and "once every grid trial has finished" in response.text
    response = client.post(f"/v1/studies/{finished_study}/schedule/run", json={"target_loss": 1.0, "budget_flops": 1e6})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "target_loss"]
    response = client.post(f"/v1/studies/{finished_study}/schedule/run", json={"target_loss": 1.0, "lr": 3})
    assert response.status_code == 422


def test_a_schedule_run_whose_message_was_lost_is_resent_by_the_reconciler(
        client: TestClient, ctx: WorkerContext, finished_study: str) -> None:
    """The API queues the run on a completed study and sends a message nobody receives; the reconciler re-sends it."""
    budget = max(t["flops"] for t in client.get(f"/v1/studies/{finished_study}/trials").json()["items"])
    response = client.post(f"/v1/studies/{finished_study}/schedule/run", json={"budget_flops": budget})
    assert response.status_code == 202, response.text
    run_id = response.json()["run"]["id"]
    assert reconcile_once(ctx.session_factory, ctx.enqueue, ctx.settings) == []

    later = utcnow() + timedelta(seconds=ctx.settings.REQUEUE_AFTER + 1)
    assert [(a.kind, a.attempt_id) for a in reconcile_once(ctx.session_factory, ctx.enqueue, ctx.settings, now=later)] \
        == [("resent", run_id)]
    assert ctx.enqueue.ids() == [run_id]
    assert run_attempt(ctx, run_id) == "complete"


JOINT_SPEC = {**SCHEDULE_SPEC, "values": [2, 16], "second_axis": "depth", "second_values": [1, 2], "parallelism": 4}


def test_a_joint_spec_trains_the_product_of_both_axes() -> None:
    spec = STUDY_SPEC.validate_python(copy.deepcopy(JOINT_SPEC))
    assert isinstance(spec, ShapeScheduleSpec) and spec.n_trials == 4 * 2 * 4
    assert [spec.point_label(i) for i in range(4)] == ["width=2,depth=1", "width=2,depth=2", "width=16,depth=1",
                                                       "width=16,depth=2"]
    config = SCHEDULE.trial_config(spec, {"value_index": 3, "size_index": 0, "seed": 0, "budget_index": 0})
    assert (config.shape.width, config.shape.depth) == (16, 2)
    moves = executable_moves(spec).allowed
    assert moves("width=2,depth=1", "width=16,depth=2") and not moves("width=16,depth=2", "width=2,depth=2")


@pytest.mark.parametrize(("change", "says"), [
    ({"second_axis": "depth"}, "give second_axis and second_values together"),
    ({"second_axis": "width", "second_values": [8, 16]}, "second_axis must differ from axis"),
    ({"second_axis": "depth", "second_values": [1, 2], "sizes": [1, 2]}, "leave sizes out"),
])
def test_bad_joint_specs_are_refused(migrated: Settings, change: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**SCHEDULE_SPEC, **change}, migrated)
    assert says in str(error.value), error.value.problems


@pytest.mark.integration  # fits four laws with bootstrap twice: minutes on a busy 2-core machine
def test_a_joint_schedule_is_planned_shown_and_run(client: TestClient, ctx: WorkerContext, storage: Any) -> None:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(copy.deepcopy(JOINT_SPEC)))
    assert set(run_all(ctx, study.id)) == {"complete"}
    budget = max(t["flops"] for t in client.get(f"/v1/studies/{study.id}/trials?limit=100").json()["items"])
    body = client.get(f"/v1/studies/{study.id}/schedule", params={"budget_flops": budget}).json()
    assert body["axes"] == ["width", "depth"] and body["axis"] == "width"
    assert set(body["fits"]) == {"width=2,depth=1", "width=2,depth=2", "width=16,depth=1", "width=16,depth=2"}
    assert body["segments"] and {s["shape"] for s in body["segments"]} <= set(body["fits"])
    response = client.post(f"/v1/studies/{study.id}/schedule/run", json={"budget_flops": budget})
    assert response.status_code == 202, response.text
    run = response.json()["run"]
    last = run["phases"][-1]["shape"]
    assert f"width={last['width']},depth={last['depth']}" == body["segments"][-1]["shape"]
    assert run_attempt(ctx, run["id"]) == "complete"
    [done] = [t for t in client.get(f"/v1/studies/{study.id}/trials?limit=100").json()["items"]
              if t["params"].get("schedule_run") == run["id"]]
    assert done["state"] == "complete" and done["intermediate"][-1]["shape"] == last


CONTEXT_SPEC: dict[str, Any] = {
    **SCHEDULE_SPEC, "name": "schedule-context",
    "model": {"family": "gpt", "base": {"width": 16, "depth": 1}, "args": {"head_dim": 8}},
    "dataset": {"name": "pytext", "args": {"max_bytes": 100_000, "seq_len": 16, "eval_windows": 16}},
    "budget": {"steps": 4, "batch_size": 8, "eval_every": 4}, "axis": "context", "values": [4, 16], "budgets": [2, 4],
}


def test_a_context_schedule_trains_the_same_gpt_at_each_context_and_pays_attention_for_its_span(
        client: TestClient, ctx: WorkerContext, storage: Any, migrated: Settings) -> None:
    spec = parse_spec(copy.deepcopy(CONTEXT_SPEC), migrated)
    assert isinstance(spec, ShapeScheduleSpec) and [spec.point_label(i) for i in range(2)] == ["context=4", "context=16"]
    assert executable_moves(spec).allowed("context=4", "context=16")
    study = create_study(ctx.session_factory, storage, spec)
    assert set(run_all(ctx, study.id)) == {"complete"}
    flops = {(t["params"]["value_index"], t["params"]["budget_index"], t["params"]["seed"]): t["flops"]
             for t in client.get(f"/v1/studies/{study.id}/trials").json()["items"]}
    # Same weights and projections; attention over 4 instead of 16 keys per token: (16 - 4) x 4 x 16 x 16 FLOPs
    # per layer and sequence, x 3 for training, x 8 sequences x 2 steps.
    assert flops[(1, 0, 0)] - flops[(0, 0, 0)] == pytest.approx(3 * 4 * 16 * 12 * 16 * 8 * 2)


@pytest.mark.parametrize(("change", "loc", "says"), [
    ({"values": [6, 16]}, ("values", 0, "sizes", 0), "context 6 does not divide the dataset's sequence length 16"),
    ({"model": SCHEDULE_SPEC["model"], "dataset": SCHEDULE_SPEC["dataset"]}, ("values", 0, "sizes", 0),
     "context applies only to the 'gpt' family"),
])
def test_bad_context_specs_are_refused_with_the_field(migrated: Settings, change: dict[str, Any],
                                                     loc: tuple[Any, ...], says: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**CONTEXT_SPEC, **change}, migrated)
    assert any(p.loc == loc and says in p.msg for p in error.value.problems), error.value.problems
