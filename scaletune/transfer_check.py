"""Transfer check: does the optimal value of a hyperparameter (the LR, or another tuned value) stay put as the
model grows?

Pure analysis over raw trial results (one record per size x value x seed). Per size, the optimum log2 value
is the vertex of the parabola through the grid minimum of the seed-mean loss and its two neighbours;
its uncertainty is a bootstrap over seeds. Drift is measured in octaves against the smallest size, and
its interval comes from the same bootstrap (each size resampled on its own). With few seeds the bootstrap is
exact: every distinct resample with its probability, so an interval, and the verdict, do not depend on a
random stream or on which other sizes the check holds.

The verdict claims no more than the data shows: ``holds`` needs every drift's 95% interval inside the
tolerance, ``drifts`` needs one wholly outside it; an optimum at the grid edge (only a bound), too few
seeds for a bootstrap, or an interval across the tolerance make it ``inconclusive``, with the reason and,
where seeds would settle it, how many.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from scaletune.shapes import Shape

DRIFT_TOLERANCE_OCTAVES = 0.5
BOOTSTRAP_RESAMPLES = 200  # Monte Carlo resamples per size, past EXACT_BOOTSTRAP_MAX distinct ones
EXACT_BOOTSTRAP_MAX = 1000  # up to 6 seeds (462 distinct resamples) the bootstrap is enumerated exactly
MIN_SEEDS = 3  # 2 seeds give 3 distinct resamples (each single-seed one with chance 1/4): no 95% interval
MAX_SEEDS_ADVISED = 32  # past this the tolerance, not the noise, is the problem
Verdict = Literal["holds", "drifts", "not_monotone", "inconclusive"]
CheckedHParam = Literal["lr", "output_mult", "init_std", "weight_decay", "warmup_frac", "attn_mult"]
CHECKED_HPARAMS: tuple[str, ...] = get_args(CheckedHParam)
BELOW_ONE = frozenset({"warmup_frac"})  # a fraction of the run


def log2_grid(octaves: float = 3.0, step: float = 0.5) -> list[float]:
    """log2 multipliers from -octaves to +octaves in ``step`` (13 points by default)."""
    if octaves < 0 or step <= 0:
        raise ValueError(f"need octaves >= 0 and step > 0, got {octaves}, {step}")
    n = round(octaves / step)
    return [k * step for k in range(-n, n + 1)]


def check_grid(hparam: str, tuned: float, log2_multipliers: Iterable[float]) -> list[float]:
    """The values ``tuned * 2**k`` a check of ``hparam`` trains; ValueError a person can act on if any is invalid."""
    if hparam not in CHECKED_HPARAMS:
        raise ValueError(f"a transfer check varies one of {', '.join(CHECKED_HPARAMS)}; got {hparam!r}")
    if not tuned > 0:
        raise ValueError(f"a log2 grid around {hparam} = {tuned} is empty: give a positive tuned {hparam}")
    values = [tuned * 2.0 ** k for k in log2_multipliers]
    if hparam in BELOW_ONE and max(values) >= 1.0:
        raise ValueError(f"{hparam} must stay below 1, but the grid around {tuned} reaches {max(values):.3g}: "
                         "use fewer octaves or a smaller tuned value")
    return values


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial at log2 of the checked hyperparameter's value; ``loss`` is None when it diverged."""

    size: str
    shape: Shape
    log2_value: float
    seed: int
    loss: float | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        """Accepts ``log2_value`` or ``value``; ``loss`` as a float, None or 'diverged'."""
        if "log2_value" in d:
            log2_value = float(d["log2_value"])
        elif "value" in d:
            log2_value = math.log2(float(d["value"]))
        else:
            raise ValueError(f"a transfer-check record needs 'log2_value' or 'value': {d}")
        loss = d.get("loss")
        value = None if loss is None or loss == "diverged" else float(loss)
        shape = d["shape"] if isinstance(d["shape"], Shape) else Shape.from_dict(d["shape"])
        return cls(size=str(d["size"]), shape=shape, log2_value=log2_value, seed=int(d["seed"]),
                   loss=value if value is not None and math.isfinite(value) else None)


