"""The study spec users submit: Pydantic for its structure, ``check_spec`` for limits, registries and cross-field rules."""

from __future__ import annotations

import json
from abc import abstractmethod
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from scaletune.data.registry import dataset_names, dataset_spec
from scaletune.hparams import HPARAM_NAMES
from scaletune.models.registry import family_names, get_family
from scaletune.runner import count_params, family_factory
from scaletune.shapes import Shape
from scaletune.train import Schedule
from service.settings import Settings

HParamName = Literal[HPARAM_NAMES]  # type: ignore[valid-type]
Loc = tuple[str | int, ...]
MAX_GRID_VALUES = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShapeSpec(_Strict):
    width: int = Field(ge=1, le=65_536)
    depth: int = Field(ge=1, le=1024, description="residual blocks; planning deeper targets is not supported")
    patch_size: int | None = Field(None, ge=1, le=1024)


class ModelSpec(_Strict):
    family: str = Field(min_length=1, max_length=100, description="a registered model family, e.g. mlp")
    base: ShapeSpec = Field(description="the shape the tuned values are expressed in")
    proxy: ShapeSpec = Field(description="the small shape the trials actually train")
    args: dict[str, Any] = Field(default_factory=dict, description="family-specific options")


class DatasetSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    args: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class BudgetSpec(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_every: int = Field(ge=1)
    schedule: Schedule = "cosine"


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    def grid_size(self) -> int:
        assert self.step is not None
        return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1

    def grid(self) -> list[float]:
        assert self.step is not None
        return [self.low + i * self.step for i in range(self.grid_size())]


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    def grid_size(self) -> int:
        return (self.high - self.low) // self.step + 1

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[float] = Field(min_length=1, max_length=1000)

    def grid_size(self) -> int:
        return len(self.choices)

    def grid(self) -> list[float]:
        return list(self.choices)


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class ObjectiveSpec(_Strict):
    metric: Literal["eval_loss"] = "eval_loss"
    direction: Literal["minimize", "maximize"] = "minimize"


class SamplerSpec(_Strict):
    name: Literal["tpe", "gp", "cmaes", "qmc", "random", "grid"] = "tpe"
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class PrunerSpec(_Strict):
    name: Literal["none", "median", "successive_halving", "hyperband", "wilcoxon"] = "none"


class ParametrizationOptions(_Strict):
    """Where the sources disagree (research notes §7): None keeps the parametrization's default."""

    zero_init_readout: bool | None = Field(None, description="default: true for the muP family, false for sp")
    zero_init_query: bool | None = Field(None, description="default: true for the muP family, false for sp")
    weight_decay_rule: Literal["lr_wd_product", "unscaled"] = "lr_wd_product"
    eps_rule: Literal["per_group", "global", "none"] = "per_group"
    alpha: float | None = Field(None, gt=0, le=2, description="override the depth exponent of depth_mup/completep")


class TuneSpec(_Strict):
    """Search hyperparameters (in base units) by training the proxy shape; transfer them to any target later."""

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["tune"]
    model: ModelSpec
    parametrization: Literal["sp", "mup", "depth_mup", "completep"]
    parametrization_options: ParametrizationOptions = Field(default_factory=ParametrizationOptions)
    optimizer: Literal["adamw", "sgd"]
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


class SourceSpec(_Strict):
    study_id: str = Field(min_length=1, max_length=36, description="a completed tune study of the same tenant")


class CheckedModelSpec(_Strict):
    family: str = Field(min_length=1, max_length=100, description="a registered model family, e.g. mlp")
    base: ShapeSpec = Field(description="the shape the hyperparameters are expressed in")
    args: dict[str, Any] = Field(default_factory=dict, description="family-specific options")


class LossObjective(_Strict):
    """Grid studies measure eval loss; the best value is the lowest."""

    metric: Literal["eval_loss"] = "eval_loss"
    direction: Literal["minimize"] = "minimize"


SETUP_FIELDS = ("model", "parametrization", "optimizer", "dataset", "budget")


class _GridSpec(_Strict):
    """A fixed grid of trials around values tuned elsewhere: a ``source`` tune study, or the explicit setup."""

    name: str = Field(min_length=1, max_length=200)
    source: SourceSpec | None = Field(None, description="take the setup and best values of this tune study; "
                                                        "fields given here override it")
    model: CheckedModelSpec | None = None
    parametrization: Literal["sp", "mup", "depth_mup", "completep"] | None = None
    parametrization_options: ParametrizationOptions | None = Field(None, description="default: the source's")
    optimizer: Literal["adamw", "sgd"] | None = None
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


class TransferCheckSpec(_GridSpec):
    """Train a ladder of sizes at LR multipliers around the tuned LR, to show the optimum stays put."""

    kind: Literal["transfer_check"]
    sizes: list[ShapeSpec] = Field(min_length=3, max_length=16, description="shapes to check, e.g. 1x, 4x, 16x width")
    octaves: float = Field(3.0, gt=0, le=10, description="LR multipliers span 2^-octaves .. 2^+octaves")
    step: float = Field(0.5, gt=0, le=10, description="octaves between neighbouring LR multipliers")

    def lr_multipliers_log2(self) -> list[float]:
        n = round(self.octaves / self.step)
        return [k * self.step for k in range(-n, n + 1)]

    def grid_size(self) -> int:
        return len(self.sizes) * len(self.lr_multipliers_log2()) * self.seeds


class ShapeScheduleSpec(_GridSpec):
    """Train shapes along one axis at several compute budgets, to fit per-shape laws and plan a schedule."""

    kind: Literal["shape_schedule"]
    axis: Literal["patch_size", "width", "depth"]
    values: list[int] = Field(min_length=2, max_length=16, description="the shapes along the axis")
    sizes: list[float] = Field([1.0], min_length=1, max_length=8,
                               description="proxy size multipliers of the base width (depth when axis is width); "
                                           ">= 3 allow a tier-A projection to a target")
    budgets: list[int] = Field(min_length=2, max_length=16,
                               description="training steps, log-spaced; each run has its own WSD cooldown")

    def grid_size(self) -> int:
        return len(self.values) * len(self.sizes) * self.seeds * len(self.budgets)

    def shape_at(self, base: Shape, value: int, size: float) -> Shape:
        """The base shape with ``axis`` set to ``value``, its width (depth when the axis is width) times ``size``."""
        scaled = "depth" if self.axis == "width" else "width"
        grown = getattr(base, scaled) * size
        if abs(grown - round(grown)) > 1e-9:
            raise ValueError(f"size {size} times the base {scaled} {getattr(base, scaled)} is not a whole number")
        return base.with_(**{scaled: round(grown)}).with_(**{self.axis: value})


StudySpec = Annotated[TuneSpec | TransferCheckSpec | ShapeScheduleSpec, Field(discriminator="kind")]
STUDY_SPEC = TypeAdapter(StudySpec)
SPEC_KINDS = ("tune", "transfer_check", "shape_schedule")


def without_kind_tag(loc: Loc) -> Loc:
    """Pydantic puts the union tag in error paths (``tune.n_trials``); users wrote ``n_trials``."""
    return loc[1:] if loc and loc[0] in SPEC_KINDS else loc


@dataclass(frozen=True)
class SpecProblem:
    loc: Loc
    msg: str


class SpecError(ValueError):
    """Everything wrong with a spec, each with the field path, so a person can fix it in one go."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc)) or 'spec'}: {p.msg}" for p in problems))


def _check_limits(spec: TuneSpec, settings: Settings) -> list[SpecProblem]:
    limits: list[tuple[Loc, int, int, str, str]] = [
        (("n_trials",), spec.n_trials, settings.MAX_TRIALS, "trials per study", "MAX_TRIALS"),
        (("parallelism",), spec.parallelism, settings.MAX_PARALLELISM, "parallel trials", "MAX_PARALLELISM"),
        (("budget", "steps"), spec.budget.steps, settings.MAX_STEPS, "training steps", "MAX_STEPS"),
        (("budget", "batch_size"), spec.budget.batch_size, settings.MAX_BATCH_SIZE, "batch size", "MAX_BATCH_SIZE"),
    ]
    return [SpecProblem(loc, f"{value} is above this server's limit of {limit} {what}; lower it, or ask the "
                             f"operator to raise SCALETUNE_{env}.")
            for loc, value, limit, what, env in limits if value > limit]


def _check_param(name: str, param: FloatParam | IntParam | CategoricalParam, grid: bool) -> list[SpecProblem]:
    loc: Loc = ("search_space", name)
    if isinstance(param, CategoricalParam):
        return []
    problems = []
    if not (math.isfinite(param.low) and math.isfinite(param.high)) or param.low >= param.high:
        problems.append(SpecProblem(loc + ("high",), f"high ({param.high}) must be a finite number above low "
                                                      f"({param.low})."))
    if param.log and param.low <= 0:
        problems.append(SpecProblem(loc + ("low",), f"a log-scale range needs low > 0, got {param.low}."))
    if param.log and (isinstance(param, FloatParam) and param.step is not None or
                      isinstance(param, IntParam) and param.step != 1):
        problems.append(SpecProblem(loc + ("step",), "step cannot be combined with log: true; drop one of them."))
    if grid and isinstance(param, FloatParam) and param.step is None:
        problems.append(SpecProblem(loc, "the grid sampler needs a finite set of values: give this float a step, "
                                         "or make it categorical."))
    elif grid and not problems and param.grid_size() > MAX_GRID_VALUES:
        problems.append(SpecProblem(loc + ("step",), f"this gives {param.grid_size():,} grid values, more than "
                                                     f"{MAX_GRID_VALUES:,}; use a larger step."))
    return problems


def _check_search(spec: TuneSpec) -> list[SpecProblem]:
    grid = spec.sampler.name == "grid"
    problems = [p for name, param in spec.search_space.items() for p in _check_param(name, param, grid)]
    for name in sorted(set(spec.hyperparameters) & set(spec.search_space)):
        problems.append(SpecProblem(("hyperparameters", name), f"{name} is both fixed and searched; remove it from "
                                                                 "hyperparameters or from search_space."))
    for i, point in enumerate(spec.enqueue):
        for name in sorted(set(point) - set(spec.search_space)):
            problems.append(SpecProblem(("enqueue", i, name), f"{name} is not in search_space, so it cannot be "
                                                               "enqueued; add it to search_space or remove it."))
    if len(spec.enqueue) > spec.n_trials:
        problems.append(SpecProblem(("enqueue",), f"{len(spec.enqueue)} enqueued points but only n_trials="
                                                  f"{spec.n_trials}; raise n_trials or enqueue fewer points."))
    if grid and not problems:
        points = math.prod(param.grid_size() for param in spec.search_space.values())
        if points < spec.n_trials:
            problems.append(SpecProblem(("n_trials",), f"the grid has only {points} points, fewer than n_trials="
                                                       f"{spec.n_trials}; lower n_trials or widen the grid."))
    if spec.budget.eval_every > spec.budget.steps:
        problems.append(SpecProblem(("budget", "eval_every"), f"eval_every ({spec.budget.eval_every}) is larger "
                                                              f"than steps ({spec.budget.steps}); no eval would run."))
    return problems


def _check_shapes(family_name: str, args: dict[str, Any], dataset: DatasetSpec, shapes: dict[Loc, Shape],
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


def _check_model(spec: TuneSpec, settings: Settings) -> list[SpecProblem]:
    shapes = {("model", which): Shape(**getattr(spec.model, which).model_dump()) for which in ("base", "proxy")}
    return _check_shapes(spec.model.family, spec.model.args, spec.dataset, shapes, {("model", "proxy"): "the proxy"},
                         settings)


def _check_grid_limits(spec: TransferCheckSpec | ShapeScheduleSpec, settings: Settings) -> list[SpecProblem]:
    assert spec.n_trials is not None
    steps = [(("budget", "steps"), spec.budget.steps)] if spec.budget else []
    if isinstance(spec, ShapeScheduleSpec):
        steps = [(("budgets", i), b) for i, b in enumerate(spec.budgets)]
    limits: list[tuple[Loc, int, int, str, str]] = [
        (("n_trials",), spec.n_trials, settings.MAX_TRIALS, "trials per study", "MAX_TRIALS"),
        (("parallelism",), spec.parallelism, settings.MAX_PARALLELISM, "parallel trials", "MAX_PARALLELISM"),
        *[(loc, value, settings.MAX_STEPS, "training steps", "MAX_STEPS") for loc, value in steps],
    ]
    if spec.budget is not None:
        limits.append((("budget", "batch_size"), spec.budget.batch_size, settings.MAX_BATCH_SIZE, "batch size",
                       "MAX_BATCH_SIZE"))
    return [SpecProblem(loc, f"{value} is above this server's limit of {limit} {what}; lower it, or ask the "
                             f"operator to raise SCALETUNE_{env}.")
            for loc, value, limit, what, env in limits if value > limit]


def trained_shapes(spec: TransferCheckSpec | ShapeScheduleSpec, base: Shape) -> dict[Loc, Shape]:
    """Every shape a trial of this grid trains, by where it comes from in the spec."""
    if isinstance(spec, TransferCheckSpec):
        return {("sizes", i): Shape(**size.model_dump()) for i, size in enumerate(spec.sizes)}
    return {("values", i, "sizes", j): spec.shape_at(base, value, mult)
            for i, value in enumerate(spec.values) for j, mult in enumerate(spec.sizes)}


def _check_grid(spec: TransferCheckSpec | ShapeScheduleSpec, settings: Settings) -> list[SpecProblem]:
    """Limits always; shapes only once the setup is known (with a source, the service checks them on submit)."""
    problems = _check_grid_limits(spec, settings)
    if problems or spec.model is None or spec.dataset is None:
        return problems
    base = Shape(**spec.model.base.model_dump())
    try:
        shapes = trained_shapes(spec, base)
    except ValueError as error:
        return [SpecProblem(("sizes",), str(error))]
    return _check_shapes(spec.model.family, spec.model.args, spec.dataset, {("model", "base"): base, **shapes},
                         {loc: f"the shape {shape.to_dict()}" for loc, shape in shapes.items()}, settings)


def check_spec(spec: TuneSpec | TransferCheckSpec | ShapeScheduleSpec, settings: Settings) -> None:
    """Raise SpecError listing every problem the types alone cannot catch."""
    if isinstance(spec, TuneSpec):
        problems = _check_limits(spec, settings) + _check_search(spec)
        if not problems:
            problems = _check_model(spec, settings)
    else:
        problems = _check_grid(spec, settings)
    if problems:
        raise SpecError(problems)


def parse_spec(data: Any, settings: Settings) -> TuneSpec | TransferCheckSpec | ShapeScheduleSpec:
    """Validate a decoded YAML/JSON document completely; every failure is a SpecError."""
    try:
        spec = STUDY_SPEC.validate_python(data)
    except ValidationError as error:
        raise SpecError([SpecProblem(without_kind_tag(tuple(e["loc"])), e["msg"]) for e in error.errors()]) from None
    check_spec(spec, settings)
    return spec


def load_spec(path: str | Path, settings: Settings | None = None) -> TuneSpec | TransferCheckSpec | ShapeScheduleSpec:
    """Read a spec from a .yaml/.yml or .json file (what the CLI submits)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return parse_spec(data, settings or Settings())
