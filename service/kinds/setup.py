"""The setup a grid kind's trials share: taken from a source tune study where not given, and as a TrialConfig."""

from __future__ import annotations

from dataclasses import asdict
from typing import TypeVar

from sqlalchemy.orm import Session

from scaletune.hparams import HParams
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import Budget
from service.kinds.tuned import NoCompletedTrial, best_attempt, tuned_values
from service.models import UNFINISHED_STUDY, Study, StudyStatus
from service.spec import CheckedModelSpec, GridSetup, GridSpec, SourceSpec, TuneSpec
from service.study_ids import AmbiguousStudyId, resolve_study_id

GridSpecT = TypeVar("GridSpecT", bound=GridSpec)


class SourceError(ValueError):
    """The source study cannot provide a setup (missing, not a tune study, or not completed)."""


def resolve_source(session: Session, spec: GridSpecT, tenant: str) -> GridSpecT:
    """The spec with its setup taken from the source tune study where not given; idempotent.

    Hyperparameters are the source's fixed values plus its best trial's, overridden by the spec's own. The
    source may be named by a unique prefix of its id, as every id is; the spec keeps the full id it stands for.
    """
    if spec.source is None:
        return spec
    try:
        study_id = resolve_study_id(session, spec.source.study_id, tenant)
    except AmbiguousStudyId as error:
        raise SourceError(str(error)) from None
    study = session.get(Study, study_id)
    if study is None or study.tenant != tenant:
        raise SourceError(f"you have no study with id {study_id}; give the id of one of your completed tune studies "
                          "(scaletune studies lists them)")
    if study.kind != "tune":
        raise SourceError(f"study {study_id} is a {study.kind} study; a source must be a completed tune study")
    if study.status in UNFINISHED_STUDY:
        raise SourceError(f"source study {study_id} is still {study.status}; submit again once it has completed")
    if study.status != StudyStatus.completed:
        raise SourceError(f"source study {study_id} {study.status} and will not complete; give a completed "
                          "tune study")
    source = TuneSpec.model_validate(study.spec)
    try:
        best = best_attempt(session, study)
    except NoCompletedTrial as error:
        raise SourceError(str(error)) from None
    model = CheckedModelSpec(family=source.model.family, base=source.model.base, args=source.model.args)
    return spec.model_copy(update={
        "source": SourceSpec(study_id=study_id),
        "model": spec.model or model,
        "parametrization": spec.parametrization or source.parametrization,
        "parametrization_options": spec.parametrization_options or source.parametrization_options,
        "optimizer": spec.optimizer or source.optimizer,
        "dataset": spec.dataset or source.dataset,
        "budget": spec.budget or source.budget,
        "hyperparameters": {**tuned_values(source, best), **spec.hyperparameters},
    })


def base_config(spec: GridSetup, shape: Shape, budget: Budget, hparams: dict[str, float], seed: int) -> TrialConfig:
    """A grid spec's setup at one shape, budget, hyperparameters and seed."""
    return TrialConfig(
        family=spec.model.family, args=spec.model.args, base=Shape(**spec.model.base.model_dump()), shape=shape,
        parametrization=spec.parametrization, optimizer=spec.optimizer, dataset=spec.dataset.name,
        dataset_args=spec.dataset.args, budget=budget, hparams=HParams.from_dict(hparams),
        seed=spec.dataset.seed + seed,
        options=asdict(spec.parametrization_options) if spec.parametrization_options else None)

