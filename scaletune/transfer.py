"""Transfer: hyperparameters tuned on a proxy, projected to concrete settings for every group of the target.

The parametrization transfers width (muP family) and depth (depth_mup, completep). Batch size, training
duration and sequence length are not transferred by any of them: the plan keeps the tuned values and
warns when the target differs, unless the caller opts into a labelled heuristic batch-size rule.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.parametrize import (
    GroupPlan, ModulePlan, ParamOptions, Plan, apply_plan, classify, make_plan,
)
from scaletune.runner import family_factory
from scaletune.shapes import Shape

BatchRule = Literal["sqrt", "linear"]
BATCH_RULE_EXPONENT: dict[str, float] = {"sqrt": 0.5, "linear": 1.0}
BATCH_RULE_SOURCE = ("'Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach' "
                     "(Granziol et al.): Adam LR ~ sqrt(batch), SGD LR ~ batch")
DEPTH_TRANSFERRING = frozenset({"depth_mup", "completep"})
WIDTH_TRANSFERRING = frozenset({"mup", "depth_mup", "completep"})


@dataclass
class TransferPlan:
    """Concrete settings for the target model, JSON-serialisable with :meth:`to_dict`.

    ``groups`` are dicts ``{name, class, in_block, params, numel, lr, init, init_std, multiplier,
    weight_decay, eps}`` covering every parameter of the target exactly once; ``module_multipliers``
    are ``{name, role, value}`` for input/output multipliers, attention scales and residual branches.
    """

    family: str
    parametrization: str
    optimizer: str
    base: dict[str, int]
    target: dict[str, int]
    hparams: dict[str, float]
    branch_multiplier: float
    attention_scale: float | None
    zero_init_query: bool
    groups: list[dict[str, Any]]
    module_multipliers: list[dict[str, Any]]
    batch_scaling: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransferPlan:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_param_plan(self) -> Plan:
        """The parametrization core's :class:`Plan` with the same settings, for :func:`apply_plan`."""
        return Plan(
            parametrization=self.parametrization, optimizer=self.optimizer, base=self.base, target=self.target,
            hparams=self.hparams, branch_multiplier=self.branch_multiplier, attention_scale=self.attention_scale,
            zero_init_query=self.zero_init_query,
            groups=[GroupPlan(name=g["name"], cls=g["class"], in_block=g["in_block"], params=list(g["params"]),
                              numel=g["numel"], lr=g["lr"], init=g["init"], init_std=g["init_std"],
                              multiplier=g["multiplier"], weight_decay=g["weight_decay"], eps=g["eps"])
                    for g in self.groups],
            modules=[ModulePlan(m["name"], m["role"], m["value"]) for m in self.module_multipliers],
        )


def _group_dict(g: GroupPlan, lr_factor: float) -> dict[str, Any]:
    return {"name": g.name, "class": g.cls, "in_block": g.in_block, "params": g.params, "numel": g.numel,
            "lr": g.lr * lr_factor, "init": g.init, "init_std": g.init_std, "multiplier": g.multiplier,
            "weight_decay": g.weight_decay, "eps": g.eps}


def _untransferred_axis(axis: str, tuned: int | None, target: int | None) -> str | None:
    if tuned is None or target is None or tuned == target:
        return None
    return (f"{axis} differs (tuned at {tuned}, target {target}): no parametrization transfers it, the tuned "
            "values are kept and the optimum may shift; re-tune or verify with a transfer check")


def _shape_warnings(parametrization: str, base: Shape, target: Shape, has_branches: bool) -> list[str]:
    warnings = []
    if target.width != base.width and parametrization not in WIDTH_TRANSFERRING:
        warnings.append(f"width changes {base.width} -> {target.width} under '{parametrization}', which does not "
                        "transfer across width: the optimum is not expected to hold; use mup, depth_mup or completep")
    if target.depth != base.depth:
        if not has_branches:
            warnings.append(f"depth changes {base.depth} -> {target.depth} but the model has no scaled residual "
                            "branches (no module with branch_mult): no parametrization transfers its depth")
        elif parametrization not in DEPTH_TRANSFERRING:
            warnings.append(f"depth changes {base.depth} -> {target.depth} under '{parametrization}', which has no "
                            "residual-branch scaling: the optimum is not expected to hold; use depth_mup or completep")
    if target.patch_size != base.patch_size:
        warnings.append(f"patch size changes {base.patch_size} -> {target.patch_size}: not transferred by the "
                        "parametrization")
    return warnings


