"""Transfer: hyperparameters tuned on a proxy, projected to concrete settings for every group of the target.

The parametrization transfers width (muP family) and depth (depth_mup, completep). Batch size, training
duration and sequence length are not transferred by any of them: the plan keeps the tuned values and
warns when the target differs, unless the caller opts into a labelled heuristic batch-size rule.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Any, Literal, get_type_hints

from torch import nn

from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory
from scaletune.parametrize import (
    Classification, Factory, ParamOptions, Plan, apply_plan, classify, depth_alpha, make_plan,
)
from scaletune.shapes import Shape

BatchRule = Literal["sqrt", "linear"]
BATCH_RULE_EXPONENT: dict[str, float] = {"sqrt": 0.5, "linear": 1.0}
BATCH_RULE_SOURCE = ("'Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach' "
                     "(Granziol et al.): Adam LR ~ sqrt(batch), SGD LR ~ batch")
DEPTH_TRANSFERRING = frozenset({"depth_mup", "completep"})
MEASURED_DRIFTING_ALPHA = 0.5
WIDTH_TRANSFERRING = frozenset({"mup", "depth_mup", "completep"})


# Where the API's documented JSON spells the core plan's names differently (plan field -> JSON key).
_JSON_KEYS = {"modules": "module_multipliers"}
_GROUP_JSON_KEYS = {"cls": "class"}


def _renamed(d: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(k, k): v for k, v in d.items()}


@dataclass
class TransferPlan:
    """The parametrization core's :class:`Plan` for the target, with what a transfer adds around it.

    ``plan`` holds the target's settings (its group LRs already scaled by ``batch_scaling`` when a batch rule is
    used); :meth:`to_dict` writes the documented JSON, the plan's fields flat beside ``family``.
    """

    family: str
    plan: Plan
    batch_scaling: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON: the target's settings beside family, batch_scaling, warnings and provenance.

        ``groups`` are dicts ``{name, class, in_block, params, numel, lr, init, init_std, multiplier,
        weight_decay, eps}`` covering every parameter of the target exactly once; ``module_multipliers``
        are ``{name, role, value, attribute, hook, query}`` for input/output multipliers, attention scales and
        residual branches: the float ``attribute`` the value is set on and/or whether a forward ``hook`` applies
        it, and for foreign attention where its ``query`` weights are (:class:`scaletune.parametrize.ModulePlan`).
        """
        plan = _renamed(self.plan.to_dict(), _JSON_KEYS)
        plan["groups"] = [_renamed(g, _GROUP_JSON_KEYS) for g in plan["groups"]]
        return {"family": self.family, **plan, "batch_scaling": self.batch_scaling, "warnings": self.warnings,
                "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransferPlan:
        plan = _renamed(d, {json: name for name, json in _JSON_KEYS.items()})
        plan["groups"] = [_renamed(g, {json: name for name, json in _GROUP_JSON_KEYS.items()}) for g in d["groups"]]
        return cls(family=d["family"], plan=Plan.from_dict(plan), batch_scaling=d.get("batch_scaling"),
                   warnings=d.get("warnings", []), provenance=d.get("provenance", {}))

    @classmethod
    def json_types(cls) -> dict[str, Any]:
        """Each key of :meth:`to_dict` with its type, derived from the dataclasses, for the API's schema."""
        hints, plan_hints = get_type_hints(cls), get_type_hints(Plan)
        plan_types = {_JSON_KEYS.get(k, k): list[dict[str, Any]] if k in ("groups", "modules") else plan_hints[k]
                      for k in plan_hints}
        return {"family": hints["family"], **plan_types,
                **{k: hints[k] for k in ("batch_scaling", "warnings", "provenance")}}


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
                            "branches (no branch_mult, no branch_outputs): no parametrization transfers its depth")
        elif parametrization not in DEPTH_TRANSFERRING:
            warnings.append(f"depth changes {base.depth} -> {target.depth} under '{parametrization}', which has no "
                            "residual-branch scaling: the optimum is not expected to hold; use depth_mup or completep")
    if target.patch_size != base.patch_size:
        warnings.append(f"patch size changes {base.patch_size} -> {target.patch_size}: not transferred by the "
                        "parametrization")
    return warnings