@dataclass
class SizeResult:
    size: str
    shape: dict[str, int]
    log2_values: list[float]
    mean_loss: list[float | None]  # seed mean per grid point; None where any seed diverged
    diverged: list[int]  # diverged seeds per grid point
    optimum_log2: float | None  # log2 of the optimal value; None when every grid point diverged
    interval: tuple[float, float] | None  # bootstrap 95% interval over seeds
    at_edge: bool  # the grid minimum is the first or last grid point: widen the grid
    best_loss: float | None  # lowest seed-mean loss on the grid
    seeds: int  # distinct seeds with results at this size
    drift: float | None = None  # octaves vs the smallest size
    drift_interval: tuple[float, float] | None = None  # bootstrap 95% interval of the drift


@dataclass
class TransferCheckResult:
    sizes: list[SizeResult]
    monotone: bool  # loss at the optimum improves (does not rise) with every size step
    max_drift: float | None
    verdict: Verdict
    direction: Literal["higher", "lower"] | None  # where the optimum moves with size, for 'drifts'
    hparam: str = "lr"  # the hyperparameter whose optimum is checked
    reasons: list[str] = field(default_factory=list)
    tolerance: float = DRIFT_TOLERANCE_OCTAVES
    max_drift_interval: tuple[float, float] | None = None  # the interval of the size with the largest drift
    seeds_needed: int | None = None  # set when more seeds per grid point would settle an inconclusive verdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size_key(shape: Shape) -> tuple[int, int]:
    """Order sizes by width^2 x depth, proportional to the parameter count of the blocks."""
    return shape.width * shape.width * shape.depth, shape.width


def _loss_table(records: Sequence[TrialRecord]) -> tuple[list[float], list[int], np.ndarray]:
    """(grid, seeds, losses[value, seed]) with +inf for diverged runs and NaN where a trial is missing."""
    grid = sorted({r.log2_value for r in records})
    seeds = sorted({r.seed for r in records})
    table = np.full((len(grid), len(seeds)), np.nan)
    value_index, seed_index = {x: i for i, x in enumerate(grid)}, {s: j for j, s in enumerate(seeds)}
    for r in records:
        table[value_index[r.log2_value], seed_index[r.seed]] = math.inf if r.loss is None else r.loss
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


