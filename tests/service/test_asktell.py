"""Ask/tell of external studies over HTTP: the contract (201/409/429, report, tell twice, lease expiry), tenancy."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.tokens import create_token
from service.db import SessionFactory
from service.leases import LeaseExpired, ask, tell
from service.models import TrialAttempt, utcnow
from service.reconcile import reconcile_once
from service.settings import Settings

EXTERNAL: dict[str, Any] = {
    "name": "own trainer", "kind": "external",
    "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                     "output_mult": {"type": "float", "low": 0.25, "high": 4.0, "log": True}},
    "objective": {"direction": "minimize"}, "n_trials": 3, "parallelism": 2,
    "sampler": {"name": "random", "seed": 0}, "parametrization": "mup", "optimizer": "adamw",
    "model": {"base": {"width": 64, "depth": 2}, "proxy": {"width": 64, "depth": 2}}, "lease_seconds": 30,
}

# Built-in (lr: Trial.build applies it) and the user's own hyperparameters, of every distribution.
OWN_SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5}, "label_smoothing": {"type": "float", "low": 1e-3,
                                                                                 "high": 0.1, "log": True},
    "n_heads": {"type": "int", "low": 2, "high": 8, "step": 2}, "accum_steps": {"type": "int", "low": 1, "high": 16,
                                                                                 "log": True},
    "activation": {"type": "categorical", "choices": ["gelu", "relu", "swiglu"]},
    "tie_embeddings": {"type": "categorical", "choices": [True, False]},
}


def submit(client: TestClient, **changes: Any) -> str:
    response = client.post("/v1/studies", json={**copy.deepcopy(EXTERNAL), **changes})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def ask_ok(client: TestClient, study_id: str) -> dict[str, Any]:
    response = client.post(f"/v1/studies/{study_id}/trials/ask", json={"worker": "laptop:1"})
    assert response.status_code == 201, response.text
    return dict(response.json())


def tell_ok(client: TestClient, study_id: str, number: int, value: float | None = 1.0,
            state: str = "complete") -> dict[str, Any]:
    response = client.post(f"/v1/studies/{study_id}/trials/{number}/tell", json={"state": state, "value": value})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_ask_hands_out_params_under_a_lease_with_the_shapes_to_build(client: TestClient) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    assert set(trial) >= {"number", "attempt_id", "params", "lease_seconds", "parametrization", "optimizer", "base",
                          "proxy", "options"}
    assert set(trial["params"]) == {"lr", "output_mult"} and 1e-4 <= trial["params"]["lr"] <= 1e-1
    assert (trial["lease_seconds"], trial["parametrization"], trial["optimizer"]) == (30, "mup", "adamw")
    assert trial["base"] == {"width": 64, "depth": 2, "patch_size": None, "context": None} and trial["proxy"]["width"] == 64
    assert trial["options"]["weight_decay_rule"] == "lr_wd_product"
    study = client.get(f"/v1/studies/{study_id}").json()
    assert study["status"] == "running" and study["trial_counts"]["running"] == 1
    row = client.get(f"/v1/studies/{study_id}/trials/{trial['number']}").json()
    assert (row["state"], row["worker"], row["params"]) == ("running", "laptop:1", trial["params"])
    # No broker message: the user's code runs it, not a worker.
    assert client.get(f"/v1/studies/{study_id}/trials").json()["total"] == 1


def test_a_study_without_a_model_still_hands_out_params(client: TestClient) -> None:
    spec = {k: v for k, v in EXTERNAL.items() if k != "model"}
    study_id = client.post("/v1/studies", json=spec).json()["id"]
    trial = ask_ok(client, study_id)
    assert trial["base"] is None and trial["proxy"] is None and trial["params"]


def test_asking_beyond_parallelism_is_429_with_retry_after(client: TestClient) -> None:
    study_id = submit(client, parallelism=2)
    ask_ok(client, study_id)
    ask_ok(client, study_id)
    refused = client.post(f"/v1/studies/{study_id}/trials/ask")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 10 and "parallelism is 2" in refused.json()["detail"]


def test_the_last_trials_out_leave_nothing_to_ask_until_they_end(client: TestClient) -> None:
    study_id = submit(client, n_trials=2, parallelism=4)
    first, second = ask_ok(client, study_id), ask_ok(client, study_id)
    assert client.post(f"/v1/studies/{study_id}/trials/ask").status_code == 429
    tell_ok(client, study_id, first["number"], 0.5)
    assert client.post(f"/v1/studies/{study_id}/trials/ask").status_code == 429
    tell_ok(client, study_id, second["number"], 0.25)
    study = client.get(f"/v1/studies/{study_id}").json()
    assert (study["status"], study["best_value"], study["best_params"]) == ("completed", 0.25, second["params"])
    finished = client.post(f"/v1/studies/{study_id}/trials/ask")
    assert finished.status_code == 409 and "completed" in finished.json()["detail"]


def test_an_ask_repeated_with_its_idempotency_key_answers_the_trial_it_handed_out(client: TestClient) -> None:
    study_id = submit(client, n_trials=3, parallelism=2)
    ask_with = {"json": {"worker": "laptop:1"}, "headers": {"Idempotency-Key": "ask-1"}}
    first = client.post(f"/v1/studies/{study_id}/trials/ask", **ask_with).json()
    again = client.post(f"/v1/studies/{study_id}/trials/ask", **ask_with)
    assert again.status_code == 201 and again.json() == first
    other = ask_ok(client, study_id)
    assert other["number"] != first["number"]
    tell_ok(client, study_id, first["number"])
    after_tell = client.post(f"/v1/studies/{study_id}/trials/ask", **ask_with)
    assert after_tell.status_code == 201 and after_tell.json()["number"] not in (first["number"], other["number"])
    assert client.get(f"/v1/studies/{study_id}/trials").json()["total"] == 3


def test_telling_twice_is_harmless_and_gives_the_same_answer(client: TestClient) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    first = tell_ok(client, study_id, trial["number"], 0.7)
    again = tell_ok(client, study_id, trial["number"], 0.1)
    assert first == again and (first["state"], first["value"]) == ("complete", 0.7)
    assert client.get(f"/v1/studies/{study_id}").json()["trial_counts"]["complete"] == 1
    late_report = client.post(f"/v1/studies/{study_id}/trials/{trial['number']}/report", json={"step": 9, "value": 1})
    assert late_report.status_code == 409 and "already ended" in late_report.json()["detail"]


def test_told_failures_diverged_and_pruned_trials_are_recorded_and_not_retried(client: TestClient) -> None:
    study_id = submit(client, n_trials=3, parallelism=3)
    a, b, c = (ask_ok(client, study_id) for _ in range(3))
    failed = client.post(f"/v1/studies/{study_id}/trials/{a['number']}/tell",
                         json={"state": "failed", "value": None, "reason": "CUDA out of memory"}).json()
    assert (failed["state"], failed["failure_reason"]) == ("failed", "told: CUDA out of memory")
    assert tell_ok(client, study_id, b["number"], None)["state"] == "diverged"
    assert tell_ok(client, study_id, c["number"], 3.0, state="pruned")["state"] == "pruned"
    study = client.get(f"/v1/studies/{study_id}").json()
    assert study["status"] == "failed" and "no trial produced a value" in study["error"]
    assert client.get(f"/v1/studies/{study_id}/trials").json()["total"] == 3


def test_reports_record_the_curve_and_the_pruner_answers(client: TestClient) -> None:
    study_id = submit(client, n_trials=7, parallelism=1, pruner={"name": "median"})
    for _ in range(5):  # the median pruner's startup trials
        trial = ask_ok(client, study_id)
        for step in (1, 2):
            answer = client.post(f"/v1/studies/{study_id}/trials/{trial['number']}/report",
                                 json={"step": step, "value": 1.0})
            assert answer.status_code == 200 and answer.json() == {"should_prune": False}
        tell_ok(client, study_id, trial["number"], 1.0)
    good, = [ask_ok(client, study_id)]
    assert client.post(f"/v1/studies/{study_id}/trials/{good['number']}/report",
                       json={"step": 1, "value": 0.5}).json() == {"should_prune": False}
    tell_ok(client, study_id, good["number"], 0.5)
    bad = ask_ok(client, study_id)
    assert client.post(f"/v1/studies/{study_id}/trials/{bad['number']}/report",
                       json={"step": 1, "value": None}).json() == {"should_prune": False}
    assert client.post(f"/v1/studies/{study_id}/trials/{bad['number']}/report",
                       json={"step": 2, "value": 9.0}).json() == {"should_prune": True}
    row = client.get(f"/v1/studies/{study_id}/trials/{bad['number']}").json()
    assert [(p["step"], p["value"]) for p in row["intermediate"]] == [(1, None), (2, 9.0)]
    assert tell_ok(client, study_id, bad["number"], 9.0, state="pruned")["state"] == "pruned"
    events = client.get(f"/v1/studies/{study_id}/events", headers={"Accept": "text/event-stream"})
    assert events.text.count("event: trial_reported") == 5 * 2 + 1 + 2
    assert client.get(f"/v1/studies/{study_id}/plots/intermediate.json").status_code == 200


def test_a_report_renews_the_lease(client: TestClient, session_factory: SessionFactory) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    with session_factory() as session:
        before = session.get_one(TrialAttempt, trial["attempt_id"]).lease_expires_at
    assert client.post(f"/v1/studies/{study_id}/trials/{trial['number']}/report",
                       json={"step": 1, "value": 2.0}).status_code == 200
    renewed = client.post(f"/v1/studies/{study_id}/trials/{trial['number']}/heartbeat")
    assert renewed.status_code == 200
    with session_factory() as session:
        after = session.get_one(TrialAttempt, trial["attempt_id"]).lease_expires_at
    assert before is not None and after is not None and after > before


def test_a_run_out_lease_fails_the_attempt_and_the_next_ask_hands_out_the_same_params(
        client: TestClient, migrated: Settings, session_factory: SessionFactory, storage: Any) -> None:
    study_id = submit(client, n_trials=2, parallelism=2)
    t0 = utcnow()
    lost = ask(session_factory, storage, study_id, "default", "crashed:1", migrated.MAX_RETRIES, now=t0)
    later = t0 + timedelta(seconds=31)
    with pytest.raises(LeaseExpired):
        tell(session_factory, storage, lambda *_: None, study_id, lost.attempt.number, "default", "complete", 1.0,
             None, migrated.MAX_RETRIES, now=later)
    # Over HTTP, now that the expiry is recorded: 409 for tell, report and heartbeat alike.
    for route, body in (("tell", {"state": "complete", "value": 1.0}), ("report", {"step": 1, "value": 1.0}),
                        ("heartbeat", None)):
        refused = client.post(f"/v1/studies/{study_id}/trials/{lost.attempt.number}/{route}", json=body)
        assert refused.status_code == 409 and "lease ran out" in refused.json()["detail"]
    again = ask_ok(client, study_id)
    assert again["params"] == lost.attempt.params and again["number"] != lost.attempt.number
    trials = {t["id"]: t for t in client.get(f"/v1/studies/{study_id}/trials").json()["items"]}
    assert trials[lost.attempt.id]["failure_reason"] == "lease_expired"
    assert trials[again["attempt_id"]]["retry_of"] == lost.attempt.id and trials[again["attempt_id"]]["attempt"] == 2
    tell_ok(client, study_id, again["number"], 0.3)
    tell_ok(client, study_id, ask_ok(client, study_id)["number"], 0.4)
    study = client.get(f"/v1/studies/{study_id}").json()
    assert study["status"] == "completed" and study["trial_counts"]["complete"] == 2
    assert client.post(f"/v1/studies/{study_id}/trials/ask").status_code == 409


def test_the_reconciler_ends_run_out_leases(client: TestClient, migrated: Settings,
                                            session_factory: SessionFactory) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    sent: list[tuple[str, str]] = []
    actions = reconcile_once(session_factory, lambda *task: sent.append(task), migrated,
                             now=utcnow() + timedelta(seconds=31))
    assert [(a.kind, a.attempt_id) for a in actions] == [("lease_expired", trial["attempt_id"])]
    assert sent == []  # the retry waits for an ask; nothing goes to the workers' broker
    retry = [t for t in client.get(f"/v1/studies/{study_id}/trials").json()["items"] if t["retry_of"]]
    assert [(t["state"], t["params"]) for t in retry] == [("queued", trial["params"])]
    # Not reconciled again, and no worker-style stale failure for leased trials.
    assert reconcile_once(session_factory, lambda *task: sent.append(task), migrated,
                          now=utcnow() + timedelta(seconds=31)) == []


def test_a_cancelled_study_hands_out_nothing_and_tells_running_trials_to_stop(client: TestClient) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    assert client.post(f"/v1/studies/{study_id}/cancel").status_code == 200
    refused = client.post(f"/v1/studies/{study_id}/trials/ask")
    assert refused.status_code == 409 and "cancelled" in refused.json()["detail"]
    assert client.post(f"/v1/studies/{study_id}/trials/{trial['number']}/report",
                       json={"step": 1, "value": 1.0}).json() == {"should_prune": True}


def test_a_worker_study_has_nothing_to_ask(client: TestClient, spec_dict: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json=spec_dict).json()["id"]
    refused = client.post(f"/v1/studies/{study_id}/trials/ask")
    assert refused.status_code == 409 and "tune study" in refused.json()["detail"]


@pytest.mark.parametrize("change, where", [({"lease_seconds": 4}, "lease_seconds"),
                                           ({"family": "mlp"}, "family"),
                                           ({"budget": {"steps": 10}}, "budget"),
                                           ({"n_trials": 10**6}, "n_trials")])
def test_the_spec_is_checked_at_submission(client: TestClient, change: dict[str, Any], where: str) -> None:
    refused = client.post("/v1/studies", json={**EXTERNAL, **change})
    assert refused.status_code == 422 and where in str(refused.json()["detail"])


def test_an_external_study_searches_hyperparameters_of_its_own(client: TestClient) -> None:
    study_id = submit(client, search_space=OWN_SPACE, n_trials=6, parallelism=6)
    for _ in range(6):
        params = ask_ok(client, study_id)["params"]
        assert set(params) == set(OWN_SPACE)
        assert 1e-4 <= params["lr"] <= 1e-1 and 0.0 <= params["dropout"] <= 0.5
        assert params["n_heads"] in (2, 4, 6, 8) and 1 <= params["accum_steps"] <= 16
        assert params["activation"] in ("gelu", "relu", "swiglu") and params["tie_embeddings"] in (True, False)
    spec = client.get(f"/v1/studies/{study_id}").json()["spec"]
    assert spec["search_space"]["activation"]["choices"] == ["gelu", "relu", "swiglu"]
    assert spec["search_space"]["tie_embeddings"]["choices"] == [True, False]


@pytest.mark.parametrize("space, where, message", [
    ({"1st_moment": {"type": "float", "low": 0.1, "high": 0.9}}, ("search_space", "1st_moment", "[key]"),
     "not a hyperparameter name"),
    ({"dropout": {"type": "normal", "low": 0.0, "high": 0.5}}, ("search_space", "dropout"), "tag"),
    ({"dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": True}}, ("search_space", "dropout", "low"),
     "log-scale range needs low > 0"),
    ({"dropout": {"type": "float", "low": 0.5, "high": 0.1}}, ("search_space", "dropout", "high"), "above low"),
    ({"n_heads": {"type": "int", "low": 2, "high": 8.5}}, ("search_space", "n_heads", "int", "high"), "integer"),
    ({"activation": {"type": "categorical", "choices": ["gelu", "gelu"]}},
     ("search_space", "activation", "choices"), "repeat"),
    ({"activation": {"type": "categorical", "choices": [["gelu"]]}},
     ("search_space", "activation", "categorical", "choices", 0), ""),
    ({"lr": {"type": "categorical", "choices": ["fast", "slow"]}}, ("search_space", "lr", "choices"),
     "built-in hyperparameter"),
])
def test_own_hyperparameters_are_checked_at_submission(client: TestClient, space: dict[str, Any],
                                                       where: tuple[str, ...], message: str) -> None:
    refused = client.post("/v1/studies", json={**EXTERNAL, "search_space": space})
    assert refused.status_code == 422, refused.text
    errors = refused.json()["errors"]
    assert any(tuple(error["loc"][1:1 + len(where)]) == where and message in error["msg"] for error in errors), errors


def test_the_grid_sampler_hands_out_every_point_once(client: TestClient) -> None:
    choices = [2.0 ** -7, 2.0 ** -6, 2.0 ** -5, 2.0 ** -4]
    study_id = submit(client, search_space={"lr": {"type": "categorical", "choices": choices}},
                      sampler={"name": "grid", "seed": 0}, n_trials=len(choices), parallelism=1)
    handed_out = []
    for _ in choices:
        trial = ask_ok(client, study_id)
        handed_out.append(trial["params"]["lr"])
        tell_ok(client, study_id, trial["number"])
    assert sorted(handed_out) == choices
    assert client.post(f"/v1/studies/{study_id}/trials/ask", json={}).status_code == 409


def test_the_lease_defaults_to_ten_minutes(client: TestClient) -> None:
    spec = {k: v for k, v in EXTERNAL.items() if k != "lease_seconds"}
    study_id = client.post("/v1/studies", json=spec).json()["id"]
    assert client.get(f"/v1/studies/{study_id}").json()["spec"]["lease_seconds"] == 600
    assert ask_ok(client, study_id)["lease_seconds"] == 600


def test_every_ask_tell_route_keeps_tenants_apart(client: TestClient, session_factory: SessionFactory) -> None:
    study_id = submit(client)
    trial = ask_ok(client, study_id)
    number = trial["number"]
    other = {"Authorization": f"Bearer {create_token(session_factory, 'mallory', tenant='elsewhere')}"}
    admin = {"Authorization": f"Bearer {create_token(session_factory, 'root', tenant='ops', admin=True)}"}
    routes = [("ask", None), (f"{number}/report", {"step": 1, "value": 1.0}), (f"{number}/heartbeat", None),
              (f"{number}/tell", {"state": "complete", "value": 1.0})]
    for route, body in routes:
        hidden = client.post(f"/v1/studies/{study_id}/trials/{route}", json=body, headers=other)
        assert hidden.status_code == 404, route
        assert client.post(f"/v1/studies/{study_id}/trials/{route}", json=body,
                           headers={"Authorization": "Bearer nope"}).status_code == 401, route
    assert client.get(f"/v1/studies/{study_id}/trials/{number}").json()["state"] == "running"
    for route, body in routes[1:]:
        assert client.post(f"/v1/studies/{study_id}/trials/{route}", json=body, headers=admin).status_code == 200
