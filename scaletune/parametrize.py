"""Width- and depth-transferable parametrizations: SP, muP, depth-muP (alpha=1/2), CompleteP (alpha=1).

Every parameter is classified by comparing parameter shapes of the same model built at the base
shape, at twice the base width and at twice the base depth (on the meta device, so a target of
billions of parameters costs nothing). The rule tables of docs/parametrizations.md, with their
sources, then give each parameter's init std, learning rate, weight decay and Adam eps, and each
input/output/attention/residual module its forward multiplier. The result is a
serialisable :class:`Plan`; :func:`apply_plan` applies it to a real model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn

from scaletune.hparams import HParams
from scaletune.shapes import Shape

Parametrization = Literal["sp", "mup", "depth_mup", "completep"]
Optimizer = Literal["adamw", "sgd"]
PARAMETRIZATIONS: tuple[str, ...] = ("sp", "mup", "depth_mup", "completep")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
MUP_FAMILY = frozenset({"mup", "depth_mup", "completep"})
DEPTH_ALPHA: dict[str, float | None] = {"sp": None, "mup": None, "depth_mup": 0.5, "completep": 1.0}

Factory = Callable[[int, int], nn.Module]
# The attribute holding each forward multiplier: a plain float on a model, a per-member tensor inside a pack.
MULTIPLIER_ATTRS: dict[str, str] = {
    "input": "scaletune_mult", "output": "scaletune_mult", "attention": "attn_scale", "branch": "branch_mult"}

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INT_SEGMENT = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


class ParamClass(str, Enum):
    INPUT = "input"
    HIDDEN = "hidden"
    OUTPUT = "output"
    VECTOR = "vector"


@dataclass(frozen=True)
class ParamOptions:
    """Choices where the sources disagree (docs/parametrizations.md); None means the parametrization's default."""

    zero_init_readout: bool | None = None  # default: True for the muP family, False for SP
    zero_init_query: bool | None = None  # default: True for the muP family, False for SP
    weight_decay_rule: Literal["lr_wd_product", "unscaled"] = "lr_wd_product"  # keep lr*wd constant (mup, CP)
    eps_rule: Literal["per_group", "global", "none"] = "per_group"  # CP table / CP code / mup package
    alpha: float | None = None  # override the depth exponent of depth_mup / completep

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0 < self.alpha <= 2:
            raise ValueError(f"alpha (the depth exponent) must be in (0, 2], got {self.alpha}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ParamOptions:
        return cls(**(values or {}))


@dataclass(frozen=True)
class ParamInfo:
    """What the rules need to know about one parameter of the target model."""

    name: str
    cls: ParamClass
    in_block: bool
    shape: tuple[int, ...]
    m_in: float  # fan_in ratio target/base (1 if fan_in is not a width dim)
    m_out: float  # fan_out ratio target/base
    base_fan_in: int
    owner_kind: Literal["linear", "conv", "embedding", "norm", "other"]
    is_bias: bool
    tied_readout: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def m(self) -> float:
        """The width ratio of a vector (its one width dim), or of a matrix's fan_in."""
        return self.m_in if self.cls is not ParamClass.INPUT else self.m_out


@dataclass(frozen=True)
class ModuleInfo:
    """A module whose forward multiplier the parametrization sets."""

    name: str
    role: Literal["input", "output", "attention", "branch"]
    m_in: float = 1.0
    head_dim: int = 0
    base_head_dim: int = 0


@dataclass(frozen=True)
class Classification:
    base: Shape
    target: Shape
    params: tuple[ParamInfo, ...]
    modules: tuple[ModuleInfo, ...]

    @property
    def r(self) -> float:
        return self.target.depth / self.base.depth

    @property
    def m(self) -> float:
        return self.target.width / self.base.width


@dataclass
class GroupPlan:
    """One optimizer parameter group of the target model, with concrete settings."""

    name: str
    cls: str
    in_block: bool
    params: list[str]
    numel: int
    lr: float
    init: Literal["normal", "zeros", "ones", "keep"]
    init_std: float
    multiplier: float
    weight_decay: float
    eps: float


@dataclass
class ModulePlan:
    name: str
    role: Literal["input", "output", "attention", "branch"]
    value: float


@dataclass
class Plan:
    """Everything needed to initialise a model and build its optimizer: serialisable to JSON."""

    parametrization: str
    optimizer: str
    base: dict[str, int]
    target: dict[str, int]
    hparams: dict[str, float]
    branch_multiplier: float
    attention_scale: float | None
    zero_init_query: bool
    groups: list[GroupPlan]
    modules: list[ModulePlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        values["groups"] = [GroupPlan(**g) for g in d["groups"]]
        values["modules"] = [ModulePlan(**m) for m in d.get("modules", [])]
        return cls(**values)


@dataclass
class BuiltModel:
    model: nn.Module
    param_groups: list[dict[str, Any]]
    plan: Plan
    classification: Classification


# ---------------------------------------------------------------- classification


def _template(name: str) -> str:
    return _INT_SEGMENT.sub("*", name)


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    owner_name = param_name.rpartition(".")[0]
    return model.get_submodule(owner_name) if owner_name else model


def _owner_kind(module: nn.Module) -> Literal["linear", "conv", "embedding", "norm", "other"]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _NORMS):
        return "norm"
    return "other"


def _fan_dims(kind: str, ndim: int) -> tuple[list[int], int]:
    """(fan_in dims, fan_out dim) from the module type, never from the last dim."""
    if kind == "embedding":
        return [0], 1
    if kind == "conv":
        return list(range(1, ndim)), 0
    return [1], 0  # linear and raw matrices: (out, in, ...) as in microsoft/mup


def _counterpart(name: str, base_names: set[str], max_index: dict[tuple[str, int], int]) -> str:
    """The base-model parameter that plays the same role as a target parameter (deeper models add blocks)."""
    if name in base_names:
        return name
    parts = name.split(".")
    for i in reversed(range(len(parts))):
        if not parts[i].isdigit():
            continue
        prefix = ".".join(parts[:i])
        top = min(int(parts[i]), max_index.get((prefix, i), -1))
        for k in range(top, -1, -1):
            candidate = ".".join([*parts[:i], str(k), *parts[i + 1:]])
            if candidate in base_names:
                return candidate
    raise ValueError(f"parameter {name!r} of the target model has no counterpart in the base model; "
                     "parameter names must match between sizes except for block indices")


def _index_maxima(names: Iterable[str]) -> dict[tuple[str, int], int]:
    maxima: dict[tuple[str, int], int] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                key = (".".join(parts[:i]), i)
                maxima[key] = max(maxima.get(key, -1), int(part))
    return maxima


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


def _ratio(target: tuple[int, ...], base: tuple[int, ...], dims: Iterable[int]) -> float:
    return math.prod(target[d] / base[d] for d in dims)


def classify(factory: Factory, base: Shape, target: Shape) -> Classification:
    """Classify every parameter of ``factory(target.width, target.depth)`` with no annotations needed."""
    with torch.device("meta"):
        base_model = factory(base.width, base.depth)
        wide = _shapes(factory(2 * base.width, base.depth))
        deep = _shapes(factory(base.width, 2 * base.depth))
        target_model = base_model if (target.width, target.depth) == (base.width, base.depth) \
            else factory(target.width, target.depth)
    base_shapes = _shapes(base_model)
    if set(wide) != set(base_shapes):
        raise ValueError("the model's parameter names change with width; scaletune needs the same names at every width")
    infinite = {n: {d for d, (a, b) in enumerate(zip(s, wide[n])) if a != b} for n, s in base_shapes.items()}
    base_count, deep_count = Counter(map(_template, base_shapes)), Counter(map(_template, deep))
    block_templates = {t for t, c in deep_count.items() if c > base_count.get(t, 0)}
    maxima = _index_maxima(base_shapes)
    base_names = set(base_shapes)

    all_names: dict[int, list[str]] = {}
    for name, p in target_model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(p), []).append(name)

    params: list[ParamInfo] = []
    roles: dict[str, tuple[ParamClass, float, bool]] = {}
    for p_id, names in all_names.items():
        for name in names:
            roles[name] = _role(name, target_model, base_shapes, infinite, base_names, maxima)
        name = names[0]
        cls = roles[name][0]
        owner = _owner(target_model, name)
        kind = _owner_kind(owner)
        shape = tuple(target_model.get_parameter(name).shape)
        ref = _counterpart(name, base_names, maxima)
        inf = infinite[ref]
        in_dims, out_dim = _fan_dims(kind, len(shape))
        base_shape = base_shapes[ref]
        if len(shape) >= 2:
            m_in = _ratio(shape, base_shape, [d for d in in_dims if d in inf])
            m_out = _ratio(shape, base_shape, [out_dim] if out_dim in inf else [])
            base_fan_in = 1 if kind == "embedding" else math.prod(
                base_shape[d] for d in (in_dims if kind != "other" else [d for d in range(len(shape)) if d not in inf]))
        else:
            m_in = m_out = _ratio(shape, base_shape, inf)
            base_fan_in = 1
        tied = any(roles[n][0] is ParamClass.OUTPUT for n in names[1:])
        params.append(ParamInfo(
            name=name, cls=cls, in_block=_template(name) in block_templates, shape=shape,
            m_in=m_in, m_out=m_out, base_fan_in=base_fan_in, owner_kind=kind,
            is_bias=name.endswith("bias") and len(shape) == 1, tied_readout=tied,
        ))
    modules = _module_infos(target_model, base_model, roles)
    return Classification(base=base, target=target, params=tuple(params), modules=tuple(modules))


