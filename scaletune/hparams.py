"""Tuned hyperparameters, always expressed in base units (their values at the base shape)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

HPARAM_NAMES = (
    "lr", "init_std", "input_mult", "output_mult", "attn_mult", "weight_decay",
    "eps", "beta1", "beta2", "momentum", "warmup_frac", "residual_mult",
)


@dataclass(frozen=True)
class HParams:
    """Base-unit values; the parametrization turns them into per-group settings at any shape.

    ``init_std`` multiplies each parameter's base init std; the ``*_mult`` are forward multipliers;
    ``residual_mult`` is the residual-branch constant (beta_0 of Bordelon et al.), multiplying every branch on top
    of the parametrization's depth factor.
    """

    lr: float = 1e-3
    init_std: float = 1.0
    input_mult: float = 1.0
    output_mult: float = 1.0
    attn_mult: float = 1.0
    weight_decay: float = 0.0
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9
    warmup_frac: float = 0.0
    residual_mult: float = 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in values.items()})

    @classmethod
    def builtin_of(cls, values: dict[str, Any]) -> HParams:
        """The built-in hyperparameters among ``values``; the others (an external study's own) are the user's code's."""
        return cls.from_dict({k: v for k, v in values.items() if k in HPARAM_NAMES})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def with_(self, **changes: float) -> HParams:
        return replace(self, **changes)
