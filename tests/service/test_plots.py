"""Study plots over HTTP, as PNG and as JSON data: each plot kind on the study kind it belongs to."""

from __future__ import annotations

import io
import math
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from matplotlib.image import imread
from sqlalchemy import update

from test_shape_schedule import (  # noqa: F401  (fixtures: a trained shape_schedule study, planned with few refits)
    ctx, few_replicates, finished_study, migrated, trained_schedule,
)
from test_transfer_check_study import CHECK_SPEC, run_all

from scaletune.coord_check import coord_check
from service import coord_plot
from service.db import SessionFactory, write_session
from service.models import Study, TrialAttempt, TrialState
from service.kinds.tune import distributions
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC
from service.studies import create_study
from service.tokens import create_token
from workers.trial_task import WorkerContext

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _loss(lr: float) -> float:
    """The loss depends on lr only (minimum at 1e-2), so fANOVA must rank lr above output_mult."""
    return 0.3 + (math.log10(lr) + 2.0) ** 2


def _seed_trials(client: TestClient, session_factory: SessionFactory, storage: Any, study_id: str,
                 n: int) -> list[float]:
    """n completed trials written the way workers write them: Optuna's storage and our st_trials rows."""
    detail = client.get(f"/v1/studies/{study_id}").json()
    spec = STUDY_SPEC.validate_python(detail["spec"])
    optuna_study = optuna.load_study(study_name=detail["optuna_study_name"], storage=storage)
    values, rows = [], []
    for i in range(n):
        params = {"lr": 10 ** (-4 + 3 * ((i * 7) % n) / n), "output_mult": 0.25 * 2 ** ((i * 3) % 5)}
        value = _loss(params["lr"])
        curve = [{"step": 50, "eval_loss": value + 1.0}, {"step": 100, "eval_loss": value}]
        optuna_study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions(spec), value=value,
            intermediate_values={p["step"]: p["eval_loss"] for p in curve}))
        rows.append(TrialAttempt(study_id=study_id, number=i, state=TrialState.complete, params=params,
                                 value=value, intermediate=curve))
        values.append(value)
    rows.append(TrialAttempt(study_id=study_id, number=n, state=TrialState.running, params={"lr": 1e-3},
                             intermediate=[{"step": 50, "eval_loss": 9.0}]))
    with write_session(session_factory) as session:
        session.add_all(rows)
    return values


@pytest.fixture
def study_id(client: TestClient, spec_dict: dict[str, Any]) -> str:
    return str(client.post("/v1/studies", json=spec_dict).json()["id"])


def _png_size(body: bytes) -> tuple[int, int]:
    assert body.startswith(PNG_MAGIC)
    height, width = imread(io.BytesIO(body), format="png").shape[:2]
    return width, height