def _role(name: str, model: nn.Module, base_shapes: dict[str, tuple[int, ...]], infinite: dict[str, set[int]],
          base_names: set[str], maxima: dict[tuple[str, int], int]) -> tuple[ParamClass, float, bool]:
    """(class, fan_in ratio, fan_out is a width dim) of a parameter as seen from the module using it by this name."""
    ref = _counterpart(name, base_names, maxima)
    inf = infinite[ref]
    shape = tuple(model.get_parameter(name).shape)
    kind = _owner_kind(_owner(model, name))
    if len(shape) <= 1:
        return ParamClass.VECTOR, 1.0, bool(inf)
    if kind == "other" and len(inf) == 1:
        return ParamClass.INPUT, 1.0, True  # raw tensors with one width dim: position embeddings, cls tokens, kernels
    in_dims, out_dim = _fan_dims(kind, len(shape))
    in_inf = any(d in inf for d in in_dims)
    out_inf = out_dim in inf
    m_in = _ratio(shape, base_shapes[ref], [d for d in in_dims if d in inf])
    if in_inf and out_inf:
        return ParamClass.HIDDEN, m_in, True
    if in_inf:
        return ParamClass.OUTPUT, m_in, False
    return ParamClass.INPUT, 1.0, out_inf


def _module_infos(model: nn.Module, base_model: nn.Module, roles: dict[str, tuple[ParamClass, float, bool]]
                  ) -> list[ModuleInfo]:
    infos: list[ModuleInfo] = []
    base_modules = dict(base_model.named_modules())
    base_module_names, module_maxima = set(base_modules), _index_maxima(base_modules)
    for name, module in model.named_modules(remove_duplicate=False):
        weight = f"{name}.weight" if name else "weight"
        if weight in roles and _owner_kind(module) != "norm":
            cls, m_in, out_inf = roles[weight]
            if cls is ParamClass.INPUT and out_inf:  # any module whose own weight is input-like, e.g. a patch embed
                infos.append(ModuleInfo(name, "input"))
            elif cls is ParamClass.OUTPUT and _owner_kind(module) in ("linear", "conv"):
                infos.append(ModuleInfo(name, "output", m_in=m_in))
        if isinstance(getattr(module, "attn_scale", None), float) and hasattr(module, "head_dim"):
            base_attn = base_modules[_counterpart(name, base_module_names, module_maxima)]
            infos.append(ModuleInfo(name, "attention", head_dim=int(module.head_dim),
                                    base_head_dim=int(base_attn.head_dim)))
        if isinstance(getattr(module, "branch_mult", None), float):
            infos.append(ModuleInfo(name, "branch"))
    return infos


