"""A tiny transfer check over HTTP through a real worker (`scaletune up`): every grid point runs, /check answers
with a verdict that follows from its own intervals."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_end_to_end import all_trials, wait_for_study

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "name": "check-mlp-digits", "kind": "transfer_check",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 10, "batch_size": 32, "eval_every": 10, "schedule": "constant"},
    "hyperparameters": {"lr": 0.01},
    "sizes": [{"width": 16, "depth": 1}, {"width": 32, "depth": 1}, {"width": 64, "depth": 1}],
    "octaves": 1.0, "step": 0.5, "parallelism": 2,
}


def test_a_tiny_transfer_check_runs_end_to_end(embedded_service: str, embedded_token: str) -> None:
    with httpx.Client(base_url=embedded_service, timeout=30.0,
                      headers={"Authorization": f"Bearer {embedded_token}"}) as client:
        created = client.post("/v1/studies", json=SPEC)
        assert created.status_code == 201, created.text
        study_id = created.json()["id"]

        study = wait_for_study(client, study_id)
        n_trials = study["spec"]["n_trials"]  # 3 sizes x 5 LRs x 3 seeds (default), plus octaves grown at edges
        grown = study["spec"]["extensions"]
        assert study["status"] == "completed" and n_trials == (45 + len(grown) * 3)

        trials = all_trials(client, study_id)
        assert len(trials) == n_trials and {t["state"] for t in trials} <= {"complete", "diverged"}
        points = {(t["params"]["size_index"], t["params"]["log2_mult"], t["params"]["seed"]) for t in trials}
        assert len(points) == n_trials
        assert {(e["size_index"], e["log2_mult"]) for e in grown} <= {(p[0], p[1]) for p in points}

        check = client.get(f"/v1/studies/{study_id}/check").raise_for_status().json()
        assert check["final"] and len(check["sizes"]) == 3 and len(check["points"]) == n_trials
        assert all(s["optimum_log2"] is not None and s["seeds"] == 3 for s in check["sizes"])
        assert_verdict_follows_from_the_intervals(check)
        png = client.get(f"/v1/studies/{study_id}/check.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def assert_verdict_follows_from_the_intervals(check: dict[str, Any]) -> None:
    """What each verdict claims must be what the per-size optima and drift intervals show."""
    tolerance, sizes = check["tolerance"], check["sizes"]
    intervals = [s["drift_interval"] for s in sizes[1:]]
    verdict = check["verdict"]
    if verdict in ("holds", "not_monotone"):
        assert not any(s["at_edge"] for s in sizes)
        assert all(-tolerance <= low <= high <= tolerance for low, high in intervals)
        assert check["monotone"] == (verdict == "holds")
    elif verdict == "drifts":
        assert not any(s["at_edge"] for s in sizes)
        assert any(low > tolerance or high < -tolerance for low, high in intervals)
    else:
        assert verdict == "inconclusive" and check["reasons"]
        blocked = any(s["at_edge"] for s in sizes) or any(i is None for i in intervals)
        assert blocked or any(low < -tolerance or high > tolerance for low, high in intervals)
