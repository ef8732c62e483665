"""Transfer check: does the optimal learning rate stay put as the model grows?

Pure analysis over raw trial results (one record per size x LR x seed). Per size, the optimum log2 LR
is the vertex of the parabola through the grid minimum of the seed-mean loss and its two neighbours;
its uncertainty is a bootstrap over seeds. Drift is measured in octaves against the smallest size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scaletune.shapes import Shape

DRIFT_TOLERANCE_OCTAVES = 0.5
BOOTSTRAP_RESAMPLES = 200
Verdict = Literal["holds", "drifts", "not_monotone", "inconclusive"]


def lr_grid(tuned_lr: float, octaves: float = 3.0, step: float = 0.5) -> list[float]:
    """LRs at ``tuned_lr * 2**k`` for k from -octaves to +octaves in ``step`` (13 points by default)."""
    if tuned_lr <= 0 or octaves < 0 or step <= 0:
        raise ValueError(f"need tuned_lr > 0, octaves >= 0 and step > 0, got {tuned_lr}, {octaves}, {step}")
    n = round(octaves / step)
    return [tuned_lr * 2.0 ** (k * step) for k in range(-n, n + 1)]


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial; ``loss`` is None when the run diverged."""

    size: str
    shape: Shape
    log2_lr: float
    seed: int
    loss: float | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        """Accepts ``log2_lr`` (a log2 LR or LR multiplier) or ``lr``; ``loss`` as a float, None or 'diverged'."""
        if "log2_lr" in d:
            log2_lr = float(d["log2_lr"])
        elif "lr" in d:
            log2_lr = math.log2(float(d["lr"]))
        else:
            raise ValueError(f"a transfer-check record needs 'log2_lr' or 'lr': {d}")
        loss = d.get("loss")
        value = None if loss is None or loss == "diverged" else float(loss)
        shape = d["shape"] if isinstance(d["shape"], Shape) else Shape.from_dict(d["shape"])
        return cls(size=str(d["size"]), shape=shape, log2_lr=log2_lr, seed=int(d["seed"]),
                   loss=value if value is not None and math.isfinite(value) else None)


@dataclass
class SizeResult:
    size: str
    shape: dict[str, int]
    log2_lrs: list[float]
    mean_loss: list[float | None]  # seed mean per grid point; None where any seed diverged
    diverged: list[int]  # diverged seeds per grid point
    optimum_log2_lr: float | None  # None when every grid point diverged
    interval: tuple[float, float] | None  # bootstrap 95% interval over seeds
    at_edge: bool  # the grid minimum is the first or last grid point: widen the grid
    best_loss: float | None  # lowest seed-mean loss on the grid
    drift: float | None = None  # octaves vs the smallest size


@dataclass
class TransferCheckResult:
    sizes: list[SizeResult]
    monotone: bool  # loss at the optimum improves (does not rise) with every size step
    max_drift: float | None
    verdict: Verdict
    direction: Literal["higher", "lower"] | None  # where the optimum moves with size, for 'drifts'
    reasons: list[str] = field(default_factory=list)
    tolerance: float = DRIFT_TOLERANCE_OCTAVES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size_key(shape: Shape) -> tuple[int, int]:
    """Order sizes by width^2 x depth, proportional to the parameter count of the blocks."""
    return shape.width * shape.width * shape.depth, shape.width


def _loss_table(records: Sequence[TrialRecord]) -> tuple[list[float], list[int], np.ndarray]:
    """(grid, seeds, losses[lr, seed]) with +inf for diverged runs and NaN where a trial is missing."""
    grid = sorted({r.log2_lr for r in records})
    seeds = sorted({r.seed for r in records})
    table = np.full((len(grid), len(seeds)), np.nan)
    lr_index, seed_index = {x: i for i, x in enumerate(grid)}, {s: j for j, s in enumerate(seeds)}
    for r in records:
        table[lr_index[r.log2_lr], seed_index[r.seed]] = math.inf if r.loss is None else r.loss
    return grid, seeds, table