# ---------------------------------------------------------------- rule tables


def depth_alpha(parametrization: str, options: ParamOptions) -> float | None:
    alpha = DEPTH_ALPHA[parametrization]
    return options.alpha if alpha is not None and options.alpha is not None else alpha


def branch_multiplier(parametrization: str, r: float, options: ParamOptions) -> float:
    alpha = depth_alpha(parametrization, options)
    return 1.0 if alpha is None else r ** -alpha


def attention_scale(parametrization: str, attn_mult: float, head_dim: int, base_head_dim: int) -> float:
    """SP: attn_mult/sqrt(d). muP family: attn_mult*sqrt(d_base)/d, i.e. 1/d scaling that equals SP at the base."""
    if parametrization in MUP_FAMILY:
        return attn_mult * math.sqrt(base_head_dim) / head_dim
    return attn_mult / math.sqrt(head_dim)


def _width_lr_factor(p: ParamInfo, optimizer: str) -> float:
    if optimizer == "adamw":
        return 1.0 / p.m_in if p.cls is ParamClass.HIDDEN else 1.0
    return {
        ParamClass.INPUT: p.m_out,
        ParamClass.HIDDEN: p.m_out / p.m_in,
        ParamClass.VECTOR: p.m,
        ParamClass.OUTPUT: p.m_in,
    }[p.cls]


