"""The spec's search space, sampler and pruner in Optuna's terms, and Optuna's RDB storage in our database."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage, RDBStorage

from service.db import SQLITE_BUSY_TIMEOUT_S, is_sqlite
from service.settings import normalise_database_url
from service.kinds.grid import grid_points
from service.spec import CategoricalParam, FloatParam, StudySpec, TuneSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


@lru_cache(maxsize=8)
def get_storage(url: str) -> BaseStorage:
    """One storage per process and URL: building it checks (and on first use creates) Optuna's schema.

    Wrapped in Optuna's own cache of finished trials (what ``optuna.load_study(storage=url)`` does), kept
    for the whole process: without it every task's sampler re-read every trial from the database
    (bench/service_overhead.py measured ~100 ms per ask at 20 trials).
    """
    url = normalise_database_url(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if is_sqlite(url) else {"pool_pre_ping": True})
    return optuna.storages.get_storage(RDBStorage(url, engine_kwargs=engine_kwargs))


def optuna_study_name(study_id: str) -> str:
    return f"scaletune-{study_id}"


def distributions(spec: TuneSpec) -> dict[str, BaseDistribution]:
    result: dict[str, BaseDistribution] = {}
    for name, param in spec.search_space.items():
        if isinstance(param, FloatParam):
            result[name] = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, CategoricalParam):
            result[name] = CategoricalDistribution(param.choices)
        else:
            result[name] = IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return result


def make_sampler(spec: TuneSpec, n_existing_trials: int) -> optuna.samplers.BaseSampler:
    """Seeded from the spec, offset by how many trials exist, so parallel tasks do not replay one random stream.

    QMC is the exception: it indexes its sequence by trial number, so the seed must stay the same.
    """
    base_seed = spec.sampler.seed
    seed = None if base_seed is None else (base_seed + 7919 * n_existing_trials) % 2**31
    match spec.sampler.name:
        case "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        case "qmc":
            return optuna.samplers.QMCSampler(seed=base_seed, scramble=base_seed is not None)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "grid":
            grid = {name: param.grid() for name, param in spec.search_space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed)
    raise AssertionError(spec.sampler.name)


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    """Reports happen at training steps, so resources are counted in steps and start at the first eval."""
    first_eval = spec.budget.eval_every
    match spec.pruner.name:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner(n_warmup_steps=first_eval)
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_eval)
        case "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=first_eval, max_resource=spec.budget.steps)
        case "wilcoxon":
            return optuna.pruners.WilcoxonPruner()
    raise AssertionError(spec.pruner.name)


def create_optuna_study(storage: RDBStorage, name: str, spec: StudySpec) -> None:
    """Create the Optuna study and queue the spec's warm-start points, or a grid kind's every point.

    Optuna hands enqueued points out first, each to exactly one ``ask()``.
    """
    study = optuna.create_study(storage=storage, study_name=name, direction=spec.objective.direction)
    for point in spec.enqueue if isinstance(spec, TuneSpec) else grid_points(spec):
        study.enqueue_trial(point)


def delete_optuna_study(storage: RDBStorage, name: str) -> None:
    optuna.delete_study(study_name=name, storage=storage)


def load_optuna_study(storage: RDBStorage, name: str, spec: TuneSpec,
                      fixed_params: dict[str, Any] | None = None) -> optuna.Study:
    """The study as one task sees it; ``fixed_params`` (a retry) pins every value so the same point is re-run."""
    n_existing = storage.get_n_trials(storage.get_study_id_from_name(name))
    sampler = make_sampler(spec, n_existing)
    if fixed_params:
        with warnings.catch_warnings():  # experimental since Optuna 2.4 and unchanged since; the warning is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.PartialFixedSampler(fixed_params, sampler)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=make_pruner(spec))


def failure_value(spec: StudySpec) -> float:
    """What a diverged trial tells Optuna: the worst possible value, so samplers learn to avoid the region."""
    return math.inf if spec.objective.direction == "minimize" else -math.inf
