"""The study spec users submit: Pydantic for its structure; the checks every kind shares (limits, registries, shapes).

Each kind's own checks are its ``StudyKind.check`` (service/kinds/); service/kinds/registry.py parses and checks a spec.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scaletune.data.registry import dataset_names, dataset_spec
from scaletune.hparams import HPARAM_NAMES
from scaletune.models.registry import family_names, get_family
from scaletune.models.size import count_params, family_factory
from scaletune.parametrize import Optimizer, ParamOptions, Parametrization
from scaletune.shapes import Shape
from scaletune.train import Budget, Schedule
from scaletune.transfer_check import CheckedHParam, log2_grid
from service.settings import Settings

HParamName = Literal[HPARAM_NAMES]  # type: ignore[valid-type]
Loc = tuple[str | int, ...]
MAX_GRID_VALUES = 10_000
MAX_STEPPED_VALUES = 10**9  # past this Optuna's decimal arithmetic on the step fails, and no search needs it


class Strict(BaseModel):
    """Unknown fields are refused, so a misspelt option is a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ShapeSpec(Strict):
    width: int = Field(ge=1, le=65_536)
    depth: int = Field(ge=1, le=1024, description="residual blocks; planning deeper targets is not supported")
    patch_size: int | None = Field(None, ge=1, le=1024)
    context: int | None = Field(None, ge=1, le=1_000_000, description="gpt: the tokens attention spans (a divisor of "
                                                                       "the dataset's seq_len; unset: all of them)")


class ModelSpec(Strict):
    family: str = Field(min_length=1, max_length=100, description="a registered model family, e.g. mlp")
    base: ShapeSpec = Field(description="the shape the tuned values are expressed in")
    proxy: ShapeSpec = Field(description="the small shape the trials actually train")
    args: dict[str, Any] = Field(default_factory=dict, description="family-specific options")


class DatasetSpec(Strict):
    name: str = Field(min_length=1, max_length=100)
    args: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class BudgetSpec(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_every: int = Field(ge=1)
    schedule: Schedule = "cosine"

    def to_budget(self, **changes: Any) -> Budget:
        """The core's Budget; ``changes`` override fields (a grid trial's own steps or schedule)."""
        return Budget(**{**self.model_dump(), **changes})


class _Range(Strict):
    """What float and int parameters share: a [low, high] range, maybe log-scaled or stepped."""

    type: str
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @abstractmethod
    def stepped(self) -> bool:
        """Whether the range has a step other than its type's default."""

    @abstractmethod
    def value_count(self) -> float:
        """How many values the stepped range holds; a float, so that an absurdly small step cannot overflow."""

    def grid_size(self) -> int:
        """How many values the grid sampler would try."""
        return int(self.value_count())

    def problems(self, loc: Loc, grid: bool) -> list[SpecProblem]:
        """What is wrong with the range; ``grid``: the grid sampler needs a finite set of values."""
        problems = []
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            problems.append(SpecProblem(loc + ("high",), f"high ({self.high}) must be a finite number above low "
                                                          f"({self.low})."))
        if self.log and self.low <= 0:
            problems.append(SpecProblem(loc + ("low",), f"a log-scale range needs low > 0, got {self.low}."))
        if self.log and self.stepped():
            problems.append(SpecProblem(loc + ("step",), "step cannot be combined with log: true; drop one of them."))
        if self.stepped() and not problems and self.value_count() > MAX_STEPPED_VALUES:
            problems.append(SpecProblem(loc + ("step",), f"a step of {self.step} cuts the range into more than "
                                                         f"{MAX_STEPPED_VALUES:,} values; use a larger step."))
        elif grid and self.step is None:
            problems.append(SpecProblem(loc, "the grid sampler needs a finite set of values: give this float a "
                                             "step, or make it categorical."))
        elif grid and not problems and self.value_count() > MAX_GRID_VALUES:
            problems.append(SpecProblem(loc + ("step",), f"this gives {self.grid_size():,} grid values, more than "
                                                         f"{MAX_GRID_VALUES:,}; use a larger step."))
        return problems


class FloatParam(_Range):
    type: Literal["float"]
    step: float | None = Field(None, gt=0)

    def stepped(self) -> bool:
        return self.step is not None

    def value_count(self) -> float:
        assert self.step is not None
        steps = (self.high - self.low) / self.step
        return math.floor(steps + 1e-9) + 1.0 if math.isfinite(steps) else math.inf

    def grid(self) -> list[float]:
        assert self.step is not None
        return [self.low + i * self.step for i in range(self.grid_size())]

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)