def _depth_lr_factor(p: ParamInfo, optimizer: str, alpha: float | None, r: float) -> float:
    if alpha is None or not p.in_block:
        return 1.0
    return r ** (alpha - 1) if optimizer == "adamw" else r ** (2 * alpha - 1)


def param_lr(p: ParamInfo, parametrization: str, optimizer: str, hp: HParams, r: float, options: ParamOptions) -> float:
    if parametrization not in MUP_FAMILY:
        return hp.lr
    alpha = depth_alpha(parametrization, options)
    return hp.lr * _width_lr_factor(p, optimizer) * _depth_lr_factor(p, optimizer, alpha, r)


def param_weight_decay(p: ParamInfo, parametrization: str, optimizer: str, hp: HParams, options: ParamOptions) -> float:
    """Vectors are not decayed; matrices keep lr*wd constant in width (no depth factor, as CompleteP)."""
    if p.cls is ParamClass.VECTOR:
        return 0.0
    if parametrization not in MUP_FAMILY or options.weight_decay_rule == "unscaled":
        return hp.weight_decay
    return hp.weight_decay / _width_lr_factor(p, optimizer)


def param_eps(p: ParamInfo, parametrization: str, hp: HParams, cls: Classification, options: ParamOptions) -> float:
    if parametrization not in MUP_FAMILY or options.eps_rule == "none":
        return hp.eps
    alpha = depth_alpha(parametrization, options)
    depth = cls.r ** -alpha if alpha is not None else 1.0
    if options.eps_rule == "global":
        return hp.eps / cls.m * depth
    if p.cls is ParamClass.HIDDEN:
        return hp.eps / p.m_in * (depth if p.in_block else 1.0)
    if p.cls is ParamClass.VECTOR and p.in_block:
        return hp.eps / p.m * depth
    return hp.eps


