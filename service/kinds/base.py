"""What a study kind is: the one object the service asks about everything that differs between kinds.

In the style of Optuna's ``BaseSampler``: the rest of the service (API, dispatch, workers, plots) holds a
``StudyKind`` found by ``service.kinds.registry.kind_of`` and calls it; it never branches on the spec's class.
A new kind is a module exporting ``KIND`` plus one line in the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from pydantic import BaseModel
from sqlalchemy.orm import Session

from scaletune.packs import pack_size_for
from scaletune.runner import TrialConfig
from scaletune.train import TrainResult
from service.models import Study, TrialAttempt
from service.plots import Plot
from service.settings import Settings
from service.spec import SpecProblem

SpecT = TypeVar("SpecT", bound=BaseModel)


class StudyKind(ABC, Generic[SpecT]):
    """One kind of study: its spec type, checks, Optuna study, trials, summary and plots.

    ``SpecT`` is the spec as stored: what ``resolve`` made of the submitted ``spec_type`` at submission.
    """

    name: ClassVar[str]
    spec_type: type[BaseModel]
    """What users submit (a member of the API's spec union)."""
    stored_type: type[SpecT]
    dispatches_trials: ClassVar[bool] = True
    """True: the service queues each trial for a worker; False: trials are created by an HTTP ask."""
    plots: Mapping[str, Plot] = {}
    """The plots this kind serves under /plots/{name}, in the order they are listed."""
    summary_type: type[BaseModel] | None = None
    """What ``summary`` returns, as GET /v1/studies/{id} documents its ``result`` (None: no summary)."""

    def parse(self, stored: dict[str, Any]) -> SpecT:
        """The spec from its stored JSON (resolved and checked at submission)."""
        return self.stored_type.model_validate(stored)

    @abstractmethod
    def check(self, spec: Any, settings: Settings) -> list[SpecProblem]:
        """Everything wrong with a submitted or resolved spec that its types cannot catch (limits, registries...)."""

    def resolve(self, session: Session, spec: Any, tenant: str) -> SpecT:
        """The submitted spec as stored: whatever it refers to filled in, once, at submission.

        Raises ValueError naming the problem; by default the spec itself.
        """
        return self.stored_type.model_validate(spec.model_dump())

    def enqueued(self, spec: SpecT) -> list[dict[str, Any]]:
        """Points Optuna hands out first, each to exactly one ``ask()``."""
        return []

    @abstractmethod
    def load_optuna_study(self, storage: BaseStorage, name: str, spec: SpecT,
                          retried_params: dict[str, Any] | None) -> optuna.Study:
        """The Optuna study as one trial sees it; ``retried_params`` (a retry) makes the next ask re-run that point."""

    @abstractmethod
    def distributions(self, spec: SpecT) -> dict[str, BaseDistribution]:
        """What a trial asks Optuna for."""

    @abstractmethod
    def trial_config(self, spec: SpecT, params: dict[str, Any]) -> TrialConfig:
        """What a worker trains for a trial with these params."""

    def run_planned(self, spec: SpecT, attempt: TrialAttempt, settings: Settings,
                    record: Callable[[dict[str, Any]], bool]) -> TrainResult | None:
        """Train an attempt whose work was fixed when it was queued rather than asked of Optuna, passing each eval
        point to ``record`` (True: stop now); None for a trial the worker asks Optuna for (every one, by default)."""
        return None

    def is_planned(self, attempt: TrialAttempt) -> bool:
        """Whether ``run_planned`` trains this attempt (it then trains alone, never in a pack); False by default."""
        return False

    def pack_size(self, spec: SpecT, data_root: Path | None) -> int:
        """How many of the study's queued trials one worker may train as one pack; 1 (one at a time) by default.

        A pack's members train as one computation when their configs differ only in values, seed and length
        (``scaletune.packs.pack_key``); the others in it train in groups of their own, one after another.
        """
        return 1

    def grow(self, spec: SpecT, attempts: list[TrialAttempt]) -> dict[str, Any] | None:
        """Once every queued trial has finished: fields to update in the stored spec to run more (None: done)."""
        return None

    def summary(self, session: Session, study: Study, spec: SpecT, data_root: Path | None) -> dict[str, Any] | None:
        """What GET /v1/studies/{id} says about the completed study beyond its best value (a ``summary_type``
        as JSON); None by default."""
        return None


def pack_of(pack: int | str, largest: TrialConfig, data_root: Path | None) -> int:
    """A spec's ``pack``: the number, or for auto what suits ``largest``, the largest config the study trains."""
    return pack_size_for(largest, None if data_root is None else str(data_root)) if pack == "auto" else int(pack)
