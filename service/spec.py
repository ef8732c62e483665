"""The study spec users submit: Pydantic for its structure, ``check_spec`` for limits, registries and cross-field rules."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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
    width: int = Field(ge=1, le=1_000_000)
    depth: int = Field(ge=1, le=100_000)
    patch_size: int | None = Field(None, ge=1, le=4096)


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


class TuneSpec(_Strict):
    """Search hyperparameters (in base units) by training the proxy shape; transfer them to any target later."""

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["tune"]
    model: ModelSpec
    parametrization: Literal["sp", "mup", "depth_mup", "completep"]
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


# New kinds (transfer_check, shape_schedule) join this union as further models with their own ``kind``.
StudySpec = Annotated[TuneSpec, Field(discriminator="kind")]
STUDY_SPEC = TypeAdapter(StudySpec)
SPEC_KINDS = ("tune",)


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


def _check_model(spec: TuneSpec, settings: Settings) -> list[SpecProblem]:
    """Names against the registries, shapes against the family, and the proxy's size against the limit."""
    problems = []
    if spec.model.family not in family_names():
        problems.append(SpecProblem(("model", "family"), f"unknown model family {spec.model.family!r}; "
                                                         f"available: {', '.join(sorted(family_names()))}."))
    if spec.dataset.name not in dataset_names():
        problems.append(SpecProblem(("dataset", "name"), f"unknown dataset {spec.dataset.name!r}; "
                                                         f"available: {', '.join(sorted(dataset_names()))}."))
    if problems:
        return problems
    try:
        data = dataset_spec(spec.dataset.name, spec.dataset.args, settings.DATA_ROOT)
    except (ValueError, TypeError) as error:
        return [SpecProblem(("dataset", "args"), str(error))]
    family = get_family(spec.model.family)
    for which in ("base", "proxy"):
        shape = Shape(**getattr(spec.model, which).model_dump())
        try:
            family.validate(shape, data, spec.model.args)
        except (ValueError, TypeError) as error:
            problems.append(SpecProblem(("model", which), str(error)))
    if problems:
        return problems
    proxy = Shape(**spec.model.proxy.model_dump())
    n_params = count_params(family_factory(family, proxy, data, spec.model.args), proxy)
    if n_params > settings.MAX_PROXY_PARAMS:
        problems.append(SpecProblem(("model", "proxy"), f"the proxy has {n_params:,} parameters, above this "
                                                        f"server's limit of {settings.MAX_PROXY_PARAMS:,}; use a "
                                                        "smaller proxy shape (that is what transfer is for)."))
    return problems


def check_spec(spec: TuneSpec, settings: Settings) -> None:
    """Raise SpecError listing every problem the types alone cannot catch."""
    problems = _check_limits(spec, settings) + _check_search(spec)
    if not problems:
        problems = _check_model(spec, settings)
    if problems:
        raise SpecError(problems)


def parse_spec(data: Any, settings: Settings) -> TuneSpec:
    """Validate a decoded YAML/JSON document completely; every failure is a SpecError."""
    try:
        spec = STUDY_SPEC.validate_python(data)
    except ValidationError as error:
        raise SpecError([SpecProblem(without_kind_tag(tuple(e["loc"])), e["msg"]) for e in error.errors()]) from None
    check_spec(spec, settings)
    return spec


def load_spec(path: str | Path, settings: Settings | None = None) -> TuneSpec:
    """Read a spec from a .yaml/.yml or .json file (what the CLI submits)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return parse_spec(data, settings or Settings())