def param_init(p: ParamInfo, parametrization: str, hp: HParams, options: ParamOptions) -> tuple[str, float]:
    """(init kind, std): hidden std ~ 1/sqrt(fan_in); muP keeps input and readout std constant in width."""
    if p.cls is ParamClass.VECTOR:
        if p.is_bias:
            return "zeros", 0.0
        return ("ones", 0.0) if p.owner_kind == "norm" else ("keep", 0.0)
    mup = parametrization in MUP_FAMILY
    if p.cls is ParamClass.INPUT:
        base_std = 1.0 if p.owner_kind == "embedding" else 1.0 / math.sqrt(p.base_fan_in)
        return "normal", hp.init_std * base_std
    fan_in = p.base_fan_in * p.m_in
    if p.cls is ParamClass.HIDDEN:
        return "normal", hp.init_std / math.sqrt(fan_in)
    zero = options.zero_init_readout if options.zero_init_readout is not None else mup
    if zero:
        return "zeros", 0.0
    return "normal", hp.init_std / math.sqrt(p.base_fan_in if mup else fan_in)


def param_multiplier(p: ParamInfo, parametrization: str, hp: HParams) -> float:
    if p.cls is ParamClass.INPUT:
        return hp.input_mult
    if p.cls is ParamClass.OUTPUT:
        return hp.output_mult / (p.m_in if parametrization in MUP_FAMILY else 1.0)
    return 1.0


def _module_value(info: ModuleInfo, parametrization: str, hp: HParams, r: float, options: ParamOptions) -> float:
    if info.role == "input":
        return hp.input_mult
    if info.role == "output":
        return hp.output_mult / (info.m_in if parametrization in MUP_FAMILY else 1.0)
    if info.role == "attention":
        return attention_scale(parametrization, hp.attn_mult, info.head_dim, info.base_head_dim)
    return branch_multiplier(parametrization, r, options)