class IntParam(_Range):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)

    def stepped(self) -> bool:
        return self.step != 1

    def value_count(self) -> float:
        return float((self.high - self.low) // self.step + 1)

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, log=self.log, step=self.step)


class CategoricalParam(Strict):
    type: Literal["categorical"]
    choices: list[float] = Field(min_length=1, max_length=1000)

    def grid_size(self) -> int:
        return len(self.choices)

    def grid(self) -> list[float]:
        return list(self.choices)

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.choices)

    def problems(self, loc: Loc, grid: bool) -> list[SpecProblem]:
        return []


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


PackSize = Annotated[
    Annotated[int, Field(ge=1, le=4096)] | Literal["auto"],
    Field(description="trials one worker trains as one batched computation (scaletune.packs), taken from the "
                      "study's queued trials (at most parallelism); auto: sized from the proxy's parameter count "
                      "and the worker's device; 1: one trial at a time")]


class ObjectiveSpec(Strict):
    metric: Literal["eval_loss"] = "eval_loss"
    direction: Literal["minimize", "maximize"] = "minimize"


class SamplerSpec(Strict):
    name: Literal["tpe", "gp", "cmaes", "qmc", "random", "grid"] = "tpe"
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class PrunerSpec(Strict):
    name: Literal["none", "median", "successive_halving", "hyperband", "wilcoxon"] = "none"


