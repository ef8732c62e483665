"""Coordinate check: do activations stay the same size as width (or depth) grows during the first steps?

Following microsoft/mup's ``get_coord_data``: for each size and seed, build a fresh model in its
parametrization, train a few steps on one fixed batch at a deliberately high LR, and record the mean
|output| of every named module on the forward pass of step t, before that step's update (t = 1 is the
initialisation). A correct parametrization gives log2-log2 slopes near 0 against width; SP gives positive
slopes after one step. Over depth, only the residual stream is comparable: the output of the last
residual block (the last module repeated with depth), i.e. the input to the final norm.

:func:`coord_check` runs a built-in or plugin family; :func:`coord_check_factory` runs the user's own
model code, ``factory(width, depth) -> nn.Module``, on a dataset from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory
from scaletune.parametrize import BuiltModel, Factory, ParamOptions, build_model, make_optimizer
from scaletune.shapes import Shape
from scaletune.train import loss_fn, model_logits

Axis = Literal["width", "depth"]
FLAT_SLOPE = 0.1  # |slope| of log2 value vs log2 size counted as flat (docs/parametrizations.md)
RESIDUAL_PROBE = "residual_stream"
DEFAULT_LR: dict[str, float] = {"adamw": 1e-2, "sgd": 0.1}  # higher than real training, as mup advises
DEFAULT_DATASET: dict[str, str] = {"gpt": "pytext"}
FALLBACK_DATASET = "digits"


@dataclass(frozen=True)
class CoordRow:
    module: str
    t: int
    values: list[float]  # mean |output| per size, averaged over seeds
    slope: float | None  # d log2(value) / d log2(size); None if some values are 0 (not all) or not finite


@dataclass
class CoordCheckResult:
    family: str
    parametrization: str
    optimizer: str
    lr: float
    axis: Axis
    sizes: list[int]
    steps: int
    seeds: int
    table: list[CoordRow] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(row.module for row in self.table))

    @property
    def max_abs_slope(self) -> float:
        """Worst |slope| after the first update (t >= 2); an undefined slope counts as infinite."""
        slopes = [math.inf if row.slope is None else abs(row.slope) for row in self.table if row.t >= 2]
        return max(slopes, default=0.0)

    def worst(self) -> CoordRow:
        """The row with the largest |slope| at t >= 2: where to look when a check fails."""
        rows = [row for row in self.table if row.t >= 2]
        return max(rows, key=lambda row: math.inf if row.slope is None else abs(row.slope))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe summary: per module its slope and values at each t, plus ``max_abs_slope`` (t >= 2)."""
        modules: dict[str, dict[str, list[Any]]] = {}
        for row in self.table:
            entry = modules.setdefault(row.module, {"slopes": [], "values": []})
            entry["slopes"].append(row.slope)
            entry["values"].append([v if math.isfinite(v) else None for v in row.values])
        worst = self.max_abs_slope
        return {
            "family": self.family, "parametrization": self.parametrization, "optimizer": self.optimizer,
            "lr": self.lr, "axis": self.axis, "sizes": self.sizes, "steps": self.steps, "seeds": self.seeds,
            "max_abs_slope": worst if math.isfinite(worst) else None,
            "modules": modules,
        }

    def plot(self, path: str | Path) -> Path:
        """Log-log mean |output| against size, one subplot per step t; written as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, axes = plt.subplots(1, self.steps, figsize=(4 * self.steps, 4), sharey=True, squeeze=False)
        for t, ax in enumerate(axes[0], start=1):
            for row in self.table:
                if row.t == t and any(v > 0 for v in row.values):
                    ax.plot(self.sizes, row.values, marker="o", label=row.module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"t = {t}")
            ax.set_xlabel(self.axis)
        axes[0][0].set_ylabel("mean |output|")
        handles, labels = axes[0][-1].get_legend_handles_labels()  # t = 1 omits all-zero (zero-init) rows
        fig.legend(handles, labels, loc="center right", fontsize="x-small")
        fig.suptitle(f"coordinate check: {self.family}, {self.parametrization}, {self.optimizer} lr={self.lr:g}")
        fig.tight_layout(rect=(0, 0, 0.82, 1))
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        return path


def log2_slope(sizes: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log2(value) on log2(size); all-zero values (a zero-init readout) are flat."""
    if all(v == 0 for v in values):
        return 0.0
    if any(v <= 0 or not math.isfinite(v) for v in values):
        return None
    slope, _ = np.polyfit(np.log2(sizes), np.log2(values), 1)
    return float(slope)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    return None


def _probes(built: BuiltModel, axis: Axis) -> dict[str, nn.Module]:
    """Modules to record: every named module over width; only the final residual stream over depth."""
    model = built.model
    if axis == "depth":
        if not built.classification.blocks:
            raise ValueError(f"{type(model).__name__} has no residual blocks (modules repeated with depth); "
                             "a depth coordinate check needs a residual stream")
        return {RESIDUAL_PROBE: model.get_submodule(built.classification.blocks[-1])}
    return {name: module for name, module in model.named_modules() if name}


def _record_run(built: BuiltModel, optimizer: str, hparams: HParams, batch: tuple[torch.Tensor, torch.Tensor],
                task: str, steps: int, axis: Axis) -> dict[str, list[float]]:
    """Train ``steps`` steps on one batch; per probe, mean |output| on each step's forward before its update."""
    current: dict[str, float] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                current[name] = tensor.detach().abs().mean().item()
        return hook

    model = built.model
    handles = [m.register_forward_hook(hook_for(name)) for name, m in _probes(built, axis).items()]
    opt = make_optimizer(built.param_groups, optimizer, hparams)
    history: dict[str, list[float]] = {}
    x, y = batch
    try:
        for _ in range(steps):
            current.clear()
            loss = loss_fn(model_logits(model(x)), y, task)  # type: ignore[arg-type]
            for name, value in current.items():
                history.setdefault(name, []).append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    return history