def _batch_scaling(rule: BatchRule | None, tuned: int | None, target: int | None) -> dict[str, Any] | None:
    if rule is None:
        return None
    if rule not in BATCH_RULE_EXPONENT:
        raise ValueError(f"unknown batch_rule {rule!r}; choose 'sqrt' (Adam), 'linear' (SGD) or None")
    if tuned is None or target is None:
        raise ValueError("batch_rule needs both tuned_batch_size and batch_size")
    factor = (target / tuned) ** BATCH_RULE_EXPONENT[rule]
    return {"rule": rule, "tuned_batch_size": tuned, "batch_size": target, "lr_factor": factor,
            "heuristic": True, "source": BATCH_RULE_SOURCE}


def scaletune_version() -> str:
    return importlib.metadata.version("scaletune")


def transfer_plan(family: str, data_spec: DataSpec, args: dict[str, Any], base: Shape, target: Shape,
                  parametrization: str, hparams: HParams, optimizer: str = "adamw",
                  options: ParamOptions | None = None, *, tuned_batch_size: int | None = None,
                  batch_size: int | None = None, tuned_steps: int | None = None, steps: int | None = None,
                  tuned_seq_len: int | None = None, seq_len: int | None = None,
                  batch_rule: BatchRule | None = None, provenance: dict[str, Any] | None = None) -> TransferPlan:
    """Plan the target from values tuned at ``base``; classification runs on the meta device (allocates nothing)."""
    model_family = get_family(family)
    model_family.validate(base, data_spec, args)
    model_family.validate(target, data_spec, args)
    classification = classify(family_factory(model_family, target, data_spec, args), base, target)
    plan = make_plan(classification, parametrization, hparams, optimizer, options)

    scaling = _batch_scaling(batch_rule, tuned_batch_size, batch_size)
    warnings = _shape_warnings(parametrization, base, target,
                               has_branches=any(m.role == "branch" for m in classification.modules))
    if scaling is not None and tuned_batch_size != batch_size:
        warnings.append(f"batch size changes {tuned_batch_size} -> {batch_size}: every group's LR is scaled by "
                        f"{scaling['lr_factor']:.4g} ('{batch_rule}' rule), a heuristic not guaranteed by the "
                        "parametrization")
    elif scaling is None:
        warnings.append(_untransferred_axis("batch size", tuned_batch_size, batch_size))
    warnings.append(_untransferred_axis("training duration (steps)", tuned_steps, steps))
    warnings.append(_untransferred_axis("sequence length", tuned_seq_len, seq_len))

    lr_factor = scaling["lr_factor"] if scaling is not None else 1.0
    return TransferPlan(
        family=family, parametrization=plan.parametrization, optimizer=plan.optimizer,
        base=plan.base, target=plan.target, hparams=plan.hparams,
        branch_multiplier=plan.branch_multiplier, attention_scale=plan.attention_scale,
        zero_init_query=plan.zero_init_query,
        groups=[_group_dict(g, lr_factor) for g in plan.groups],
        module_multipliers=[asdict(m) for m in plan.modules],
        batch_scaling=scaling,
        warnings=[w for w in warnings if w is not None],
        provenance={**(provenance or {}), "scaletune_version": scaletune_version()},
    )


def apply_transfer(model: nn.Module, plan: TransferPlan | dict[str, Any]) -> list[dict[str, Any]]:
    """Initialise the user's target model per the plan, set its multipliers, return optimizer parameter groups."""
    transfer = plan if isinstance(plan, TransferPlan) else TransferPlan.from_dict(plan)
    return apply_plan(model, transfer.to_param_plan())