def _seed_mean(table: np.ndarray) -> np.ndarray:
    """Mean over the seeds present; inf if any of them diverged, NaN if none is present."""
    present = ~np.isnan(table)
    counts = present.sum(axis=1)
    sums = np.where(present, table, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def parabola_optimum(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, bool]:
    """(x at the minimum, at_edge): vertex of the parabola through the grid minimum and its neighbours.

    Points with NaN (missing) are ignored; inf (diverged) counts as worst. At a grid edge, or next to a
    diverged neighbour, the grid point itself is returned. The vertex is clamped to the neighbours' span.
    """
    pts = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
    if not pts or all(math.isinf(y) for _, y in pts):
        return None, False
    i = min(range(len(pts)), key=lambda k: pts[k][1])
    if i == 0 or i == len(pts) - 1:
        return pts[i][0], True
    (x0, y0), (x1, y1), (x2, y2) = pts[i - 1], pts[i], pts[i + 1]
    if math.isinf(y0) or math.isinf(y2):
        return x1, False
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return x1, False
    return min(max(-b / (2 * a), x0), x2), False


def _bootstrap(grid: list[float], table: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    optima = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        columns = rng.integers(0, table.shape[1], table.shape[1])
        x, _ = parabola_optimum(grid, list(_seed_mean(table[:, columns])))
        if x is not None:
            optima.append(x)
    if not optima:
        return None
    low, high = np.percentile(optima, [2.5, 97.5])
    return float(low), float(high)


def _analyse_size(size: str, records: list[TrialRecord], rng: np.random.Generator) -> SizeResult:
    grid, _, table = _loss_table(records)
    mean = _seed_mean(table)
    optimum, at_edge = parabola_optimum(grid, list(mean))
    finite = [float(y) for y in mean if math.isfinite(y)]
    return SizeResult(
        size=size, shape=records[0].shape.to_dict(), log2_lrs=grid,
        mean_loss=[float(y) if math.isfinite(y) else None for y in mean],
        diverged=[int(n) for n in np.isinf(table).sum(axis=1)],
        optimum_log2_lr=optimum, interval=_bootstrap(grid, table, rng), at_edge=at_edge,
        best_loss=min(finite) if finite else None,
    )


def analyse(records: Iterable[TrialRecord | dict[str, Any]], tolerance: float = DRIFT_TOLERANCE_OCTAVES,
            seed: int = 0) -> TransferCheckResult:
    """Optimum per size, its drift vs the smallest size, monotonicity of the best loss, and a verdict."""
    parsed = [r if isinstance(r, TrialRecord) else TrialRecord.from_dict(r) for r in records]
    by_size: dict[str, list[TrialRecord]] = {}
    for r in parsed:
        by_size.setdefault(r.size, []).append(r)
    if len(by_size) < 2:
        raise ValueError(f"a transfer check needs at least two sizes, got {sorted(by_size)}")
    rng = np.random.default_rng(seed)
    ordered = sorted(by_size, key=lambda s: _size_key(by_size[s][0].shape))
    sizes = [_analyse_size(s, by_size[s], rng) for s in ordered]

    reasons = []
    failed = [s.size for s in sizes if s.optimum_log2_lr is None]
    if failed:
        reasons.append(f"every run diverged at size(s) {failed}: lower the LR grid")
    edges = [s.size for s in sizes if s.at_edge]
    if edges:
        reasons.append(f"the optimum lies at the grid edge for {edges}: widen the grid; drift there is a bound")
    reference = sizes[0].optimum_log2_lr
    for s in sizes:
        if reference is not None and s.optimum_log2_lr is not None:
            s.drift = s.optimum_log2_lr - reference
    best = [s.best_loss for s in sizes]
    monotone = all(a is not None and b is not None and b <= a for a, b in zip(best, best[1:]))
    if not monotone:
        reasons.append("the loss at the optimum does not improve with every size step")
    drifts = [s.drift for s in sizes if s.drift is not None]
    max_drift = max(drifts, key=abs) if len(drifts) > 1 else None
    direction: Literal["higher", "lower"] | None = None
    if max_drift is None:
        verdict: Verdict = "inconclusive"
    elif abs(max_drift) > tolerance:
        verdict, direction = "drifts", "higher" if max_drift > 0 else "lower"
        reasons.append(f"the optimum moves {abs(max_drift):.2f} octaves to {direction} LR (tolerance {tolerance})")
    else:
        verdict = "holds" if monotone else "not_monotone"
    return TransferCheckResult(sizes=sizes, monotone=monotone, max_drift=max_drift, verdict=verdict,
                               direction=direction, reasons=reasons, tolerance=tolerance)


def draw(result: TransferCheckResult, ax: Any, title: str | None = None) -> None:
    """Loss vs log2 LR on ``ax``, one curve per size; diverged points are drawn as crosses along the top edge."""
    from matplotlib import colormaps

    finite = [y for s in result.sizes for y in s.mean_loss if y is not None]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 0.0
    pad = 0.08 * max(top - bottom, 1e-6)
    ceiling = top + pad
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(result.sizes)))
    for s, color in zip(result.sizes, colors):
        xs = [x for x, y in zip(s.log2_lrs, s.mean_loss) if y is not None]
        ys = [y for y in s.mean_loss if y is not None]
        ax.plot(xs, ys, "o-", color=color, ms=3, label=s.size)
        bad = [x for x, n in zip(s.log2_lrs, s.diverged) if n > 0]
        ax.plot(bad, [ceiling] * len(bad), "x", color=color, ms=7, mew=2)
        if s.optimum_log2_lr is not None:
            ax.axvline(s.optimum_log2_lr, color=color, ls=":", lw=1)
    ax.set_ylim(bottom - pad, ceiling + pad)
    ax.set_xlabel("log2 learning rate (x = diverged)")
    ax.set_ylabel("final eval loss (mean over seeds)")
    ax.set_title(title or f"transfer check: {result.verdict}", fontsize=10)
    ax.legend(fontsize=7)


def plot(result: TransferCheckResult, path: str | Path, title: str | None = None) -> Path:
    """Write the loss-vs-LR figure of one transfer check as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    draw(result, ax, title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