def _sweep(widths: list[int], depths: list[int] | None, steps: int, seeds: int) -> tuple[list[int], list[int] | None,
                                                                                    Axis, list[int]]:
    widths, depths = sorted(set(widths)), sorted(set(depths)) if depths else None
    axis: Axis = "depth" if depths else "width"
    sizes = depths if depths else widths
    if len(sizes) < 2:
        raise ValueError(f"a coordinate check needs at least two {axis}s, got {sizes}")
    if depths and len(widths) != 1:
        raise ValueError(f"a depth sweep runs at one fixed width; got widths {widths}")
    if steps < 2 or seeds < 1:
        raise ValueError(f"need steps >= 2 (t = 1 is the init) and seeds >= 1, got steps={steps}, seeds={seeds}")
    return widths, depths, axis, sizes


def _default_lr(lr: float | None, optimizer: str) -> float:
    lr = DEFAULT_LR[optimizer] if lr is None and optimizer in DEFAULT_LR else lr
    if lr is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(DEFAULT_LR)}")
    return lr


def _run(name: str, factory_for: Any, parametrization: str, base: Shape, shapes: list[Shape], axis: Axis,
         sizes: list[int], steps: int, seeds: int, dataset: str, dataset_args: dict[str, Any], lr: float,
         optimizer: str, batch_size: int, options: dict[str, Any] | None, task: str,
         declarations: dict[str, Any]) -> CoordCheckResult:
    batch = next(get_dataset(dataset, dataset_args).train_batches(batch_size, seed=0))
    hparams = HParams(lr=lr)
    param_options = ParamOptions.from_dict(options)
    per_size: list[dict[str, list[float]]] = []
    for shape in shapes:
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            built = build_model(factory_for(shape), base, shape, parametrization, hparams, optimizer, param_options,
                                **declarations)
            runs.append(_record_run(built, optimizer, hparams, batch, task, steps, axis))
        per_size.append({probe: np.mean([run[probe] for run in runs], axis=0).tolist() for probe in runs[0]})

    common = [probe for probe in per_size[0] if all(probe in size for size in per_size[1:])]
    table = []
    for probe in common:
        for t in range(1, steps + 1):
            values = [size[probe][t - 1] for size in per_size]
            table.append(CoordRow(probe, t, values, log2_slope(sizes, values)))
    return CoordCheckResult(name, parametrization, optimizer, lr, axis, sizes, steps, seeds, table)


def coord_check(family: str, parametrization: str, widths: list[int], depths: list[int] | None = None,
                steps: int = 4, seeds: int = 3, *, base: Shape | None = None, dataset: str | None = None,
                dataset_args: dict[str, Any] | None = None, lr: float | None = None, optimizer: str = "adamw",
                batch_size: int = 32, args: dict[str, Any] | None = None,
                options: dict[str, Any] | None = None) -> CoordCheckResult:
    """Sweep widths (at the base depth) or, when ``depths`` is given, depths at the one width in ``widths``."""
    widths, depths, axis, sizes = _sweep(widths, depths, steps, seeds)
    fam = get_family(family)
    dataset = dataset or DEFAULT_DATASET.get(family, FALLBACK_DATASET)
    dataset_args, args = dataset_args or {}, args or {}
    spec = dataset_spec(dataset, dataset_args)
    base = base or Shape(widths[0], depths[0] if depths else 2)
    shapes = [base.with_(depth=d, width=widths[0]) for d in depths] if depths else [base.with_(width=w) for w in widths]
    for shape in (base, *shapes):
        fam.validate(shape, spec, args)
    return _run(family, lambda shape: family_factory(fam, shape, spec, args), parametrization, base, shapes, axis,
                sizes, steps, seeds, dataset, dataset_args, _default_lr(lr, optimizer), optimizer, batch_size,
                options, spec.task, {})


def coord_check_factory(factory: Factory, parametrization: str, widths: list[int], depths: list[int] | None = None,
                        steps: int = 4, seeds: int = 3, *, name: str | None = None, base: Shape | None = None,
                        dataset: str = "pytext", dataset_args: dict[str, Any] | None = None, lr: float | None = None,
                        optimizer: str = "adamw", batch_size: int = 32, options: dict[str, Any] | None = None,
                        branch_outputs: list[str] | tuple[str, ...] = (),
                        attention: list[str] | tuple[str, ...] = ()) -> CoordCheckResult:
    """The same check on the user's own ``factory(width, depth) -> nn.Module`` (called on meta to classify).

    The model must take the dataset's inputs and return logits (or an object with ``.logits``); the fixed
    batch doubles as ``example_input`` for raw ``nn.Parameter`` matrices.
    """
    widths, depths, axis, sizes = _sweep(widths, depths, steps, seeds)
    dataset_args = dataset_args or {}
    spec = dataset_spec(dataset, dataset_args)
    base = base or Shape(widths[0], depths[0] if depths else 2)
    shapes = [base.with_(depth=d, width=widths[0]) for d in depths] if depths else [base.with_(width=w) for w in widths]
    example = next(get_dataset(dataset, dataset_args).train_batches(batch_size, seed=0))[0]
    declarations = {"branch_outputs": tuple(branch_outputs), "attention": tuple(attention), "example_input": example}
    return _run(name or getattr(factory, "__name__", "model"), lambda shape: factory, parametrization, base, shapes,
                axis, sizes, steps, seeds, dataset, dataset_args, _default_lr(lr, optimizer), optimizer, batch_size,
                options, spec.task, declarations)
