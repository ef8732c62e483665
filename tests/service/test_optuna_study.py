"""Every sampler and pruner a spec may name maps to a working Optuna object that stays inside the search space;
the process-wide trial cache sees every process's writes; a pack's asks, reports and tells, batched, store what
Optuna's one-at-a-time calls store."""

from __future__ import annotations

from typing import Any, get_args

import optuna
import pytest
from optuna.storages import RDBStorage
from sqlalchemy import event
from optuna.trial import TrialState

from service.kinds.registry import STUDY_SPEC
from service.kinds.tune import distributions, make_pruner, make_sampler
from service.optuna_study import ChangedTrialsStorage, ask_together, tell_outcome
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


def test_a_study_id_is_read_once_per_name_and_forgotten_with_its_study(tmp_path: Any) -> None:
    """Every task loads its study by name: the name's id is read from the database once per process, and a
    deleted study's name no longer answers with its old id."""
    url = f"sqlite:///{tmp_path / 'ids.db'}"
    study_id = optuna.create_study(storage=RDBStorage(url), study_name="s")._study_id
    storage = ChangedTrialsStorage(RDBStorage(url))
    queries: list[str] = []
    event.listen(storage._backend.engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_rest: queries.append(statement))

    assert storage.get_study_id_from_name("s") == study_id
    first = len(queries)
    assert [storage.get_study_id_from_name("s") for _ in range(3)] == [study_id] * 3
    assert first > 0 and len(queries) == first, "the id came from the cache, not the database"

    storage.delete_study(study_id)
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("s")


def _study_with_history(url: str, spec: Any, finished: int) -> optuna.Study:
    """A study on its own database with ``finished`` completed trials and one running, the same in every call."""
    storage = ChangedTrialsStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage, study_name="s")
    space = distributions(spec)
    for i in range(finished):
        lr = 10 ** (-3 + 2 * ((i * 0.37) % 1))
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=space, value=(lr - 0.01) ** 2))
    study.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, params={"lr": 0.05}, distributions=space))
    return optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(spec, finished + 1))


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "gp"])
def test_asking_together_hands_out_what_asking_one_by_one_does(tmp_path: Any, spec_dict: dict[str, Any],
                                                                sampler: str) -> None:
    """A pack's asks: the same points, numbers and sampler state as K asks in a row (TPE past its random start-up
    sees the earlier ones running; QMC's point counter is kept in the study), and all of it stored."""
    spec_dict["search_space"] = {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}
    spec_dict["sampler"] = {"name": sampler, "seed": 3}
    spec = STUDY_SPEC.validate_python(spec_dict)
    together = _study_with_history(f"sqlite:///{tmp_path / 'together.db'}", spec, finished=12)
    one_by_one = _study_with_history(f"sqlite:///{tmp_path / 'one_by_one.db'}", spec, finished=12)

    asked = ask_together(together, distributions(spec), 4) + ask_together(together, distributions(spec), 2)
    expected = [one_by_one.ask(distributions(spec)) for _ in range(6)]

    assert [(t.number, t.params) for t in asked] == [(t.number, t.params) for t in expected]
    reread = optuna.load_study(study_name="s", storage=RDBStorage(f"sqlite:///{tmp_path / 'together.db'}"))
    stored = reread.get_trials(states=(TrialState.RUNNING,))
    assert [(t.number, t.params, t.system_attrs) for t in stored] == [
        (t.number, t.params, t.system_attrs) for t in one_by_one.get_trials(states=(TrialState.RUNNING,))]
    assert (reread._storage.get_study_system_attrs(reread._study_id)
            == one_by_one._storage.get_study_system_attrs(one_by_one._study_id))


def test_a_study_with_enqueued_points_hands_them_out_when_asked_together(tmp_path: Any,
                                                                         spec_dict: dict[str, Any]) -> None:
    spec = STUDY_SPEC.validate_python(spec_dict)
    study = optuna.create_study(storage=ChangedTrialsStorage(RDBStorage(f"sqlite:///{tmp_path / 'q.db'}")))
    study.enqueue_trial({"lr": 0.002})
    study.enqueue_trial({"lr": 0.003})

    asked = ask_together(study, distributions(spec), 3)

    assert [t.params["lr"] for t in asked[:2]] == [0.002, 0.003] and [t.number for t in asked] == [0, 1, 2]
    assert all(t.state == TrialState.RUNNING for t in study.get_trials())