def multilayer_depth_warning(classification: Classification, parametrization: str,
                             options: ParamOptions | None) -> str | None:
    """depth-muP's alpha = 1/2 on blocks of several layers: what our own measurement found, and what to use."""
    alpha = depth_alpha(parametrization, options or ParamOptions())
    layers = classification.block_layers
    if alpha != MEASURED_DRIFTING_ALPHA or layers < 2:
        return None
    return (f"'{parametrization}' scales residual branches by depth^-1/2, but this model's blocks have {layers} "
            "layers: with two-layer blocks the optimal LR drifted upward in every mlp and gpt measurement (+0.56 "
            "octave on mlp, +0.60 on gpt over depth 2 -> 16; docs/benchmarks.md, transfer landscape), where TP6 "
            "warns alpha = 1/2 has no clean limit, and 'completep' (alpha = 1) held there (-0.25, +0.22). On the "
            "resnet family (BatchNorm conv blocks, SGD) neither is settled: over depth 2 -> 16 alpha = 1/2 moved "
            "-0.32, -0.95 and +0.44 octave at 40, 80 and 160 steps, completep -0.77, -1.65 and -1.41, alpha = 1/2 "
            "less at every budget but in no stable direction, neither within the tolerance (docs/benchmarks.md, "
            "depthwise transfer on ResNets). Prefer "
            "'completep' for mlp- and transformer-like blocks, and check either with a transfer_check study")


def parametrization_warnings(family: str, data_spec: DataSpec, args: dict[str, Any], base: Shape,
                             parametrization: str, options: ParamOptions | None = None) -> list[str]:
    """What a study tuning at ``base`` should know before its values are transferred across depth."""
    model_family = get_family(family)
    deeper = base.with_(depth=2 * base.depth)
    classification = classify(family_factory(model_family, deeper, data_spec, args), base, deeper)
    warning = multilayer_depth_warning(classification, parametrization, options)
    return [] if warning is None else [warning]


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
    return _assemble(family, classification, parametrization, hparams, optimizer, options,
                     tuned_batch_size=tuned_batch_size, batch_size=batch_size, tuned_steps=tuned_steps, steps=steps,
                     tuned_seq_len=tuned_seq_len, seq_len=seq_len, batch_rule=batch_rule, provenance=provenance)


def factory_transfer_plan(factory: Factory, name: str, base: Shape, target: Shape, parametrization: str,
                          hparams: HParams, optimizer: str = "adamw", options: ParamOptions | None = None, *,
                          branch_outputs: Sequence[str] = (), attention: Sequence[str] = (),
                          example_input: Any = None, provenance: dict[str, Any] | None = None) -> TransferPlan:
    """Plan the user's own model code, ``factory(width, depth) -> nn.Module``, on the user's machine.

    ``name`` (e.g. the factory's import path) is recorded as the plan's family; the declarations are those
    of :func:`scaletune.parametrize.build_model`. :func:`apply_transfer` then initialises the model.
    """
    classification = classify(factory, base, target, branch_outputs=branch_outputs, attention=attention,
                              example_input=example_input)
    return _assemble(name, classification, parametrization, hparams, optimizer, options, provenance=provenance)


def _assemble(family: str, classification: Classification, parametrization: str, hparams: HParams,
              optimizer: str, options: ParamOptions | None, *, tuned_batch_size: int | None = None,
              batch_size: int | None = None, tuned_steps: int | None = None, steps: int | None = None,
              tuned_seq_len: int | None = None, seq_len: int | None = None, batch_rule: BatchRule | None = None,
              provenance: dict[str, Any] | None = None) -> TransferPlan:
    base, target = classification.base, classification.target
    plan = make_plan(classification, parametrization, hparams, optimizer, options)

    scaling = _batch_scaling(batch_rule, tuned_batch_size, batch_size)
    warnings = _shape_warnings(parametrization, base, target,
                               has_branches=any(m.role == "branch" for m in classification.modules))
    if target.depth != base.depth:
        warnings.append(multilayer_depth_warning(classification, parametrization, options))
    if scaling is not None and tuned_batch_size != batch_size:
        warnings.append(f"batch size changes {tuned_batch_size} -> {batch_size}: every group's LR is scaled by "
                        f"{scaling['lr_factor']:.4g} ('{batch_rule}' rule), a heuristic not guaranteed by the "
                        "parametrization")
    elif scaling is None:
        warnings.append(_untransferred_axis("batch size", tuned_batch_size, batch_size))
    warnings.append(_untransferred_axis("training duration (steps)", tuned_steps, steps))
    warnings.append(_untransferred_axis("sequence length", tuned_seq_len, seq_len))

    lr_factor = scaling["lr_factor"] if scaling is not None else 1.0
    plan.groups = [replace(g, lr=g.lr * lr_factor) for g in plan.groups]
    return TransferPlan(
        family=family, plan=plan, batch_scaling=scaling, warnings=[w for w in warnings if w is not None],
        provenance={**(provenance or {}), "scaletune_version": scaletune_version()},
    )


def apply_transfer(model: nn.Module, plan: TransferPlan | dict[str, Any]) -> list[dict[str, Any]]:
    """Initialise the user's target model per the plan, set its multipliers, return optimizer parameter groups."""
    transfer = plan if isinstance(plan, TransferPlan) else TransferPlan.from_dict(plan)
    return apply_plan(model, transfer.plan)
