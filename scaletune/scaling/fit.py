"""Fit loss-vs-compute laws to learning curves: robust log-space fits, model selection, bootstrap.

Fits minimise the *summed* Huber loss (delta 1e-3) of log(predicted) - log(observed) with multi-start
L-BFGS-B and analytic gradients (Hoffmann et al. 2022, with the Besiroglu et al. 2024 fixes).
Forms are chosen by extrapolation error on the largest ~30% of the log-compute range
(Alabdulmohsin et al. 2022), then refitted on all points; uncertainty is a bootstrap over runs
(seeds) and blocks of neighbouring points along each curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from scaletune.scaling.laws import M4Law, SaturatingPowerLaw, ScalingLaw, law_from_dict, m4_fraction

HUBER_DELTA = 1e-3
WARMUP_MULTIPLE = 5.0
FORMS = ("F1", "M4")

PredictWithJacobian = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Run:
    """One training run of one shape: (flops, eval_loss) points, its seed and warm-up FLOPs."""

    seed: int | str
    points: tuple[tuple[float, float], ...]
    warmup_flops: float = 0.0

    def usable_points(self) -> tuple[np.ndarray, np.ndarray]:
        """Finite points past 5x the warm-up FLOPs, sorted by compute (warm-up distorts the curve)."""
        arr = np.asarray(self.points, dtype=float).reshape(-1, 2)
        keep = np.isfinite(arr).all(axis=1) & (arr[:, 0] > 0) & (arr[:, 1] > 0)
        keep &= arr[:, 0] >= WARMUP_MULTIPLE * self.warmup_flops
        arr = arr[keep]
        order = np.argsort(arr[:, 0])
        return arr[order, 0], arr[order, 1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Run:
        return cls(seed=d["seed"], points=tuple((float(c), float(e)) for c, e in d["points"]),
                   warmup_flops=float(d.get("warmup_flops", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "points": [list(p) for p in self.points], "warmup_flops": self.warmup_flops}


@dataclass(frozen=True)
class Interval:
    """Median and central interval (90% by default) of bootstrap replicates; non-finite ones are left out."""

    median: float
    lo: float
    hi: float

    @classmethod
    def from_samples(cls, values: Iterable[float], level: float = 0.9) -> Interval:
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
        if v.size == 0:
            return cls(math.nan, math.nan, math.nan)
        tail = 50.0 * (1.0 - level)
        lo, med, hi = np.percentile(v, [tail, 50.0, 100.0 - tail])
        return cls(float(med), float(lo), float(hi))

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "lo": self.lo, "hi": self.hi}


def huber(residual: np.ndarray, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Summed Huber loss and its derivative with respect to each residual."""
    a = np.abs(residual)
    value = np.where(a <= delta, 0.5 * residual**2, delta * (a - 0.5 * delta)).sum()
    return float(value), np.clip(residual, -delta, delta)


def fit_log_huber(predict: PredictWithJacobian, losses: np.ndarray, starts: Sequence[np.ndarray],
                  bounds: Sequence[tuple[float, float]], delta: float = HUBER_DELTA,
                  n_local: int = 4) -> np.ndarray:
    """Minimise sum Huber(log predict(theta) - log losses): screen a grid of starts, then run
    L-BFGS-B from the ``n_local`` best of them; returns the best theta."""
    log_y = np.log(losses)
    lower = np.array([b[0] for b in bounds])
    upper = np.array([b[1] for b in bounds])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, jac = predict(theta)
        if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
            return 1e30, np.zeros_like(theta)
        value, dres = huber(np.log(pred) - log_y, delta)
        return value, (dres / pred) @ jac

    candidates = [np.clip(np.asarray(s, dtype=float), lower, upper) for s in starts]
    candidates.sort(key=lambda theta: objective(theta)[0])
    best_theta, best_value = candidates[0], math.inf
    # Multi-threaded BLAS inside L-BFGS-B makes these tiny problems ~50x slower on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        for x0 in candidates[:n_local]:
            # Huber values are ~delta^2 per point, so tolerances must be far tighter than scipy's defaults.
            res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
            if res.fun < best_value:
                best_theta, best_value = res.x, float(res.fun)
    return best_theta


