"""A tiny transfer check over HTTP through a real worker (`scaletune up`): every grid point runs, /check answers."""

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
    "octaves": 1.0, "step": 0.5, "seeds": 2, "parallelism": 2,
}


def test_a_tiny_transfer_check_runs_end_to_end(embedded_service: str, embedded_token: str) -> None:
    with httpx.Client(base_url=embedded_service, timeout=30.0,
                      headers={"Authorization": f"Bearer {embedded_token}"}) as client:
        created = client.post("/v1/studies", json=SPEC)
        assert created.status_code == 201, created.text
        study_id = created.json()["id"]

        study = wait_for_study(client, study_id)
        assert study["status"] == "completed" and study["spec"]["n_trials"] == 30

        trials = all_trials(client, study_id)
        assert len(trials) == 30 and {t["state"] for t in trials} <= {"complete", "diverged"}
        points = {(t["params"]["size_index"], t["params"]["log2_lr_mult"], t["params"]["seed"]) for t in trials}
        assert len(points) == 30

        check = client.get(f"/v1/studies/{study_id}/check").raise_for_status().json()
        assert check["final"] and len(check["sizes"]) == 3 and len(check["points"]) == 30
        assert check["verdict"] in ("holds", "drifts", "not_monotone", "inconclusive")
        assert all(s["optimum_log2_lr"] is not None for s in check["sizes"])
        png = client.get(f"/v1/studies/{study_id}/check.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
