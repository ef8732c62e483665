"""Loss-vs-compute laws with closed-form inverse g(E) (compute to reach loss E) and rate r(E) = -g'(E).

F1 is the saturating power law E = E_inf + A (C + d)^-b.
M4 is Alabdulmohsin et al. (2022): (E - E_inf) / (E0 - E)^alpha = beta C^-c, with E0 the loss at
initialisation; it is sigmoid-like in log C and a power law asymptotically.
Exponents are stored as positive magnitudes (b, c > 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike


class ScalingLaw(Protocol):
    """What schedules and projections need from a fitted law; all methods are vectorised."""

    form: str
    e_inf: float

    def loss(self, flops: ArrayLike) -> np.ndarray:
        """Predicted loss after ``flops`` training FLOPs."""
        ...

    def flops_to_reach(self, loss: ArrayLike) -> np.ndarray:
        """g(E): FLOPs to reach ``loss``; inf where the law never gets there (E <= E_inf)."""
        ...

    def rate(self, loss: ArrayLike) -> np.ndarray:
        """r(E) = -dg/dE: FLOPs per unit of loss decrease at loss level E."""
        ...

    def with_compute_factor(self, kappa: float) -> ScalingLaw:
        """The law f(C / kappa): the same curve needing ``kappa`` times the compute."""
        ...

    def params(self) -> dict[str, float]:
        ...

    def to_dict(self) -> dict[str, Any]:
        ...


@dataclass(frozen=True)
class SaturatingPowerLaw:
    """F1: E(C) = e_inf + a (C + d)^-b."""

    e_inf: float
    a: float
    b: float
    d: float = 0.0
    form: str = "F1"

    def loss(self, flops: ArrayLike) -> np.ndarray:
        c = np.asarray(flops, dtype=float)
        return self.e_inf + self.a * (c + self.d) ** (-self.b)

    def flops_to_reach(self, loss: ArrayLike) -> np.ndarray:
        gap = np.asarray(loss, dtype=float) - self.e_inf
        with np.errstate(divide="ignore", invalid="ignore"):
            g = (self.a / gap) ** (1.0 / self.b) - self.d
        # Losses above the curve's value at C = 0 are reached for free.
        return np.where(gap > 0, np.maximum(g, 0.0), np.inf)

    def rate(self, loss: ArrayLike) -> np.ndarray:
        gap = np.asarray(loss, dtype=float) - self.e_inf
        g = self.flops_to_reach(loss)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (g + self.d) / (self.b * gap)
        return np.where(gap > 0, np.where(g > 0, r, 0.0), np.inf)

    def with_compute_factor(self, kappa: float) -> SaturatingPowerLaw:
        return replace(self, a=self.a * kappa ** self.b, d=self.d * kappa)

    def params(self) -> dict[str, float]:
        return {"e_inf": self.e_inf, "a": self.a, "b": self.b, "d": self.d}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class M4Law:
    """M4: (E - e_inf) / (e0 - E)^alpha = beta C^-c, for e_inf < E < e0."""

    e_inf: float
    e0: float
    alpha: float
    beta: float
    c: float
    form: str = "M4"

    def loss(self, flops: ArrayLike) -> np.ndarray:
        c = np.asarray(flops, dtype=float)
        with np.errstate(divide="ignore"):
            log_rhs = np.log(self.beta) - self.c * np.log(c)
        return self.e_inf + (self.e0 - self.e_inf) * m4_fraction(log_rhs, self.alpha, self.e0 - self.e_inf)

    def flops_to_reach(self, loss: ArrayLike) -> np.ndarray:
        e = np.asarray(loss, dtype=float)
        inside = (e > self.e_inf) & (e < self.e0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_g = -(np.log(e - self.e_inf) - self.alpha * np.log(self.e0 - e) - np.log(self.beta)) / self.c
            g = np.exp(log_g)
        return np.where(inside, g, np.where(e >= self.e0, 0.0, np.inf))

    def rate(self, loss: ArrayLike) -> np.ndarray:
        e = np.asarray(loss, dtype=float)
        g = self.flops_to_reach(e)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = g / self.c * (1.0 / (e - self.e_inf) + self.alpha / (self.e0 - e))
        return np.where(e >= self.e0, 0.0, np.where(e > self.e_inf, r, np.inf))

    def with_compute_factor(self, kappa: float) -> M4Law:
        return replace(self, beta=self.beta * kappa ** self.c)

    def params(self) -> dict[str, float]:
        return {"e_inf": self.e_inf, "e0": self.e0, "alpha": self.alpha, "beta": self.beta, "c": self.c}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def m4_fraction(log_rhs: ArrayLike, alpha: float, span: float) -> np.ndarray:
    """Solve the M4 relation for t = (E - e_inf) / (e0 - e_inf) in (0, 1).

    With w = t * span the relation log w - alpha log(span - w) = log_rhs becomes
    phi(s) = log t - alpha log(1 - t) = z for t = sigmoid(s); phi is monotone with curvature of one
    sign, so Newton's method converges from any start.
    """
    z = np.asarray(log_rhs, dtype=float) - (1.0 - alpha) * np.log(span)
    s = np.where(z > 0, z / max(alpha, 1e-12) if alpha > 0 else z, z)
    s = np.clip(s, -700.0, 700.0)
    for _ in range(100):
        log_t = -np.logaddexp(0.0, -s)
        log_1mt = -np.logaddexp(0.0, s)
        step = (log_t - alpha * log_1mt - z) / (np.exp(log_1mt) + alpha * np.exp(log_t))
        s = np.clip(s - step, -700.0, 700.0)
        if np.all(np.abs(step) < 1e-12):
            break
    return 1.0 / (1.0 + np.exp(-s))


def law_from_dict(d: dict[str, Any]) -> ScalingLaw:
    """Rebuild a law from ``to_dict`` output (the ``form`` key picks the class)."""
    forms: dict[str, type] = {"F1": SaturatingPowerLaw, "M4": M4Law}
    if d.get("form") not in forms:
        raise ValueError(f"unknown scaling-law form {d.get('form')!r}; known: {sorted(forms)}")
    return forms[d["form"]](**d)