def test_history_gives_values_in_trial_order_and_the_best_so_far(client: TestClient, session_factory: SessionFactory,
                                                                 storage: Any, study_id: str) -> None:
    values = _seed_trials(client, session_factory, storage, study_id, 8)
    data = client.get(f"/v1/studies/{study_id}/plots/history.json").json()
    assert [t["number"] for t in data["trials"]] == list(range(8))
    assert [t["value"] for t in data["trials"]] == pytest.approx(values)
    assert data["best_so_far"] == pytest.approx([min(values[:i + 1]) for i in range(8)])

    png = client.get(f"/v1/studies/{study_id}/plots/history.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert _png_size(png.content) == (640, 420)


def test_intermediate_curves_include_running_trials(client: TestClient, session_factory: SessionFactory,
                                                    storage: Any, study_id: str) -> None:
    _seed_trials(client, session_factory, storage, study_id, 3)
    data = client.get(f"/v1/studies/{study_id}/plots/intermediate.json").json()
    assert [(t["number"], t["state"], t["step"]) for t in data["trials"]] == [
        (0, "complete", [50, 100]), (1, "complete", [50, 100]), (2, "complete", [50, 100]), (3, "running", [50])]
    assert client.get(f"/v1/studies/{study_id}/plots/intermediate.png").content.startswith(PNG_MAGIC)


def test_fanova_importance_ranks_the_parameter_that_matters_first(client: TestClient, storage: Any,
                                                                  session_factory: SessionFactory,
                                                                  study_id: str) -> None:
    _seed_trials(client, session_factory, storage, study_id, 20)
    data = client.get(f"/v1/studies/{study_id}/plots/importance.json").json()
    assert data["evaluator"] == "fanova" and data["n_trials"] == 20
    assert set(data["importances"]) == {"lr", "output_mult"}
    assert data["importances"]["lr"] > 0.8 > data["importances"]["output_mult"]
    assert sum(data["importances"].values()) == pytest.approx(1.0)
    assert client.get(f"/v1/studies/{study_id}/plots/importance.png").content.startswith(PNG_MAGIC)


@pytest.mark.parametrize("kind,sentence", [("history", "no completed trial yet"),
                                           ("intermediate", "no reported evaluations yet"),
                                           ("importance", "needs at least 2")])
def test_a_study_without_data_is_404_with_a_sentence(client: TestClient, study_id: str, kind: str,
                                                     sentence: str) -> None:
    for fmt in ("png", "json"):
        response = client.get(f"/v1/studies/{study_id}/plots/{kind}.{fmt}")
        assert response.status_code == 404
        assert sentence in response.json()["detail"]


def test_unknown_plot_kind_or_study_is_404(client: TestClient, study_id: str) -> None:
    response = client.get(f"/v1/studies/{study_id}/plots/pie.png")
    assert response.status_code == 404 and "no plot kind 'pie'" in response.json()["detail"]
    assert all(kind in response.json()["detail"] for kind in ("history", "landscape", "scaling", "schedule",
                                                              "coord_check"))
    assert "no study with id nope" in client.get("/v1/studies/nope/plots/history.json").json()["detail"]


def test_another_tenants_plots_are_not_found(client: TestClient, session_factory: SessionFactory, storage: Any,
                                             study_id: str) -> None:
    _seed_trials(client, session_factory, storage, study_id, 2)
    other = create_token(session_factory, "other-tenant", tenant="other")
    response = client.get(f"/v1/studies/{study_id}/plots/history.json", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404


@pytest.mark.parametrize(("study_kind", "kind", "sentence"), [
    ("transfer_check", "history",
     "the history plot is for tune and external studies only (a transfer_check study has: landscape)"),
    ("transfer_check", "coord_check", "the coord_check plot is for tune studies only"),
    ("tune", "landscape", "the landscape plot is for transfer_check studies only"),
    ("tune", "scaling", "the scaling plot is for shape_schedule studies only"),
    ("shape_schedule", "importance", "(a shape_schedule study has: scaling, schedule)"),
])
def test_a_plot_of_another_study_kind_is_404_naming_the_kind_that_has_it(
        client: TestClient, session_factory: SessionFactory, study_id: str, study_kind: str, kind: str,
        sentence: str) -> None:
    with write_session(session_factory) as session:
        session.execute(update(Study).where(Study.id == study_id).values(kind=study_kind))
    for fmt in ("png", "json"):
        response = client.get(f"/v1/studies/{study_id}/plots/{kind}.{fmt}")
        assert response.status_code == 404 and sentence in response.json()["detail"], response.text


def test_landscape_shows_loss_vs_lr_per_size_with_diverged_points(client: TestClient, ctx: WorkerContext,
                                                                   storage: Any) -> None:
    spec = {**CHECK_SPEC, "octaves": 0.5}
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(spec))
    assert set(run_all(ctx, study.id)) == {"complete"}
    with write_session(ctx.session_factory) as session:  # the largest size diverges at the highest LR, seed 0
        session.execute(update(TrialAttempt).where(TrialAttempt.study_id == study.id, TrialAttempt.number == 8)
                        .values(state=TrialState.diverged, value=None))

    data = client.get(f"/v1/studies/{study.id}/plots/landscape.json").json()
    assert data["kind"] == "landscape" and data["status"] == "completed" and data["verdict"]
    assert [s["size"] for s in data["sizes"]] == ["w16xd1", "w32xd1", "w64xd1"]
    assert [s["diverged"] for s in data["sizes"]] == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert data["sizes"][2]["mean_loss"][2] is None and None not in data["sizes"][0]["mean_loss"]
    check = client.get(f"/v1/studies/{study.id}/check").json()
    assert [s["optimum_log2"] for s in data["sizes"]] == [s["optimum_log2"] for s in check["sizes"]]

    png = client.get(f"/v1/studies/{study.id}/plots/landscape.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and len(png.content) > 0
    assert _png_size(png.content) == (640, 420)


def test_a_transfer_check_without_two_sizes_finished_has_no_landscape_yet(client: TestClient,
                                                                           session_factory: SessionFactory,
                                                                           storage: Any) -> None:
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python(CHECK_SPEC))
    response = client.get(f"/v1/studies/{study.id}/plots/landscape.png")
    assert response.status_code == 404 and "no loss-vs-LR landscape yet" in response.json()["detail"]


def test_scaling_fits_and_schedule_segments_of_a_shape_schedule_study(client: TestClient,
                                                                      finished_study: str) -> None:
    scaling = client.get(f"/v1/studies/{finished_study}/plots/scaling.json").json()
    assert scaling["kind"] == "scaling" and set(scaling["shapes"]) == {"width=8", "width=32"}
    for shape in scaling["shapes"].values():
        assert len(shape["points"]) == 2 * 4  # 2 seeds x 4 budgets at the one proxy size
        assert shape["form"] and len(shape["curve"]["flops"]) == len(shape["curve"]["loss"]) > 10
        assert shape["curve"]["flops"][0] < min(p[0] for p in shape["points"])
    trials = client.get(f"/v1/studies/{finished_study}/trials").json()["items"]
    measured = sorted([t["flops"], t["value"]] for t in trials)
    assert sorted(p for shape in scaling["shapes"].values() for p in shape["points"]) == measured

    schedule = client.get(f"/v1/studies/{finished_study}/plots/schedule.json").json()
    summary = client.get(f"/v1/studies/{finished_study}").json()["result"]
    assert schedule["target_loss"] == pytest.approx(summary["target_loss"])
    assert [s["shape"] for s in schedule["segments"]] == summary["shapes"]
    assert set(schedule["curves"]) == {"width=8", "width=32"} and schedule["static"]["shape"] in schedule["curves"]
    last = schedule["segments"][-1]
    assert last["path"]["flops"][-1] == pytest.approx(last["flops_exit"], rel=0.05)
    assert last["path"]["loss"][-1] == pytest.approx(schedule["target_loss"])

    for kind in ("scaling", "schedule"):
        png = client.get(f"/v1/studies/{finished_study}/plots/{kind}.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and len(png.content) > 0
        assert _png_size(png.content) == (640, 420)


def test_coord_check_runs_around_the_proxy_width_once_then_comes_from_the_cache(
        client: TestClient, migrated: Settings, study_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[list[int]] = []

    def counted(family: str, parametrization: str, widths: list[int], **kwargs: Any) -> Any:
        runs.append(widths)
        return coord_check(family, parametrization, widths, **kwargs)

    monkeypatch.setattr(coord_plot, "coord_check", counted)
    data = client.get(f"/v1/studies/{study_id}/plots/coord_check.json").json()
    assert runs == [[32, 64, 128, 256, 512]]  # proxy width 128, /4 .. x4
    assert data["kind"] == "coord_check" and data["proxy_width"] == 128 and data["sizes"] == runs[0]
    assert (data["family"], data["parametrization"], data["optimizer"]) == ("mlp", "mup", "adamw")
    assert data["steps"] == 4 and data["seeds"] == 2 and data["modules"]
    assert data["flat"] == (data["max_abs_slope"] <= data["flat_slope"])

    png = client.get(f"/v1/studies/{study_id}/plots/coord_check.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and len(png.content) > 0
    assert png.content.startswith(PNG_MAGIC)
    assert client.get(f"/v1/studies/{study_id}/plots/coord_check.json").json() == data
    assert len(runs) == 1, "the second and third requests must come from the cache"
    assert migrated.ARTIFACTS_DIR is not None
    folder = migrated.ARTIFACTS_DIR / study_id
    assert sorted(p.name for p in folder.iterdir()) == ["coord_check.json", "coord_check.png"]
    assert (folder / "coord_check.png").read_bytes() == png.content


def test_a_proxy_in_sp_shows_growing_coordinates_where_mup_stays_near_flat(client: TestClient,
                                                                           spec_dict: dict[str, Any]) -> None:
    checks = {}
    for parametrization in ("mup", "sp"):
        created = client.post("/v1/studies", json={**spec_dict, "parametrization": parametrization}).json()
        checks[parametrization] = client.get(f"/v1/studies/{created['id']}/plots/coord_check.json").json()
    assert not checks["sp"]["flat"]
    assert checks["sp"]["max_abs_slope"] > 0.5 > 2 * checks["mup"]["max_abs_slope"]


def test_another_tenants_coord_check_is_not_found_nor_computed(client: TestClient, session_factory: SessionFactory,
                                                               migrated: Settings, study_id: str) -> None:
    other = create_token(session_factory, "other-tenant", tenant="other")
    response = client.get(f"/v1/studies/{study_id}/plots/coord_check.png",
                          headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404
    assert migrated.ARTIFACTS_DIR is not None and not (migrated.ARTIFACTS_DIR / study_id).exists()
