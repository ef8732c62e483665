"""What grid kinds (transfer_check, shape_schedule) share: a setup from a source tune study, every point enqueued."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, TypeVar

import optuna
from optuna.storages import BaseStorage
from sqlalchemy.orm import Session

from scaletune.shapes import Shape
from service.kinds.base import StudyKind
from service.kinds.setup import resolve_source
from service.settings import Settings
from service.spec import GridSetup, GridSpec, Loc, SpecProblem, check_shapes, over_limits

GridSpecT = TypeVar("GridSpecT", bound=GridSetup)


class GridKind(StudyKind[GridSpecT]):
    """A fixed grid of trials around values tuned elsewhere; nothing is sampled and nothing is pruned."""

    @abstractmethod
    def grid_points(self, spec: GridSpecT) -> list[dict[str, Any]]:
        """Every trial's params, in the order they run."""

    @abstractmethod
    def trained_shapes(self, spec: GridSpec, base: Shape) -> dict[Loc, Shape]:
        """Every shape a trial of this grid trains, by where it comes from in the spec."""

    def asked_steps(self, spec: GridSpec) -> list[tuple[Loc, int]]:
        """The training steps a trial may run, by where they come from in the spec."""
        return [(("budget", "steps"), spec.budget.steps)] if spec.budget else []

    def check(self, spec: GridSpec, settings: Settings) -> list[SpecProblem]:
        """Limits always; shapes only once the setup is known (with a source, once it is resolved)."""
        assert spec.n_trials is not None
        asked: list[tuple[Loc, str, int]] = [(("n_trials",), "trials", spec.n_trials),
                                             (("parallelism",), "parallelism", spec.parallelism)]
        asked += [(loc, "steps", steps) for loc, steps in self.asked_steps(spec)]
        if spec.budget is not None:
            asked.append((("budget", "batch_size"), "batch_size", spec.budget.batch_size))
        problems = over_limits(asked, settings)
        if problems or spec.model is None or spec.dataset is None:
            return problems
        base = Shape(**spec.model.base.model_dump())
        try:
            shapes = self.trained_shapes(spec, base)
        except ValueError as error:
            return [SpecProblem(("sizes",), str(error))]
        return check_shapes(spec.model.family, spec.model.args, spec.dataset, {("model", "base"): base, **shapes},
                            {loc: f"the shape {shape.to_dict()}" for loc, shape in shapes.items()}, settings)

    def resolve(self, session: Session, spec: GridSpec, tenant: str) -> GridSpecT:
        """The setup from the source tune study where the spec leaves it out (SourceError when it cannot give one)."""
        return self.stored_type.model_validate(resolve_source(session, spec, tenant).model_dump())

    def enqueued(self, spec: GridSpecT) -> list[dict[str, Any]]:
        return self.grid_points(spec)

    def extension_points(self, spec: GridSpecT) -> list[dict[str, Any]]:
        """Points the grid grew by after its study was created (see ``StudyKind.grow``); none by default."""
        return []

    def load_optuna_study(self, storage: BaseStorage, name: str, spec: GridSpecT,
                          retried_params: dict[str, Any] | None) -> optuna.Study:
        """The study with every grid point enqueued; ``ask()`` pops the next one atomically. Nothing is pruned.

        A retry puts the failed attempt's point back in the queue and runs the next waiting point: every point
        still runs exactly once, whatever order attempts fail in. Points the grid grew by are queued here, by
        the first trial that sees them (Optuna skips a point it already has).
        """
        study = optuna.load_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner())
        for point in self.extension_points(spec):
            study.enqueue_trial(point, skip_if_exists=True)
        if retried_params:
            study.enqueue_trial(retried_params)
        return study