def make_plan(cls: Classification, parametrization: str, hp: HParams, optimizer: str = "adamw",
              options: ParamOptions | None = None) -> Plan:
    """Concrete settings for every parameter group of the target model. Pure: allocates nothing."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    options = options or ParamOptions()
    groups: dict[tuple[Any, ...], GroupPlan] = {}
    for p in cls.params:
        init, std = param_init(p, parametrization, hp, options)
        if p.tied_readout:
            init, std = "normal", hp.init_std * (1.0 if p.owner_kind == "embedding" else 1.0 / math.sqrt(p.base_fan_in))
        settings = dict(
            lr=param_lr(p, parametrization, optimizer, hp, cls.r, options),
            init=init, init_std=std,
            multiplier=param_multiplier(p, parametrization, hp),
            weight_decay=param_weight_decay(p, parametrization, optimizer, hp, options),
            eps=param_eps(p, parametrization, hp, cls, options),
        )
        key = (p.cls, p.in_block, p.tied_readout, *settings.values())
        if key not in groups:
            groups[key] = GroupPlan(name=_group_name(p, init, groups.values()), cls=p.cls.value, in_block=p.in_block,
                                    params=[], numel=0, **settings)
        groups[key].params.append(p.name)
        groups[key].numel += p.numel
    attention = [m for m in cls.modules if m.role == "attention"]
    zero_query = options.zero_init_query if options.zero_init_query is not None else parametrization in MUP_FAMILY
    return Plan(
        parametrization=parametrization, optimizer=optimizer,
        base=cls.base.to_dict(), target=cls.target.to_dict(), hparams=hp.to_dict(),
        branch_multiplier=branch_multiplier(parametrization, cls.r, options),
        attention_scale=(attention_scale(parametrization, hp.attn_mult, attention[0].head_dim,
                                         attention[0].base_head_dim) if attention else None),
        zero_init_query=zero_query,
        groups=list(groups.values()),
        modules=[ModulePlan(m.name, m.role, _module_value(m, parametrization, hp, cls.r, options))
                 for m in cls.modules],
    )


def _group_name(p: ParamInfo, init: str, existing: Iterable[GroupPlan]) -> str:
    parts = [p.cls.value]
    if p.in_block:
        parts.append("block")
    if p.tied_readout:
        parts.append("tied")
    if p.cls is ParamClass.VECTOR:
        parts.append("bias" if p.is_bias else "gain" if init == "ones" else "other")
    name = ".".join(parts)
    taken = {g.name for g in existing}
    suffix, candidate = 2, name
    while candidate in taken:
        candidate, suffix = f"{name}.{suffix}", suffix + 1
    return candidate


# ---------------------------------------------------------------- applying a plan


def _scale_output(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output * module.scaletune_mult


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * module.scaletune_mult, *args[1:])


def _set_multiplier(module: nn.Module, role: str, value: float) -> None:
    """Store the multiplier as a plain float and install the hook once (re-applying a plan must not stack)."""
    setattr(module, MULTIPLIER_ATTRS[role], float(value))
    if getattr(module, "scaletune_hook_role", None) == role:
        return
    if role == "input":
        module.register_forward_hook(_scale_output)
    else:
        module.register_forward_pre_hook(_scale_input)
    module.scaletune_hook_role = role


def apply_plan(model: nn.Module, plan: Plan) -> list[dict[str, Any]]:
    """Initialise ``model`` per the plan, set its multipliers, return torch optimizer parameter groups."""
    named = dict(model.named_parameters())
    planned = [n for g in plan.groups for n in g.params]
    missing, extra = sorted(set(planned) - set(named)), sorted(set(named) - set(planned))
    if missing or extra or len(planned) != len(set(planned)):
        raise ValueError("the model's parameters do not match the plan "
                         f"(in the plan but not the model: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         f"in the model but not the plan: {extra[:5]}{'...' if len(extra) > 5 else ''}); "
                         f"build the model at the plan's target shape {plan.target}")
    param_groups = []
    with torch.no_grad():
        for g in plan.groups:
            tensors = [named[n] for n in g.params]
            numel = sum(t.numel() for t in tensors)
            if numel != g.numel:
                raise ValueError(f"group {g.name!r} has {numel} elements in the model but {g.numel} in the plan; "
                                 f"build the model at the plan's target shape {plan.target}")
            for t in tensors:
                _initialise(t, g.init, g.init_std)
            param_groups.append({"params": tensors, "lr": g.lr, "base_lr": g.lr, "weight_decay": g.weight_decay,
                                 "eps": g.eps, "name": g.name})
        for m in plan.modules:
            module = model.get_submodule(m.name)
            if m.role in ("input", "output"):
                _set_multiplier(module, m.role, m.value)
                continue
            setattr(module, MULTIPLIER_ATTRS[m.role], float(m.value))
            if m.role == "attention" and plan.zero_init_query:
                module.zero_query_()
    return param_groups


def _initialise(t: torch.Tensor, kind: str, std: float) -> None:
    if kind == "normal":
        t.normal_(0.0, std)
    elif kind == "zeros":
        t.zero_()
    elif kind == "ones":
        t.fill_(1.0)


def make_optimizer(param_groups: list[dict[str, Any]], optimizer: str, hp: HParams) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=hp.lr, momentum=hp.momentum)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")


def build_model(factory: Factory, base: Shape, target: Shape, parametrization: str, hp: HParams,
                optimizer: str = "adamw", options: ParamOptions | None = None,
                device: str | torch.device = "cpu", classification: Classification | None = None) -> BuiltModel:
    """Build ``factory`` at the target shape in its parametrization, with optimizer parameter groups.

    ``classification`` (of ``factory`` at these shapes) saves classifying again when building many models."""
    classification = classification or classify(factory, base, target)
    plan = make_plan(classification, parametrization, hp, optimizer, options)
    with torch.device(device):
        model = factory(target.width, target.depth)
    return BuiltModel(model, apply_plan(model, plan), plan, classification)