def _commits(storage: ChangedTrialsStorage) -> list[int]:
    """Counts the transactions the storage commits from now on (one entry per commit)."""
    commits: list[int] = []
    event.listen(storage._backend.engine, "commit", lambda _connection: commits.append(1))
    return commits


def test_deferred_reports_are_written_in_one_transaction_and_spare_a_trial_finished_elsewhere(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    mine, theirs = (ChangedTrialsStorage(RDBStorage(url)) for _ in range(2))
    study = optuna.create_study(storage=mine, study_name="s")
    kept, taken = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    seen = optuna.load_study(study_name="s", storage=theirs)
    commits = _commits(mine)

    with mine.reports_deferred():
        kept.report(0.5, 10)
        taken.report(0.6, 10)
        assert [t.intermediate_values for t in seen.get_trials()] == [{}, {}], "nothing written before the eval ends"
        mine.write_reports()
        assert [t.intermediate_values for t in seen.get_trials()] == [{10: 0.5}, {10: 0.6}]
        seen.tell(taken.number, state=TrialState.FAIL)
        kept.report(0.4, 20)
        taken.report(0.3, 20)

    assert len(commits) == 2, "one transaction per eval"
    assert [t.intermediate_values for t in seen.get_trials()] == [{10: 0.5, 20: 0.4}, {10: 0.6}]


def test_telling_together_writes_every_state_in_one_transaction_as_telling_one_by_one_would(tmp_path: Any) -> None:
    """Completed with its value, pruned with its last reported value, and a trial already told elsewhere keeps
    what it was told there."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    mine, theirs = (ChangedTrialsStorage(RDBStorage(url)) for _ in range(2))
    study = optuna.create_study(storage=mine, study_name="s")
    done, pruned, elsewhere = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3))
    pruned.report(0.7, 10)
    seen = optuna.load_study(study_name="s", storage=theirs)
    seen.tell(elsewhere.number, state=TrialState.FAIL)
    commits = _commits(mine)

    with mine.told_together([done._trial_id, pruned._trial_id, elsewhere._trial_id]):
        read = len(commits)  # the one refresh of the trials
        tell_outcome(study, done, "minimize", "complete", 0.25)
        tell_outcome(study, pruned, "minimize", "pruned", None)
        tell_outcome(study, elsewhere, "minimize", "complete", 0.1)
        assert [t.state for t in seen.get_trials()] == [TrialState.RUNNING, TrialState.RUNNING, TrialState.FAIL]

    assert len(commits) == read + 1, "the states in one transaction"
    told = seen.get_trials()
    assert [(t.state, t.value) for t in told] == [(TrialState.COMPLETE, 0.25), (TrialState.PRUNED, 0.7),
                                                  (TrialState.FAIL, None)]
    assert all(t.datetime_complete is not None for t in told)


def test_a_packs_own_writes_are_kept_in_the_cache_and_only_others_writes_are_read_back(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next pack's load reads back none of the trials a pack asked, reported and told itself, only the one
    another process finished first; and the cache then holds what the database holds."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    mine, theirs = (ChangedTrialsStorage(RDBStorage(url)) for _ in range(2))
    study = optuna.create_study(storage=mine, study_name="s")
    done, pruned, failed, elsewhere = ask_together(study, {"x": optuna.distributions.FloatDistribution(0, 1)}, 4)
    read_back: list[int] = []
    backend_read = RDBStorage._get_trials
    monkeypatch.setattr(RDBStorage, "_get_trials", lambda *args, **kwargs: [
        read_back.append(t._trial_id) or t for t in backend_read(*args, **kwargs)])
    with mine.reports_deferred():
        for trial in (done, pruned, failed, elsewhere):
            trial.report(0.5, 10)
    optuna.load_study(study_name="s", storage=theirs).tell(elsewhere.number, state=TrialState.FAIL)
    with mine.told_together([t._trial_id for t in (done, pruned, failed, elsewhere)]):
        for trial, state, value in ((done, "complete", 0.25), (pruned, "pruned", None), (failed, "failed", None),
                                    (elsewhere, "complete", 0.1)):
            tell_outcome(study, trial, "minimize", state, value)

    cached = study.get_trials()
    assert read_back == [elsewhere._trial_id], "only the trial another process wrote"
    assert cached == optuna.load_study(study_name="s", storage=RDBStorage(url)).get_trials()
    assert [(t.state, t.value) for t in cached] == [(TrialState.COMPLETE, 0.25), (TrialState.PRUNED, 0.5),
                                                    (TrialState.FAIL, None), (TrialState.FAIL, None)]