@dataclass(frozen=True)
class _F1Fit:
    """F1 in normalised compute x = C / c_ref: theta = (e_inf, log a, b, d / c_ref)."""

    def n_params(self) -> int:
        return 4

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, y

    def bounds(self, y: np.ndarray) -> list[tuple[float, float]]:
        return [(0.0, float(y.min()) * (1 - 1e-6)), (-30.0, 30.0), (1e-3, 2.0), (0.0, 1.0)]

    def starts(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        out = []
        for frac in (0.0, 0.5, 0.9):
            e_inf = frac * float(y.min())
            for b in (0.1, 0.3, 0.7, 1.5):
                for d in (0.0, 0.01):
                    log_a = float(np.median(np.log(y - e_inf) + b * np.log(x + d)))
                    out.append(np.array([e_inf, log_a, b, d]))
        return out

    def predictor(self, x: np.ndarray) -> PredictWithJacobian:
        def predict(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            e_inf, log_a, b, d = theta
            base = x + d
            power = np.exp(log_a - b * np.log(base))
            jac = np.stack([np.ones_like(x), power, -power * np.log(base), -b * power / base], axis=1)
            return e_inf + power, jac
        return predict

    def to_law(self, theta: np.ndarray, c_ref: float) -> ScalingLaw:
        e_inf, log_a, b, d = (float(v) for v in theta)
        return SaturatingPowerLaw(e_inf=e_inf, a=math.exp(log_a + b * math.log(c_ref)), b=b, d=d * c_ref)


@dataclass(frozen=True)
class _M4Fit:
    """M4 in normalised compute x = C / c_ref: theta = (e_inf, log beta, c, alpha); e0 is given."""

    e0: float

    def n_params(self) -> int:
        return 4

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """M4 is undefined at or above the initial loss e0, so those points cannot be used."""
        keep = y < self.e0
        return x[keep], y[keep]

    def bounds(self, y: np.ndarray) -> list[tuple[float, float]]:
        return [(0.0, float(y.min()) * (1 - 1e-6)), (-30.0, 30.0), (1e-3, 2.0), (0.0, 2.0)]

    def starts(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        out = []
        for frac in (0.0, 0.5, 0.9):
            e_inf = frac * float(y.min())
            for c in (0.1, 0.3, 0.7):
                for alpha in (0.0, 0.5, 1.0):
                    log_beta = float(np.median(np.log(y - e_inf) - alpha * np.log(self.e0 - y) + c * np.log(x)))
                    out.append(np.array([e_inf, log_beta, c, alpha]))
        return out

    def predictor(self, x: np.ndarray) -> PredictWithJacobian:
        log_x = np.log(x)

        def predict(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            e_inf, log_beta, c, alpha = theta
            span = self.e0 - e_inf
            w = span * m4_fraction(log_beta - c * log_x, alpha, span)
            rest = np.maximum(span - w, 1e-300)
            # Implicit differentiation of h(w) = log w - alpha log(span - w) = log beta - c log x.
            h_w = 1.0 / w + alpha / rest
            jac = np.stack([(1.0 / w) / h_w, 1.0 / h_w, -log_x / h_w, np.log(rest) / h_w], axis=1)
            return e_inf + w, jac
        return predict

    def to_law(self, theta: np.ndarray, c_ref: float) -> ScalingLaw:
        e_inf, log_beta, c, alpha = (float(v) for v in theta)
        return M4Law(e_inf=e_inf, e0=self.e0, alpha=alpha, beta=math.exp(log_beta + c * math.log(c_ref)), c=c)


def _form_fitter(form: str, e0: float | None) -> _F1Fit | _M4Fit:
    if form == "F1":
        return _F1Fit()
    if form == "M4":
        if e0 is None:
            raise ValueError("form M4 needs e0, the loss at initialisation (e.g. ln(#classes))")
        return _M4Fit(e0=e0)
    raise ValueError(f"unknown scaling-law form {form!r}; known: {list(FORMS)}")


def fit_law(form: str, flops: np.ndarray, losses: np.ndarray, e0: float | None = None,
            delta: float = HUBER_DELTA) -> ScalingLaw:
    """Fit one form to (flops, loss) points (already past warm-up)."""
    fitter = _form_fitter(form, e0)
    x_all, y = fitter.prepare(np.asarray(flops, dtype=float), np.asarray(losses, dtype=float))
    if x_all.size < fitter.n_params() + 1:
        raise ValueError(f"form {form} needs at least {fitter.n_params() + 1} usable points, got {x_all.size}")
    c_ref = float(x_all.max())
    x = x_all / c_ref
    theta = fit_log_huber(fitter.predictor(x), y, fitter.starts(x, y), fitter.bounds(y), delta)
    return fitter.to_law(theta, c_ref)


def log_rmse(law: ScalingLaw, flops: np.ndarray, losses: np.ndarray) -> float:
    """Root-mean-square error in log loss: the scale on which forms are compared."""
    return float(np.sqrt(np.mean((np.log(law.loss(flops)) - np.log(losses)) ** 2)))


def holdout_split(flops: np.ndarray, holdout_frac: float) -> np.ndarray:
    """Mask of points in the largest ``holdout_frac`` of the log-compute range."""
    log_c = np.log(flops)
    cut = log_c.max() - holdout_frac * (log_c.max() - log_c.min())
    return log_c > cut


def select_form(flops: np.ndarray, losses: np.ndarray, forms: Sequence[str], e0: float | None,
                holdout_frac: float = 0.3) -> tuple[str, dict[str, float]]:
    """Fit each form on the smaller compute range; pick the lowest held-out log RMSE."""
    held = holdout_split(flops, holdout_frac)
    errors: dict[str, float] = {}
    for form in forms:
        try:
            law = fit_law(form, flops[~held], losses[~held], e0)
        except ValueError:
            continue  # too few points for this form below the held-out range
        errors[form] = log_rmse(law, flops[held], losses[held])
    if not errors:
        raise ValueError("not enough points below the held-out range to fit any form")
    return min(errors, key=lambda f: errors[f]), errors


def resample_curves(curves: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                    block_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap replicate: runs drawn with replacement, then moving blocks along each run."""
    xs, ys = [], []
    for i in rng.integers(len(curves), size=len(curves)):
        x, y = curves[i]
        n = x.size
        length = min(n, block_len or max(1, round(n ** (1 / 3))))
        starts = rng.integers(0, n - length + 1, size=math.ceil(n / length))
        idx = (starts[:, None] + np.arange(length)).ravel()[:n]
        xs.append(x[idx])
        ys.append(y[idx])
    return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class FitResult:
    """The chosen law for one shape, how well it extrapolated, the data range and bootstrap refits."""

    law: ScalingLaw
    extrapolation_error: float
    candidate_errors: dict[str, float]
    flops_range: tuple[float, float]
    loss_range: tuple[float, float]
    n_points: int
    n_runs: int
    bootstrap: tuple[ScalingLaw, ...]

    @property
    def form(self) -> str:
        return self.law.form

    def interval_of(self, quantity: Callable[[ScalingLaw], float], level: float = 0.9) -> Interval:
        """Median and interval over bootstrap replicates of any quantity derived from the law."""
        return Interval.from_samples((quantity(law) for law in self.bootstrap), level)

    def param_intervals(self, level: float = 0.9) -> dict[str, Interval]:
        return {name: self.interval_of(lambda law, n=name: law.params()[n], level) for name in self.law.params()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "law": self.law.to_dict(),
            "extrapolation_error": self.extrapolation_error,
            "candidate_errors": dict(self.candidate_errors),
            "flops_range": list(self.flops_range),
            "loss_range": list(self.loss_range),
            "n_points": self.n_points,
            "n_runs": self.n_runs,
            "param_intervals": {k: v.to_dict() for k, v in self.param_intervals().items()},
            "bootstrap": [law.to_dict() for law in self.bootstrap],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitResult:
        return cls(
            law=law_from_dict(d["law"]),
            extrapolation_error=float(d["extrapolation_error"]),
            candidate_errors={k: float(v) for k, v in d["candidate_errors"].items()},
            flops_range=(float(d["flops_range"][0]), float(d["flops_range"][1])),
            loss_range=(float(d["loss_range"][0]), float(d["loss_range"][1])),
            n_points=int(d["n_points"]),
            n_runs=int(d["n_runs"]),
            bootstrap=tuple(law_from_dict(b) for b in d["bootstrap"]),
        )


def fit_shape(runs: Sequence[Run], e0: float | None = None, forms: Sequence[str] | None = None,
              holdout_frac: float = 0.3, n_bootstrap: int = 200, block_len: int | None = None,
              seed: int = 0) -> FitResult:
    """Select a form by extrapolation error, refit it on all points and bootstrap it.

    ``e0`` is the loss at initialisation; without it only F1 is a candidate.
    """
    curves = [c for c in (run.usable_points() for run in runs) if c[0].size]
    if not curves:
        raise ValueError("no usable points: every point is inside the warm-up region or non-finite")
    flops = np.concatenate([c[0] for c in curves])
    losses = np.concatenate([c[1] for c in curves])
    candidates = [f for f in (forms or FORMS) if f != "M4" or e0 is not None]
    form, errors = select_form(flops, losses, candidates, e0, holdout_frac)
    rng = np.random.default_rng(seed)
    replicates = tuple(fit_law(form, *resample_curves(curves, rng, block_len), e0) for _ in range(n_bootstrap))
    return FitResult(
        law=fit_law(form, flops, losses, e0),
        extrapolation_error=errors[form],
        candidate_errors=errors,
        flops_range=(float(flops.min()), float(flops.max())),
        loss_range=(float(losses.min()), float(losses.max())),
        n_points=int(flops.size),
        n_runs=len(curves),
        bootstrap=replicates,
    )


def fit_shapes(runs_by_shape: Mapping[str, Sequence[Run]], e0: float | None = None,
               forms: Sequence[str] | None = None, n_bootstrap: int = 200, seed: int = 0) -> dict[str, FitResult]:
    """``fit_shape`` for every shape, with independent bootstrap streams."""
    return {name: fit_shape(runs, e0=e0, forms=forms, n_bootstrap=n_bootstrap, seed=seed + i)
            for i, (name, runs) in enumerate(runs_by_shape.items())}
