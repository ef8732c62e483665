"""The external kind: an Optuna search whose trials the user's own code runs, asking for them over HTTP.

No worker ever trains its trials (``dispatches_trials`` is False): service/leases.py hands each out under a
lease to whoever asks (``scaletune agent``, or the user's script through ``scaletune.Client``), and the client
library's ``Trial.build`` builds the user's model at ``model.proxy`` in the study's parametrization. No family,
dataset or budget: the user's code owns those.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from pydantic import AfterValidator, Field, StrictBool, StrictInt, StrictStr, StringConstraints

from scaletune.parametrize import Optimizer, ParamOptions, Parametrization
from scaletune.runner import TrialConfig
from service.kinds import tune
from service.kinds.base import StudyKind
from service.plots import DrawnPlot
from service.settings import Settings
from scaletune.hparams import HPARAM_NAMES
from service.spec import (CategoricalParam, FloatParam, IntParam, Loc, PrunerSpec, SamplerSpec, ShapeSpec, SpecProblem,
                          Strict, over_limits)

def _identifier(name: str) -> str:
    if not (name.isidentifier() and name.isascii() and len(name) <= 64):
        raise ValueError(f"{name!r} is not a hyperparameter name: use a letter or _, then letters, digits or _, "
                         "at most 64 characters (like dropout or beta_2)")
    return name


OwnName = Annotated[str, AfterValidator(_identifier)]
Choice = StrictBool | StrictInt | float | Annotated[StrictStr, StringConstraints(max_length=200)]


class OwnCategorical(CategoricalParam):
    """Choices of any JSON scalar (``["adamw", "lion"]``, ``[true, false]``): the user's code reads them as given."""

    choices: list[Choice] = Field(min_length=1, max_length=1000)  # type: ignore[assignment]

    def problems(self, loc: Loc, grid: bool) -> list[SpecProblem]:
        keyed = [(type(choice).__name__, choice) for choice in self.choices]
        if len(set(keyed)) < len(keyed):
            return [SpecProblem(loc + ("choices",), "choices repeat a value; list each choice once.")]
        return []


OwnSearchParam = Annotated[FloatParam | IntParam | OwnCategorical, Field(discriminator="type")]


class DirectionSpec(Strict):
    """What the user's code tells is the value to minimize or maximize; its metric is the user's own."""

    direction: Literal["minimize", "maximize"] = "minimize"


class ShapesSpec(Strict):
    base: ShapeSpec = Field(description="the shape the tuned values are expressed in")
    proxy: ShapeSpec = Field(description="the shape the user's code builds each trial at (Trial.build)")


class ExternalSpec(Strict):
    """Search hyperparameters for the user's own training code: it asks for trials over HTTP and tells results."""

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["external"]
    search_space: dict[OwnName, OwnSearchParam] = Field(
        min_length=1, description="built-in hyperparameters (lr, output_mult, ...: Trial.build applies them, in base "
                                  "units) and your own, named as you like (dropout, beta2, ...: your code reads them "
                                  "from trial.params)")
    objective: DirectionSpec = Field(default_factory=DirectionSpec)
    n_trials: int = Field(ge=1)
    parallelism: int = Field(1, ge=1, description="trials out at once; one more ask is answered 429")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    parametrization: Parametrization
    optimizer: Optimizer
    parametrization_options: ParamOptions = Field(default_factory=ParamOptions)
    model: ShapesSpec | None = Field(None, description="the shapes at which the client library builds the user's "
                                                       "model; optional")
    lease_seconds: int = Field(600, ge=5, le=7 * 24 * 3600,
                               description="a trial not reported, renewed or told for this long is failed "
                                           "(lease_expired) and its params are handed out again")


class ExternalKind(StudyKind[ExternalSpec]):
    name = "external"
    spec_type = ExternalSpec
    stored_type = ExternalSpec
    dispatches_trials = False
    plots = {name: plot for name, plot in tune.KIND.plots.items() if isinstance(plot, DrawnPlot)}

    def check(self, spec: ExternalSpec, settings: Settings) -> list[SpecProblem]:
        asked = [(("n_trials",), "trials", spec.n_trials), (("parallelism",), "parallelism", spec.parallelism)]
        return over_limits(asked, settings) + tune.search_problems(spec) + _builtin_problems(spec)

    def load_optuna_study(self, storage: BaseStorage, name: str, spec: ExternalSpec,
                          retried_params: dict[str, Any] | None) -> optuna.Study:
        return self.asking_study(storage, name, spec, retried_params,
                                 storage.get_n_trials(storage.get_study_id_from_name(name)))

    def asking_study(self, storage: BaseStorage, name: str, spec: ExternalSpec, retried_params: dict[str, Any] | None,
                     ordinal: int) -> optuna.Study:
        """The study for one ask; ``ordinal`` (the ask's place, counted under the study's lock) seeds the sampler,
        so asks at the same moment do not draw the same point."""
        return tune.searching_study(storage, name, spec, retried_params, ordinal, self.pruner(spec))

    def pruner(self, spec: ExternalSpec) -> optuna.pruners.BasePruner:
        """The user's code reports at steps of its own choosing: Optuna learns them from the reports."""
        return tune.pruner(spec.pruner.name, None, None)

    def distributions(self, spec: ExternalSpec) -> dict[str, BaseDistribution]:
        return tune.distributions(spec)

    def trial_config(self, spec: ExternalSpec, params: dict[str, Any]) -> TrialConfig:
        raise TypeError("an external study's trials run in the user's own code (ask/tell), never on a worker")


def _builtin_problems(spec: ExternalSpec) -> list[SpecProblem]:
    """A built-in hyperparameter is a number Trial.build applies: its choices must be numbers."""
    return [SpecProblem(("search_space", name, "choices"), f"{name} is a built-in hyperparameter that Trial.build "
                                                           "applies as a number; give numeric choices, or rename it "
                                                           "to search your own categorical.")
            for name, param in spec.search_space.items()
            if name in HPARAM_NAMES and isinstance(param, OwnCategorical)
            and not all(isinstance(c, int | float) and not isinstance(c, bool) for c in param.choices)]


KIND = ExternalKind()
