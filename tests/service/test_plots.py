"""Study plots over HTTP: history, intermediate curves and fANOVA importance, as PNG and as JSON data."""

from __future__ import annotations

import io
import math
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from matplotlib.image import imread
from sqlalchemy import update

from service.auth import create_token
from service.db import SessionFactory, write_session
from service.models import Study, TrialAttempt, TrialState
from service.optuna_study import distributions
from service.spec import STUDY_SPEC

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
    assert "history" in response.json()["detail"]
    assert "no study with id nope" in client.get("/v1/studies/nope/plots/history.json").json()["detail"]


def test_another_tenants_plots_are_not_found(client: TestClient, session_factory: SessionFactory, storage: Any,
                                             study_id: str) -> None:
    _seed_trials(client, session_factory, storage, study_id, 2)
    other = create_token(session_factory, "other-tenant", tenant="other")
    response = client.get(f"/v1/studies/{study_id}/plots/history.json", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404


def test_plots_of_a_study_that_is_not_a_tune_study_are_404_with_a_pointer(
        client: TestClient, session_factory: SessionFactory, study_id: str) -> None:
    with write_session(session_factory) as session:
        session.execute(update(Study).where(Study.id == study_id).values(kind="transfer_check"))
    response = client.get(f"/v1/studies/{study_id}/plots/history.json")
    assert response.status_code == 404 and "check.png" in response.json()["detail"]
