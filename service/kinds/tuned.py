"""What a finished tune study hands on: its best attempt and the tuned hyperparameters in base units."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Study, TrialAttempt, TrialState
from service.spec import TuneSpec


class NoCompletedTrial(LookupError):
    """The study has no completed trial yet, so there is nothing tuned to hand on."""


def best_attempt(session: Session, study: Study) -> TrialAttempt:
    """The completed attempt with the best value (the study's objective direction), earliest on ties."""
    minimize = study.spec["objective"]["direction"] == "minimize"
    order = TrialAttempt.value.asc() if minimize else TrialAttempt.value.desc()
    best = session.scalars(select(TrialAttempt)
                           .where(TrialAttempt.study_id == study.id, TrialAttempt.state == TrialState.complete,
                                  TrialAttempt.value.is_not(None))
                           .order_by(order, TrialAttempt.finished_at).limit(1)).one_or_none()
    if best is None:
        raise NoCompletedTrial(f"study {study.id} has no completed trial yet; wait until one completes")
    return best


def tuned_values(spec: TuneSpec, best: TrialAttempt) -> dict[str, float]:
    """The spec's fixed hyperparameters plus the best trial's sampled ones, in base units."""
    return {**spec.hyperparameters, **{k: float(v) for k, v in (best.params or {}).items()}}
