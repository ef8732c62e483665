"""Every sampler and pruner a spec may name maps to a working Optuna object that stays inside the search space;
the process-wide trial cache sees every process's writes."""

from __future__ import annotations

from typing import Any, get_args

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from service.kinds.registry import STUDY_SPEC
from service.kinds.tune import distributions, make_pruner, make_sampler
from service.optuna_study import ChangedTrialsStorage
from service.spec import PrunerSpec, SamplerSpec


@pytest.mark.parametrize("sampler", get_args(SamplerSpec.model_fields["name"].annotation))
def test_each_sampler_asks_points_inside_the_space(spec_dict: dict[str, Any], sampler: str) -> None:
    spec_dict["search_space"] = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "step": 1e-3},
                                 "warmup_frac": {"type": "categorical", "choices": [0.0, 0.1]}}
    spec_dict["sampler"] = {"name": sampler, "seed": 1}
    spec = STUDY_SPEC.validate_python(spec_dict)
    study = optuna.create_study(sampler=make_sampler(spec, n_existing_trials=0), pruner=make_pruner(spec))
    for _ in range(3):
        trial = study.ask(distributions(spec))
        assert 1e-3 <= trial.params["lr"] <= 1e-1 and trial.params["warmup_frac"] in (0.0, 0.1)
        study.tell(trial, trial.params["lr"])


@pytest.mark.parametrize("pruner", get_args(PrunerSpec.model_fields["name"].annotation))
def test_each_pruner_accepts_reports_at_eval_steps(spec_dict: dict[str, Any], pruner: str) -> None:
    spec_dict["pruner"] = {"name": pruner}
    spec = STUDY_SPEC.validate_python(spec_dict)
    study = optuna.create_study(pruner=make_pruner(spec))
    for _ in range(3):
        trial = study.ask(distributions(spec))
        for step in range(50, 201, 50):
            trial.report(1.0 / step, step)
            trial.should_prune()
        study.tell(trial, 1.0)


def test_parallel_tasks_do_not_replay_the_same_random_points(spec_dict: dict[str, Any]) -> None:
    spec = STUDY_SPEC.validate_python(spec_dict)
    first = optuna.create_study(sampler=make_sampler(spec, n_existing_trials=0)).ask(distributions(spec))
    second = optuna.create_study(sampler=make_sampler(spec, n_existing_trials=1)).ask(distributions(spec))
    again = optuna.create_study(sampler=make_sampler(spec, n_existing_trials=0)).ask(distributions(spec))
    assert first.params != second.params
    assert first.params == again.params, "reproducible for the same position in the study"


@pytest.mark.parametrize(("pruner", "pruned"), [("none", False), ("median", True)])
def test_a_clearly_worse_trial_is_pruned_only_when_a_pruner_is_on(spec_dict: dict[str, Any], pruner: str,
                                                                  pruned: bool) -> None:
    spec_dict["pruner"] = {"name": pruner}
    spec = STUDY_SPEC.validate_python(spec_dict)
    study = optuna.create_study(pruner=make_pruner(spec))
    for _ in range(5):
        good = study.ask(distributions(spec))
        for step in (50, 100, 150):
            good.report(1.0, step)
        study.tell(good, 1.0)
    bad = study.ask(distributions(spec))
    bad.report(9.0, 50)
    bad.report(9.0, 100)
    assert bool(bad.should_prune()) is pruned


def test_two_processes_caches_see_each_others_writes_and_reread_only_written_trials(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ChangedTrialsStorage over one database (as two API processes): each sees every write of the other,
    and a refresh re-reads only the unfinished trials written since it last read them."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    mine, theirs = (ChangedTrialsStorage(RDBStorage(url)) for _ in range(2))
    optuna.create_study(storage=mine, study_name="s")
    study, seen = optuna.load_study(study_name="s", storage=mine), optuna.load_study(study_name="s", storage=theirs)
    reread: list[set[int]] = []
    backend_read = RDBStorage._get_trials
    monkeypatch.setattr(RDBStorage, "_get_trials", lambda self, study_id, states, included_trial_ids, trial_id_greater_than: (
        reread.append(set(included_trial_ids)) or backend_read(self, study_id, states, included_trial_ids, trial_id_greater_than)))
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    idle, busy = study.ask(space), study.ask(space)

    assert [t.params for t in seen.get_trials()] == [idle.params, busy.params]
    busy.report(0.5, step=1)
    assert seen.get_trials()[1].intermediate_values == {1: 0.5}
    assert reread[-1] == {busy._trial_id}, "only the trial written since the last read"
    study.tell(busy, 0.25)
    assert [t.state for t in seen.get_trials()] == [TrialState.RUNNING, TrialState.COMPLETE]
    assert seen.get_trials(states=(TrialState.COMPLETE,))[0].value == 0.25
    seen.get_trials()
    assert reread[-1] == set(), "nothing written: nothing re-read"
    assert theirs.get_study_id_from_name("s") == mine.get_study_id_from_name("s")