class TuneSpec(Strict):
    """Search hyperparameters (in base units) by training the proxy shape; transfer them to any target later."""

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["tune"]
    model: ModelSpec
    parametrization: Parametrization
    parametrization_options: ParamOptions = Field(default_factory=ParamOptions)
    optimizer: Optimizer
    dataset: DatasetSpec
    budget: BudgetSpec
    search_space: dict[HParamName, SearchParam] = Field(min_length=1)
    hyperparameters: dict[HParamName, float] = Field(default_factory=dict, description="fixed values, base units")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    n_trials: int = Field(ge=1)
    parallelism: int = Field(1, ge=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    enqueue: list[dict[HParamName, float]] = Field(default_factory=list, description="points to try first")
    queue: Literal["cpu", "gpu"] = Field("cpu", description="which worker queue runs the trials")
    pack: PackSize = "auto"


class SourceSpec(Strict):
    study_id: str = Field(min_length=1, max_length=36, description="a completed tune study of the same tenant: its "
                                                                   "id or a unique prefix of it (stored as the full id)")


class CheckedModelSpec(Strict):
    family: str = Field(min_length=1, max_length=100, description="a registered model family, e.g. mlp")
    base: ShapeSpec = Field(description="the shape the hyperparameters are expressed in")
    args: dict[str, Any] = Field(default_factory=dict, description="family-specific options")


class LossObjective(Strict):
    """Grid studies measure eval loss; the best value is the lowest."""

    metric: Literal["eval_loss"] = "eval_loss"
    direction: Literal["minimize"] = "minimize"


SETUP_FIELDS = ("model", "parametrization", "optimizer", "dataset", "budget")


class GridExtension(Strict):
    """One more multiplier for one size of a transfer check, added because its optimum sat at the grid edge."""

    size_index: int = Field(ge=0)
    log2_mult: float


class GridSpec(Strict):
    """A fixed grid of trials around values tuned elsewhere: a ``source`` tune study, or the explicit setup."""

    name: str = Field(min_length=1, max_length=200)
    source: SourceSpec | None = Field(None, description="take the setup and best values of this tune study; "
                                                        "fields given here override it")
    model: CheckedModelSpec | None = None
    parametrization: Parametrization | None = None
    parametrization_options: ParamOptions | None = Field(None, description="default: the source's")
    optimizer: Optimizer | None = None
    dataset: DatasetSpec | None = None
    budget: BudgetSpec | None = None
    hyperparameters: dict[HParamName, float] = Field(default_factory=dict, description="base units")
    seeds: int = Field(2, ge=2, le=32, description="independent runs per grid point")
    objective: LossObjective = Field(default_factory=LossObjective)
    n_trials: int | None = Field(None, description="the grid's size; filled in, and must match when given")
    parallelism: int = Field(1, ge=1)
    queue: Literal["cpu", "gpu"] = Field("cpu", description="which worker queue runs the trials")

    @abstractmethod
    def grid_size(self) -> int:
        """How many trials the grid has."""

    @model_validator(mode="after")
    def _setup_and_size(self) -> Self:
        missing = [name for name in SETUP_FIELDS if getattr(self, name) is None]
        if self.source is None and missing:
            raise ValueError(f"give a source tune study, or all of {', '.join(SETUP_FIELDS)} "
                             f"(missing: {', '.join(missing)})")
        size = self.grid_size()
        if self.n_trials is not None and self.n_trials != size:
            raise ValueError(f"n_trials is {self.n_trials} but the grid has {size} points; leave n_trials out")
        self.n_trials = size
        return self


class TransferCheckSpec(GridSpec):
    """Train a ladder of sizes at multipliers of one tuned value (the LR by default), to show its optimum stays put."""

    kind: Literal["transfer_check"]
    hparam: CheckedHParam = Field("lr", description="the tuned value whose optimum is checked (log2 grid around it)")
    seeds: int = Field(3, ge=2, le=32, description="independent runs per grid point; the verdict's bootstrap "
                                                   "interval needs at least 3")
    sizes: list[ShapeSpec] = Field(min_length=3, max_length=16, description="shapes to check, e.g. 1x, 4x, 16x width")
    octaves: float = Field(3.0, gt=0, le=10, description="multipliers span 2^-octaves .. 2^+octaves")
    step: float = Field(0.5, ge=0.1, le=10, description="octaves between neighbouring multipliers")
    max_extensions: int = Field(3, ge=0, le=8, description="octaves the grid may grow beyond either end, per size, "
                                                          "while that size's seed-mean minimum sits at an edge")
    extensions: list[GridExtension] = Field(default_factory=list, description="filled in by the service as the "
                                                                            "grid grows; leave out")
    pack: PackSize = "auto"

    def multipliers_log2(self) -> list[float]:
        """The grid every size starts with."""
        return log2_grid(self.octaves, self.step)

    def grid_size(self) -> int:
        return (len(self.sizes) * len(self.multipliers_log2()) + len(self.extensions)) * self.seeds


ScheduleAxis = Literal["patch_size", "context", "width", "depth"]


class ShapeScheduleSpec(GridSpec):
    """Train shapes along one axis at several compute budgets, to fit per-shape laws and plan a schedule."""

    kind: Literal["shape_schedule"]
    axis: ScheduleAxis
    values: list[int] = Field(min_length=2, max_length=16, description="the shapes along the axis")
    sizes: list[float] = Field([1.0], min_length=1, max_length=8,
                               description="proxy size multipliers of the base width (depth when axis is width); "
                                           ">= 3 allow a tier-A projection to a target")
    budgets: list[int] = Field(min_length=2, max_length=16,
                               description="training steps, log-spaced; each run has its own WSD cooldown")
    second_axis: ScheduleAxis | None = Field(
        None, description="a second axis for a joint schedule over the product of both axes' values (one proxy "
                          "size); a switch may change both axes at once")
    second_values: list[int] | None = Field(None, min_length=2, max_length=8,
                                            description="the shapes along second_axis")
    pack: PackSize = "auto"

    @model_validator(mode="after")
    def _joint_axes(self) -> ShapeScheduleSpec:
        if (self.second_axis is None) != (self.second_values is None):
            raise ValueError("give second_axis and second_values together, or neither")
        if self.second_axis is not None and self.second_axis == self.axis:
            raise ValueError(f"second_axis must differ from axis ({self.axis})")
        if self.second_axis is not None and self.sizes != [1.0]:
            raise ValueError("a joint schedule (second_axis) trains one proxy size; leave sizes out")
        return self

    def axes(self) -> list[str]:
        return [self.axis] if self.second_axis is None else [self.axis, self.second_axis]

    def points(self) -> list[dict[str, int]]:
        """The schedule's shapes as axis values: ``values`` alone, or their product with ``second_values``."""
        if self.second_axis is None or self.second_values is None:
            return [{self.axis: v} for v in self.values]
        return [{self.axis: v, self.second_axis: w} for v in self.values for w in self.second_values]

    def point_label(self, index: int) -> str:
        return ",".join(f"{axis}={value}" for axis, value in self.points()[index].items())

    def point_shape(self, base: Shape, index: int, size: float) -> Shape:
        """The schedule's shape ``index`` (of ``points``) at proxy size ``size``."""
        point = self.points()[index]
        return self.shape_at(base, point[self.axis], size).with_(**point)

    def grid_size(self) -> int:
        return len(self.points()) * len(self.sizes) * self.seeds * len(self.budgets)

    def shape_at(self, base: Shape, value: int, size: float) -> Shape:
        """The base shape with ``axis`` set to ``value``, its width (depth when the axis is width) times ``size``."""
        scaled = "depth" if self.axis == "width" else "width"
        grown = getattr(base, scaled) * size
        if abs(grown - round(grown)) > 1e-9:
            raise ValueError(f"size {size} times the base {scaled} {getattr(base, scaled)} is not a whole number")
        return base.with_(**{scaled: round(grown)}).with_(**{self.axis: value})


@dataclass(frozen=True)
class SpecProblem:
    loc: Loc
    msg: str


class SpecError(ValueError):
    """Everything wrong with a spec, each with the field path, so a person can fix it in one go."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc)) or 'spec'}: {p.msg}" for p in problems))


LIMITS: dict[str, tuple[str, str]] = {  # what a spec may ask for: the setting that bounds it, and its name
    "trials": ("MAX_TRIALS", "trials per study"),
    "parallelism": ("MAX_PARALLELISM", "parallel trials"),
    "steps": ("MAX_STEPS", "training steps"),
    "batch_size": ("MAX_BATCH_SIZE", "batch size"),
}


def over_limits(asked: list[tuple[Loc, str, int]], settings: Settings) -> list[SpecProblem]:
    """Each (field path, LIMITS key, value) above this server's limit, with the setting that raises it."""
    problems = []
    for loc, name, value in asked:
        setting, what = LIMITS[name]
        limit = getattr(settings, setting)
        if value > limit:
            problems.append(SpecProblem(loc, f"{value} is above this server's limit of {limit} {what}; lower it, or "
                                             f"ask the operator to raise SCALETUNE_{setting}."))
    return problems


def check_shapes(family_name: str, args: dict[str, Any], dataset: DatasetSpec, shapes: dict[Loc, Shape],
                  trained: dict[Loc, str], settings: Settings) -> list[SpecProblem]:
    """Names against the registries, shapes against the family, and each trained shape's size against the limit.

    ``trained`` names the shapes that trials build (loc -> how to call it in a message).
    """
    problems = []
    if family_name not in family_names():
        problems.append(SpecProblem(("model", "family"), f"unknown model family {family_name!r}; "
                                                         f"available: {', '.join(sorted(family_names()))}."))
    if dataset.name not in dataset_names():
        problems.append(SpecProblem(("dataset", "name"), f"unknown dataset {dataset.name!r}; "
                                                         f"available: {', '.join(sorted(dataset_names()))}."))
    if problems:
        return problems
    try:
        data = dataset_spec(dataset.name, dataset.args, settings.DATA_ROOT)
    except (ValueError, TypeError) as error:
        return [SpecProblem(("dataset", "args"), str(error))]
    family = get_family(family_name)
    for loc, shape in shapes.items():
        try:
            family.validate(shape, data, args)
        except (ValueError, TypeError) as error:
            problems.append(SpecProblem(loc, str(error)))
    if problems:
        return problems
    for loc, what in trained.items():
        n_params = count_params(family_factory(family, shapes[loc], data, args), shapes[loc])
        if n_params > settings.MAX_PROXY_PARAMS:
            problems.append(SpecProblem(loc, f"{what} has {n_params:,} parameters, above this server's limit of "
                                             f"{settings.MAX_PROXY_PARAMS:,}; use a smaller shape (that is what "
                                             "transfer is for)."))
    return problems


class GridSetup(Strict):
    """A grid spec's setup once resolved at submission: every part given, by the spec or by its source study."""

    model: CheckedModelSpec
    parametrization: Parametrization
    parametrization_options: ParamOptions | None = Field(description="None: the parametrization's defaults")
    optimizer: Optimizer
    dataset: DatasetSpec
    budget: BudgetSpec


class ResolvedTransferCheck(GridSetup, TransferCheckSpec):
    """A transfer_check study's spec as stored."""


class ResolvedShapeSchedule(GridSetup, ShapeScheduleSpec):
    """A shape_schedule study's spec as stored."""

