"""Project a proxy schedule to a larger target model.

Tier A (>= 3 proxy sizes per shape): fit the Chinchilla law in (N, D) per shape,
E = E_s + A_s N^-alpha_s + B_s D^-beta_s with D = C / F_s(N) samples, read off the target's F1 curve
(E_inf = E_s + A_s N_t^-alpha_s, a = B_s F_s(N_t)^beta_s, b = beta_s) and plan at target scale.
Tier B (one proxy size): assume every shape's target curve is the proxy's with compute scaled by one
factor kappa_N, so transition losses carry over and FLOPs scale; labelled heuristic, and no switch
is planned below the lowest loss the proxies observed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar, nnls

from scaletune.scaling.fit import FitResult, Run, fit_log_huber, huber, resample_curves
from scaletune.scaling.laws import SaturatingPowerLaw, ScalingLaw
from scaletune.scaling.schedule import ScheduleConstraints, ScheduleReport, schedule_report

FlopsPerSample = Callable[[str, float], float] | Mapping[str, Mapping[float, float]]
MIN_SIZES = 3


@dataclass(frozen=True)
class ChinchillaLaw:
    """F3 for one shape: E = e + a N^-alpha + b D^-beta, D = training samples."""

    e: float
    a: float
    alpha: float
    b: float
    beta: float

    def loss(self, size: float, samples: np.ndarray) -> np.ndarray:
        return self.e + self.a * size ** (-self.alpha) + self.b * np.asarray(samples, dtype=float) ** (-self.beta)

    def at_size(self, size: float, flops_per_sample: float) -> SaturatingPowerLaw:
        """The loss-vs-compute curve of this shape at model size ``size``."""
        return SaturatingPowerLaw(e_inf=self.e + self.a * size ** (-self.alpha),
                                  a=self.b * flops_per_sample ** self.beta, b=self.beta, d=0.0)

    def to_dict(self) -> dict[str, float]:
        return {"e": self.e, "a": self.a, "alpha": self.alpha, "b": self.b, "beta": self.beta}


def fit_chinchilla(sizes: np.ndarray, samples: np.ndarray, losses: np.ndarray) -> ChinchillaLaw:
    """Log-space Huber fit of F3 over points from several model sizes (sizes and samples normalised)."""
    n_ref, d_ref = float(sizes.max()), float(samples.max())
    log_n, log_d = np.log(sizes / n_ref), np.log(samples / d_ref)

    def predict(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, log_a, alpha, log_b, beta = theta
        term_n = np.exp(log_a - alpha * log_n)
        term_d = np.exp(log_b - beta * log_d)
        jac = np.stack([np.ones_like(log_n), term_n, -term_n * log_n, term_d, -term_d * log_d], axis=1)
        return e + term_n + term_d, jac

    starts = []
    for frac in (0.0, 0.5, 0.9):
        e = frac * float(losses.min())
        for alpha in (0.2, 0.5, 1.0):
            for beta in (0.2, 0.5, 1.0):
                design = np.stack([np.exp(-alpha * log_n), np.exp(-beta * log_d)], axis=1)
                coef, _ = nnls(design, losses - e)
                log_a, log_b = np.log(np.maximum(coef, 1e-8))
                starts.append(np.array([e, log_a, alpha, log_b, beta]))
    bounds = [(0.0, float(losses.min()) * (1 - 1e-6)), (-30.0, 30.0), (1e-3, 2.0), (-30.0, 30.0), (1e-3, 2.0)]
    e, log_a, alpha, log_b, beta = (float(v) for v in fit_log_huber(predict, losses, starts, bounds))
    return ChinchillaLaw(e=e, a=math.exp(log_a) * n_ref ** alpha, alpha=alpha,
                         b=math.exp(log_b) * d_ref ** beta, beta=beta)


@dataclass(frozen=True)
class Projection:
    """A schedule for the target model and how it was obtained."""

    tier: str
    heuristic: bool
    target_laws: dict[str, ScalingLaw]
    report: ScheduleReport
    size_laws: dict[str, ChinchillaLaw] | None = None
    compute_factor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "heuristic": self.heuristic,
            "target_laws": {s: law.to_dict() for s, law in self.target_laws.items()},
            "report": self.report.to_dict(),
            "size_laws": None if self.size_laws is None else {s: v.to_dict() for s, v in self.size_laws.items()},
            "compute_factor": self.compute_factor,
        }


def _per_sample(flops_per_sample: FlopsPerSample, shape: str, size: float) -> float:
    if callable(flops_per_sample):
        return float(flops_per_sample(shape, size))
    table = flops_per_sample[shape]
    if size not in table:
        raise ValueError(f"no FLOPs-per-sample entry for shape {shape!r} at size {size}")
    return float(table[size])


def _size_points(curves: Mapping[float, Sequence[tuple[np.ndarray, np.ndarray]]], per_sample: Mapping[float, float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes, samples, losses = [], [], []
    for size, size_curves in curves.items():
        for flops, loss in size_curves:
            sizes.append(np.full(flops.size, size))
            samples.append(flops / per_sample[size])
            losses.append(loss)
    return np.concatenate(sizes), np.concatenate(samples), np.concatenate(losses)


def project_tier_a(runs: Mapping[str, Mapping[float, Sequence[Run]]], flops_per_sample: FlopsPerSample,
                   target_size: float, start_loss: float, target_loss: float | None = None,
                   budget_flops: float | None = None, constraints: ScheduleConstraints | None = None,
                   n_bootstrap: int = 200, seed: int = 0, n_grid: int = 400) -> Projection:
    """Fit F3 per shape over >= 3 proxy sizes, derive the target's curves and plan at target scale.

    ``runs[shape][size]`` are the proxy runs; ``size`` is a parameter count or any size index that
    ``flops_per_sample(shape, size)`` understands (a callable or a table ``{shape: {size: flops}}``).
    Segments count as extrapolated past the most samples any proxy of that shape trained on.
    """
    rng = np.random.default_rng(seed)
    size_laws: dict[str, ChinchillaLaw] = {}
    central: dict[str, ScalingLaw] = {}
    replicates: list[dict[str, ScalingLaw]] = [{} for _ in range(n_bootstrap)]
    observed_max: dict[str, float] = {}
    for shape, by_size in runs.items():
        curves = {size: [c for c in (r.usable_points() for r in size_runs) if c[0].size]
                  for size, size_runs in by_size.items()}
        curves = {size: cs for size, cs in curves.items() if cs}
        if len(curves) < MIN_SIZES:
            raise ValueError(f"tier A needs runs at >= {MIN_SIZES} proxy sizes for shape {shape!r}, "
                             f"got {len(curves)}; use tier B (project_tier_b) for a single proxy size")
        per_sample = {size: _per_sample(flops_per_sample, shape, size) for size in curves}
        target_per_sample = _per_sample(flops_per_sample, shape, target_size)
        sizes, samples, losses = _size_points(curves, per_sample)
        size_laws[shape] = fit_chinchilla(sizes, samples, losses)
        central[shape] = size_laws[shape].at_size(target_size, target_per_sample)
        observed_max[shape] = float(samples.max()) * target_per_sample
        for replicate in replicates:
            resampled = {size: [resample_curves(cs, rng)] for size, cs in curves.items()}
            replicate[shape] = fit_chinchilla(*_size_points(resampled, per_sample)).at_size(
                target_size, target_per_sample)
    report = schedule_report(central, replicates, start_loss, target_loss, budget_flops, constraints,
                             observed_max, n_grid)
    return Projection(tier="A", heuristic=False, target_laws=central, report=report, size_laws=size_laws)


def estimate_compute_factor(proxy_law: ScalingLaw, target_runs: Sequence[Run]) -> float:
    """kappa_N such that target loss(C) ~ proxy loss(C / kappa_N), from a prefix of a target curve.

    Starts from the median of per-point ratios C / g_proxy(E) and refines by a log-Huber fit.
    """
    curves = [c for c in (r.usable_points() for r in target_runs) if c[0].size]
    if not curves:
        raise ValueError("no usable target points to estimate the compute factor from")
    flops = np.concatenate([c[0] for c in curves])
    losses = np.concatenate([c[1] for c in curves])
    g = proxy_law.flops_to_reach(losses)
    ok = np.isfinite(g) & (g > 0)
    if not ok.any():
        raise ValueError("the target's losses lie outside the proxy law's range")
    guess = float(np.median(np.log(flops[ok] / g[ok])))

    def objective(log_kappa: float) -> float:
        return huber(np.log(proxy_law.loss(flops / math.exp(log_kappa))) - np.log(losses))[0]

    res = minimize_scalar(objective, bounds=(guess - 5.0, guess + 5.0), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(float(res.x))


def project_tier_b(fits: Mapping[str, FitResult], compute_factor: float, start_loss: float,
                   target_loss: float | None = None, budget_flops: float | None = None,
                   constraints: ScheduleConstraints | None = None, n_grid: int = 400) -> Projection:
    """Heuristic projection from one proxy size: every curve needs ``compute_factor`` x the compute.

    Switch overheads and minimum segment lengths are taken as proxy FLOPs and scaled the same way.
    """
    kappa = compute_factor
    cons = (constraints or ScheduleConstraints()).scaled(kappa)
    lowest_seen = min(f.loss_range[0] for f in fits.values())
    cons = replace(cons, no_switch_below=max(lowest_seen, cons.no_switch_below or lowest_seen))
    central = {s: f.law.with_compute_factor(kappa) for s, f in fits.items()}
    n_rep = min(len(f.bootstrap) for f in fits.values())
    replicates = [{s: f.bootstrap[i].with_compute_factor(kappa) for s, f in fits.items()} for i in range(n_rep)]
    observed_max = {s: f.flops_range[1] * kappa for s, f in fits.items()}
    report = schedule_report(central, replicates, start_loss, target_loss, budget_flops, cons, observed_max, n_grid)
    return Projection(tier="B", heuristic=True, target_laws=central, report=report, compute_factor=kappa)