def _resamples(n_seeds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resamples of the seed columns and the probability of each: all distinct ones exactly when they are few
    (a random draw of 200 put 3-seed percentiles on whichever atom it happened to hit), else a random draw."""
    if math.comb(2 * n_seeds - 1, n_seeds) <= EXACT_BOOTSTRAP_MAX:
        columns = np.array(list(itertools.combinations_with_replacement(range(n_seeds), n_seeds)))
        ways = [math.factorial(n_seeds) / math.prod(math.factorial(c) for c in np.bincount(row, minlength=n_seeds))
                for row in columns]
        return columns, np.array(ways) / n_seeds ** n_seeds
    columns = rng.integers(0, n_seeds, (BOOTSTRAP_RESAMPLES, n_seeds))
    return columns, np.full(BOOTSTRAP_RESAMPLES, 1.0 / BOOTSTRAP_RESAMPLES)


def _bootstrap_optima(grid: list[float], table: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The optimum of each resample over seeds (NaN where every point of the resample diverged), with its
    probability."""
    columns, weights = _resamples(table.shape[1], rng)
    optima = np.full(len(columns), np.nan)
    for k, chosen in enumerate(columns):
        x, _ = parabola_optimum(grid, list(_seed_mean(table[:, chosen])))
        if x is not None:
            optima[k] = x
    return optima, weights


def _interval(samples: np.ndarray, weights: np.ndarray) -> tuple[float, float] | None:
    """The weighted 2.5th and 97.5th percentiles of the finite samples."""
    finite = np.isfinite(samples)
    if not finite.any():
        return None
    order = np.argsort(samples[finite])
    values, cumulative = samples[finite][order], np.cumsum(weights[finite][order])
    cumulative /= cumulative[-1]
    last = len(values) - 1
    low, high = (values[min(int(np.searchsorted(cumulative, q - 1e-12)), last)] for q in (0.025, 0.975))
    return float(low), float(high)


def _analyse_size(size: str, records: list[TrialRecord], seed: int
                  ) -> tuple[SizeResult, tuple[np.ndarray, np.ndarray]]:
    grid, seeds, table = _loss_table(records)
    mean = _seed_mean(table)
    optimum, at_edge = parabola_optimum(grid, list(mean))
    finite = [float(y) for y in mean if math.isfinite(y)]
    rng = np.random.default_rng([seed, zlib.crc32(size.encode())])  # a size's own stream: others cannot shift it
    optima, weights = _bootstrap_optima(grid, table, rng)
    return SizeResult(
        size=size, shape=records[0].shape.to_dict(), log2_values=grid,
        mean_loss=[float(y) if math.isfinite(y) else None for y in mean],
        diverged=[int(n) for n in np.isinf(table).sum(axis=1)],
        optimum_log2=None if optimum is None else float(optimum), interval=_interval(optima, weights),
        at_edge=at_edge,
        best_loss=min(finite) if finite else None, seeds=len(seeds),
    ), (optima, weights)


def _seeds_for(drift: float, interval: tuple[float, float], seeds: int, tolerance: float) -> int:
    """Seeds that would shrink the interval (width ~ 1/sqrt(seeds)) to one side of the tolerance."""
    room = abs(tolerance - abs(drift))
    half = (interval[1] - interval[0]) / 2
    if room <= 0 or half <= 0:
        return MAX_SEEDS_ADVISED
    return min(MAX_SEEDS_ADVISED, max(seeds + 1, math.ceil(seeds * (half / room) ** 2)))


def analyse(records: Iterable[TrialRecord | dict[str, Any]], tolerance: float = DRIFT_TOLERANCE_OCTAVES,
            seed: int = 0, hparam: str = "lr") -> TransferCheckResult:
    """Optimum per size, its drift vs the smallest size with a bootstrap interval, monotonicity, and a verdict."""
    parsed = [r if isinstance(r, TrialRecord) else TrialRecord.from_dict(r) for r in records]
    by_size: dict[str, list[TrialRecord]] = {}
    for r in parsed:
        by_size.setdefault(r.size, []).append(r)
    if len(by_size) < 2:
        raise ValueError(f"a transfer check needs at least two sizes, got {sorted(by_size)}")
    ordered = sorted(by_size, key=lambda s: _size_key(by_size[s][0].shape))
    analysed = [_analyse_size(s, by_size[s], seed) for s in ordered]
    sizes = [size for size, _ in analysed]
    reference, (reference_optima, reference_weights) = sizes[0].optimum_log2, analysed[0][1]
    for s, (optima, weights) in analysed[1:]:
        if reference is not None and s.optimum_log2 is not None:
            s.drift = s.optimum_log2 - reference
            s.drift_interval = _interval((optima[:, None] - reference_optima[None, :]).ravel(),
                                         (weights[:, None] * reference_weights[None, :]).ravel())
    if reference is not None:
        sizes[0].drift = 0.0

    best = [s.best_loss for s in sizes]
    monotone = all(a is not None and b is not None and b <= a for a, b in zip(best, best[1:]))
    moved = [s for s in sizes[1:] if s.drift is not None]
    widest = max(moved, key=lambda s: abs(s.drift or 0.0)) if moved else None
    result = TransferCheckResult(
        sizes=sizes, monotone=monotone, max_drift=None if widest is None else widest.drift,
        verdict="inconclusive", direction=None, hparam=hparam, tolerance=tolerance,
        max_drift_interval=None if widest is None else widest.drift_interval)
    _judge(result)
    return result


def _judge(result: TransferCheckResult) -> None:
    """Set the verdict, direction, reasons and seeds needed; every blocker is reported, not just the first."""
    sizes, tolerance, reasons = result.sizes, result.tolerance, result.reasons
    failed = [s.size for s in sizes if s.optimum_log2 is None]
    if failed:
        reasons.append(f"every run diverged at size(s) {failed}: move the {result.hparam} grid lower")
    edges = [s.size for s in sizes if s.at_edge]
    if edges:
        reasons.append(f"the optimum lies at the grid edge for {edges}, so it is only a bound: widen the grid")
    if not result.monotone:
        reasons.append("the loss at the optimum does not improve with every size step")
    seeds = min(s.seeds for s in sizes)
    if seeds < MIN_SEEDS:
        result.seeds_needed = MIN_SEEDS
        reasons.append(f"only {seeds} seed(s) per grid point: the bootstrap interval needs at least {MIN_SEEDS}; "
                       f"run {MIN_SEEDS} or more seeds")
    if failed or edges or seeds < MIN_SEEDS:
        return
    intervals = [(s, s.drift_interval) for s in sizes[1:]]
    if any(interval is None for _, interval in intervals):
        reasons.append(f"a drift has no bootstrap interval (every resample diverged): move the {result.hparam} "
                       "grid lower")
        return
    outside = [(s, i) for s, i in intervals if i is not None and (i[0] > tolerance or i[1] < -tolerance)]
    if outside:
        moved, _ = max(outside, key=lambda pair: abs(pair[0].drift or 0.0))
        result.verdict = "drifts"
        result.direction = "higher" if (moved.drift or 0.0) > 0 else "lower"
        reasons.append(f"the optimum moves {abs(moved.drift or 0.0):.2f} octaves to {result.direction} "
                       f"{result.hparam} at "
                       f"{moved.size}, its 95% interval {_fmt(moved.drift_interval)} wholly beyond the tolerance "
                       f"{tolerance}")
        return
    straddling = [(s, i) for s, i in intervals if i is not None and (i[0] < -tolerance or i[1] > tolerance)]
    if straddling:
        needed = max(_seeds_for(s.drift or 0.0, i, s.seeds, tolerance) for s, i in straddling)
        result.seeds_needed = needed
        names = ", ".join(f"{s.size} {_fmt(i)}" for s, i in straddling)
        reasons.append(f"the drift's 95% interval crosses the tolerance +-{tolerance} ({names}): about {needed} "
                       "seeds per grid point would settle it")
        return
    result.verdict = "holds" if result.monotone else "not_monotone"


def _fmt(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def draw(result: TransferCheckResult, ax: Any, title: str | None = None) -> None:
    """Loss vs log2 of the checked value on ``ax``, one curve per size; diverged points are drawn as crosses along the top edge."""
    from matplotlib import colormaps

    finite = [y for s in result.sizes for y in s.mean_loss if y is not None]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 0.0
    pad = 0.08 * max(top - bottom, 1e-6)
    ceiling = top + pad
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(result.sizes)))
    for s, color in zip(result.sizes, colors):
        xs = [x for x, y in zip(s.log2_values, s.mean_loss) if y is not None]
        ys = [y for y in s.mean_loss if y is not None]
        ax.plot(xs, ys, "o-", color=color, ms=3, label=s.size)
        bad = [x for x, n in zip(s.log2_values, s.diverged) if n > 0]
        ax.plot(bad, [ceiling] * len(bad), "x", color=color, ms=7, mew=2)
        if s.optimum_log2 is not None:
            ax.axvline(s.optimum_log2, color=color, ls=":", lw=1)
    ax.set_ylim(bottom - pad, ceiling + pad)
    ax.set_xlabel(f"log2 {'learning rate' if result.hparam == 'lr' else result.hparam} (x = diverged)")
    ax.set_ylabel("final eval loss (mean over seeds)")
    ax.set_title(title or f"transfer check: {result.verdict}", fontsize=10)
    ax.legend(fontsize=7)


def plot(result: TransferCheckResult, path: str | Path, title: str | None = None) -> Path:
    """Write the loss-vs-value figure of one transfer check as a PNG."""
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
