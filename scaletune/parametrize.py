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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from scaletune.clipping import DEFAULT_FACTOR, ClipRule, make_clipper
from scaletune.hparams import HParams
from scaletune.presets import Declarations, preset_for
from scaletune.shapes import Shape
from scaletune.usage_trace import Use, trace_uses

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
_MODULE_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")
OwnerKind = Literal["linear", "conv", "embedding", "norm", "other"]
_SCALE_ATTRIBUTES = ("attn_scale", "scaling", "scale")  # float logit-scale attributes, in order of preference
_WIDTH_ATTRIBUTES = ("embed_dim", "n_embd", "hidden_size", "d_model", "dim")
_HEADS_ATTRIBUTES = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_QUERY_CHILDREN = ("q_proj", "query", "q")
_FUSED_QKV_CHILDREN = ("c_attn", "qkv", "Wqkv", "in_proj")


class ParametrizationError(ValueError):
    """The model cannot be parametrized correctly as declared; the message names the modules and the fix."""


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
    zero_init_block_readout: bool = False  # zero each residual branch's last layer (Bordelon et al.; SkipInit)
    grad_clip: ClipRule = "off"  # a fixed global norm is not scale-invariant, so it is not offered (clipping.py)
    grad_clip_factor: float = DEFAULT_FACTOR  # 'relative': clip at this multiple of the running gradient norm

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0 < self.alpha <= 2:
            raise ValueError(f"alpha (the depth exponent) must be in (0, 2], got {self.alpha}")
        make_clipper(self.grad_clip, self.grad_clip_factor)  # validates both

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ParamOptions:
        return cls(**(values or {}))

    def clip_rule(self) -> dict[str, Any]:
        """What a plan records of the clipping rule: enough for :func:`scaletune.clipping.make_clipper`."""
        return {"rule": self.grad_clip} if self.grad_clip == "off" else \
            {"rule": self.grad_clip, "factor": self.grad_clip_factor}


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
    owner_kind: OwnerKind
    is_bias: bool
    tied_readout: bool = False
    block_readout: bool = False  # the weight of a layer that ends a residual branch (a block's branch_outputs)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def m(self) -> float:
        """The width ratio of a vector (its one width dim), or of a matrix's fan_in."""
        return self.m_in if self.cls is not ParamClass.INPUT else self.m_out


@dataclass(frozen=True)
class ModuleInfo:
    """A module whose forward multiplier the parametrization sets.

    ``attribute``: the float attribute holding the value (``branch_mult``, ``attn_scale``, ``scaling``...);
    ``hook``: whether a forward hook applies it (foreign code that has no such attribute, or ignores it);
    ``query``: for attention without ``zero_query_()``, where its query weights are.
    """

    name: str
    role: Literal["input", "output", "attention", "branch"]
    m_in: float = 1.0
    head_dim: int = 0
    base_head_dim: int = 0
    attribute: str | None = None
    hook: bool = True
    query: dict[str, Any] | None = None


@dataclass(frozen=True)
class Classification:
    base: Shape
    target: Shape
    params: tuple[ParamInfo, ...]
    modules: tuple[ModuleInfo, ...]
    blocks: tuple[str, ...] = ()  # outermost modules repeated with depth (``blocks.3``): the residual blocks
    unscaled_blocks: tuple[str, ...] = ()  # those of them that contain no scaled residual branch
    unscalable_attention: tuple[tuple[str, int | None, int | None], ...] = ()  # (module, base, target head dim)
    branch_hint: tuple[str, ...] = ()  # patterns a user could pass as branch_outputs, for the refusal message

    @property
    def r(self) -> float:
        return self.target.depth / self.base.depth

    @property
    def m(self) -> float:
        return self.target.width / self.base.width

    @property
    def block_layers(self) -> int:
        """Weight matrices in one residual block (1 is TP6's block depth 1; a transformer block has 4)."""
        return len({_template(p.name) for p in self.params if p.in_block and len(p.shape) >= 2})


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
    attribute: str | None = None
    hook: bool = True
    query: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModulePlan:
        """Plans written before foreign models set built-in attributes for branches and attention, hooks otherwise."""
        legacy = {"attribute": {r: MULTIPLIER_ATTRS[r] for r in ("branch", "attention")}.get(d["role"]),
                  "hook": d["role"] in ("input", "output")}
        return cls(**{**legacy, **d})


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
    grad_clip: dict[str, Any] = field(default_factory=lambda: {"rule": "off"})  # make_clipper(**grad_clip)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        values["groups"] = [GroupPlan(**g) for g in d["groups"]]
        values["modules"] = [ModulePlan.from_dict(m) for m in d.get("modules", [])]
        return cls(**values)


@dataclass
class BuiltModel:
    model: nn.Module
    param_groups: list[dict[str, Any]]
    plan: Plan
    classification: Classification


# ---------------------------------------------------------------- classification

@dataclass(frozen=True)
class _Layout:
    """Which dims of a weight are its fan-in and which its fan-out, as the module using it sees them."""

    kind: OwnerKind
    in_dims: tuple[int, ...]
    out_dim: int | None


def _template(name: str) -> str:
    return _INT_SEGMENT.sub("*", name)


def _module_template(name: str) -> str:
    return _MODULE_INDEX.sub("*", name)


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    owner_name = param_name.rpartition(".")[0]
    return model.get_submodule(owner_name) if owner_name else model


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _declared_layout(module: nn.Module, ndim: int, decl: Declarations) -> _Layout:
    """From the module type, never from the last dim; "other" keeps the (out, in) convention of microsoft/mup."""
    if isinstance(module, nn.Linear):
        return _Layout("linear", (1,), 0)
    if isinstance(module, _CONVS):
        return _Layout("conv", tuple(range(1, ndim)), 0)
    if isinstance(module, nn.Embedding):
        return _Layout("embedding", (0,), 1)
    if isinstance(module, _NORMS):
        return _Layout("norm", (), None)
    if _class_path(module) in decl.transposed:
        return _Layout("linear", (0,), 1)
    return _Layout("other", (1,), 0)


def _traced_layout(uses: set[Use], inf: set[int], name: str) -> _Layout:
    kinds = {use.kind for use in uses}
    if kinds == {"contract"} and len(uses) == 1:
        (use,) = uses
        return _Layout("linear", (use.dim,), 1 - use.dim)
    if "contract" not in kinds and uses:  # looked up or added: fan-in 1, like nn.Embedding
        out = sorted(inf)
        return _Layout("embedding", tuple(d for d in (0, 1) if d not in inf), out[0] if out else None)
    raise ParametrizationError(
        f"raw parameter {name!r} is used in ways that give it no single fan-in dimension ({sorted(map(str, uses))}); "
        "wrap it in nn.Linear or nn.Embedding")


def _ambiguous(base_shape: tuple[int, ...], target_shape: tuple[int, ...], inf: set[int]) -> bool:
    """A raw 2-D matrix whose fan-in cannot be read from shapes (square hidden matrices are the same both ways)."""
    square = base_shape[0] == base_shape[1] and target_shape[0] == target_shape[1]
    return not (len(inf) == 2 and square)


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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def classify(factory: Factory, base: Shape, target: Shape, *, branch_outputs: Sequence[str] = (),
             attention: Sequence[str] = (), example_input: Any = None) -> Classification:
    """Classify every parameter of ``factory(target.width, target.depth)``; annotations only for foreign code.

    A preset found by the model's class (Hugging Face GPT-2 and Llama) adds its declarations to
    ``branch_outputs`` and ``attention``; ``example_input`` (a tensor, tuple of positional args or dict of
    keyword args) lets a forward pass show how raw 2-D ``nn.Parameter`` matrices are used.
    """
    with torch.device("meta"):
        base_model = factory(base.width, base.depth)
        wide = _shapes(factory(2 * base.width, base.depth))
        deep_model = factory(base.width, 2 * base.depth)
        target_model = base_model if (target.width, target.depth) == (base.width, base.depth) \
            else factory(target.width, target.depth)
    decl = Declarations(tuple(branch_outputs), tuple(attention)).merged(preset_for(base_model))
    base_shapes, deep = _shapes(base_model), _shapes(deep_model)
    if set(wide) != set(base_shapes):
        raise ValueError("the model's parameter names change with width; scaletune needs the same names at every width")
    infinite = {n: {d for d, (a, b) in enumerate(zip(s, wide[n])) if a != b} for n, s in base_shapes.items()}
    base_count, deep_count = Counter(map(_template, base_shapes)), Counter(map(_template, deep))
    block_templates = {t for t, c in deep_count.items() if c > base_count.get(t, 0)}
    maxima = _index_maxima(base_shapes)
    base_names = set(base_shapes)
    target_shapes = _shapes(target_model)

    layouts: dict[str, _Layout] = {}
    for name, shape in target_shapes.items():
        layouts[name] = _declared_layout(_owner(target_model, name), len(shape), decl)
    raw = [n for n, s in target_shapes.items() if layouts[n].kind == "other" and len(s) == 2
           and _ambiguous(base_shapes[_counterpart(n, base_names, maxima)], s,
                          infinite[_counterpart(n, base_names, maxima)])]
    for name in (n for n, s in target_shapes.items() if layouts[n].kind == "other" and len(s) == 2):
        layouts[name] = _Layout("linear", (1,), 0)  # square hidden matrices; the traced ones are replaced below
    if raw:
        uses = _trace_raw(factory, base, base_model, [_counterpart(n, base_names, maxima) for n in raw],
                          example_input)
        for name in raw:
            ref = _counterpart(name, base_names, maxima)
            layouts[name] = _traced_layout(uses[ref], infinite[ref], name)

    all_names: dict[int, list[str]] = {}
    for name, p in target_model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(p), []).append(name)

    params: list[ParamInfo] = []
    roles: dict[str, tuple[ParamClass, float, bool]] = {}
    for names in all_names.values():
        for name in names:
            ref = _counterpart(name, base_names, maxima)
            roles[name] = _role(target_shapes[name], base_shapes[ref], layouts[name], infinite[ref])
        name = names[0]
        cls, layout, shape = roles[name][0], layouts[name], target_shapes[name]
        ref = _counterpart(name, base_names, maxima)
        inf, base_shape = infinite[ref], base_shapes[ref]
        if len(shape) >= 2:
            m_in = _ratio(shape, base_shape, [d for d in layout.in_dims if d in inf])
            m_out = _ratio(shape, base_shape, [layout.out_dim] if layout.out_dim in inf else [])
            fan_in_dims = layout.in_dims if layout.kind != "other" else [d for d in range(len(shape)) if d not in inf]
            base_fan_in = 1 if layout.kind == "embedding" else math.prod(base_shape[d] for d in fan_in_dims)
        else:
            m_in = m_out = _ratio(shape, base_shape, inf)
            base_fan_in = 1
        tied = any(roles[n][0] is ParamClass.OUTPUT for n in names[1:])
        params.append(ParamInfo(
            name=name, cls=cls, in_block=_template(name) in block_templates, shape=shape,
            m_in=m_in, m_out=m_out, base_fan_in=base_fan_in, owner_kind=layout.kind,
            is_bias=name.endswith("bias") and len(shape) == 1, tied_readout=tied,
        ))
    modules = _module_infos(target_model, base_model, roles, layouts, decl)
    branches = [m.name for m in modules if m.role == "branch"]
    readouts = _block_readouts(target_model, branches)
    params = [replace(p, block_readout=p.name in readouts) for p in params]
    blocks = _repeated_blocks(base_model, deep_model, target_model)
    unscaled = tuple(b for b in blocks if not any(br == b or br.startswith(b + ".") for br in branches))
    return Classification(
        base=base, target=target, params=tuple(params), modules=tuple(modules), blocks=blocks,
        unscaled_blocks=unscaled,
        unscalable_attention=_unscalable_attention(target_model, base_model, modules),
        branch_hint=_branch_hint(target_model, unscaled[0]) if unscaled else (),
    )


def _block_readouts(model: nn.Module, branches: list[str]) -> set[str]:
    """Weights of the layers that end residual branches, as each block names them in ``branch_outputs``."""
    return {f"{name}.{output}.weight" if name else f"{output}.weight"
            for name in branches for output in getattr(model.get_submodule(name), "branch_outputs", ())}


def _trace_raw(factory: Factory, base: Shape, base_model: nn.Module, names: list[str],
               example_input: Any) -> dict[str, set[Use]]:
    if example_input is None:
        raise ParametrizationError(
            f"raw nn.Parameter matrices {sorted(set(names))} have no module type that tells which dimension is "
            "their fan-in (nn.Linear stores (out, in); `x @ W` uses (in, out)) nor whether they are a readout. "
            "Pass example_input=<one batch> to build_model/classify so a forward pass shows how they are used, "
            "or wrap them in nn.Linear / nn.Embedding")

    def models() -> Iterator[nn.Module]:
        yield base_model
        yield factory(base.width, base.depth)

    return trace_uses(models(), names, example_input)


def _role(shape: tuple[int, ...], base_shape: tuple[int, ...], layout: _Layout, inf: set[int]
          ) -> tuple[ParamClass, float, bool]:
    """(class, fan_in ratio, fan_out is a width dim) of a parameter as seen from the module using it by this name."""
    if len(shape) <= 1:
        return ParamClass.VECTOR, 1.0, bool(inf)
    if layout.kind == "other" and len(inf) == 1:
        return ParamClass.INPUT, 1.0, True  # raw tensors with one width dim: position embeddings, cls tokens, kernels
    in_inf = any(d in inf for d in layout.in_dims)
    out_inf = layout.out_dim in inf
    m_in = _ratio(shape, base_shape, [d for d in layout.in_dims if d in inf])
    if in_inf and out_inf:
        return ParamClass.HIDDEN, m_in, True
    if in_inf:
        return ParamClass.OUTPUT, m_in, False
    return ParamClass.INPUT, 1.0, out_inf


def _module_infos(model: nn.Module, base_model: nn.Module, roles: dict[str, tuple[ParamClass, float, bool]],
                  layouts: dict[str, _Layout], decl: Declarations) -> list[ModuleInfo]:
    infos: list[ModuleInfo] = []
    base_modules = dict(base_model.named_modules())
    base_module_names, module_maxima = set(base_modules), _index_maxima(base_modules)
    for pattern in (*decl.branch_outputs, *decl.attention):
        if not any(fnmatchcase(name, pattern) for name in base_modules):
            raise ParametrizationError(f"pattern {pattern!r} matches no module of {type(base_model).__name__}; "
                                       f"module names look like {list(base_modules)[1:6]}")
    _check_readout_owners(model, roles)
    for name, module in model.named_modules(remove_duplicate=False):
        weight = f"{name}.weight" if name else "weight"
        if weight in roles and layouts[weight].kind != "norm":
            cls, m_in, out_inf = roles[weight]
            if cls is ParamClass.INPUT and out_inf:  # any module whose own weight is input-like, e.g. a patch embed
                infos.append(ModuleInfo(name, "input"))
            elif cls is ParamClass.OUTPUT:
                infos.append(ModuleInfo(name, "output", m_in=m_in))
        if isinstance(getattr(module, "attn_scale", None), float) and hasattr(module, "head_dim"):
            base_attn = base_modules[_counterpart(name, base_module_names, module_maxima)]
            infos.append(ModuleInfo(name, "attention", head_dim=int(module.head_dim),
                                    base_head_dim=int(base_attn.head_dim), attribute=MULTIPLIER_ATTRS["attention"],
                                    hook=False))
        elif _matches(name, decl.attention):
            base_attn = base_modules[_counterpart(name, base_module_names, module_maxima)]
            infos.append(_declared_attention(name, module, base_attn, layouts))
        if isinstance(getattr(module, "branch_mult", None), float):
            infos.append(ModuleInfo(name, "branch", attribute=MULTIPLIER_ATTRS["branch"], hook=False))
        elif _matches(name, decl.branch_outputs):
            infos.append(ModuleInfo(name, "branch"))
    return infos


def _check_readout_owners(model: nn.Module, roles: dict[str, tuple[ParamClass, float, bool]]) -> None:
    """A readout's multiplier scales the input of the module owning it, so that module must do nothing else."""
    for name, (cls, _, _) in roles.items():
        if cls is not ParamClass.OUTPUT:
            continue
        owner_name, _, local = name.rpartition(".")
        others = [n for n, p in _owner(model, name).named_parameters() if n != local and p.ndim > 1]
        if not owner_name or local != "weight" or others:
            held_by = f"module {owner_name!r}" if owner_name else "the model itself"
            raise ParametrizationError(
                f"the readout matrix {name!r} is held by {held_by}{f' with {others}' if others else ''}: scaletune "
                "applies the readout multiplier to the input of the module owning it; put the readout in a module "
                "of its own as its `weight` (nn.Linear, or a module whose forward is x @ self.weight)")


def head_dim(module: nn.Module) -> int | None:
    """An attention module's head dimension from its attributes (head_dim, or width / heads), None if unknown."""
    value = getattr(module, "head_dim", None)
    if isinstance(value, int):
        return value
    width = next((v for a in _WIDTH_ATTRIBUTES if isinstance(v := getattr(module, a, None), int)), None)
    heads = next((v for a in _HEADS_ATTRIBUTES if isinstance(v := getattr(module, a, None), int)), None)
    return width // heads if width and heads else None


def _query_location(name: str, module: nn.Module, layouts: dict[str, _Layout]) -> dict[str, Any] | None:
    """Where the query weights are: a q_proj-like child, or the first third of a fused qkv child's outputs."""
    for child, parts in [*((c, 1) for c in _QUERY_CHILDREN), *((c, 3) for c in _FUSED_QKV_CHILDREN)]:
        weight = f"{name}.{child}.weight" if name else f"{child}.weight"
        if isinstance(getattr(module, child, None), nn.Module) and weight in layouts:
            out_dim = layouts[weight].out_dim
            return {"module": child, "dim": 0 if out_dim is None else out_dim, "parts": parts}
    return None


def _declared_attention(name: str, module: nn.Module, base_module: nn.Module,
                        layouts: dict[str, _Layout]) -> ModuleInfo:
    dims = head_dim(module), head_dim(base_module)
    if None in dims:
        raise ParametrizationError(
            f"attention module {name!r} ({type(module).__name__}): scaletune cannot tell its head dimension; give it "
            f"an int attribute head_dim (or {'/'.join(_WIDTH_ATTRIBUTES[:2])} and {'/'.join(_HEADS_ATTRIBUTES[:2])})")
    attribute = next((a for a in _SCALE_ATTRIBUTES if isinstance(getattr(module, a, None), float)), None)
    return ModuleInfo(name, "attention", head_dim=dims[0], base_head_dim=dims[1], attribute=attribute, hook=True,
                      query=None if callable(getattr(module, "zero_query_", None))
                      else _query_location(name, module, layouts))


def _repeated_blocks(base_model: nn.Module, deep_model: nn.Module, target_model: nn.Module) -> tuple[str, ...]:
    """Outermost modules repeated with depth (``blocks.3``), in the target model's order."""
    base_count = Counter(_module_template(n) for n, _ in base_model.named_modules())
    deep_count = Counter(_module_template(n) for n, _ in deep_model.named_modules())
    growing = {t for t, c in deep_count.items() if c > base_count.get(t, 0) and t.endswith("*")}
    outermost = {t for t in growing if not any(t.startswith(o + ".") for o in growing)}
    return tuple(n for n, _ in target_model.named_modules() if _module_template(n) in outermost)


def _branch_hint(model: nn.Module, block: str) -> tuple[str, ...]:
    """The block's children with weights that are not norms: the likely residual branches, as patterns."""
    template = _module_template(block)
    return tuple(f"{template}.{name}" for name, child in model.get_submodule(block).named_children()
                 if any(p.ndim > 1 for p in child.parameters()) and not isinstance(child, _NORMS))


def _unscalable_attention(model: nn.Module, base_model: nn.Module, modules: list[ModuleInfo]
                          ) -> tuple[tuple[str, int | None, int | None], ...]:
    """Modules that look like attention (class name) but whose logit scale scaletune does not set."""
    covered = [m.name for m in modules if m.role == "attention"]
    base_modules = dict(base_model.named_modules())
    base_names, maxima = set(base_modules), _index_maxima(base_modules)
    found = []
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or any(
                name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in covered):
            continue
        base_module = base_modules[_counterpart(name, base_names, maxima)]
        found.append((name, head_dim(base_module), head_dim(module)))
    return tuple(found)


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
        if p.block_readout and options.zero_init_block_readout:
            return "zeros", 0.0
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
    return hp.residual_mult * branch_multiplier(parametrization, r, options)


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def check_transferable(cls: Classification, parametrization: str, options: ParamOptions) -> None:
    """Refuse a plan that would silently not transfer: depth without scaled branches, 1/d attention not set."""
    base, target = cls.base, cls.target
    branches = [m for m in cls.modules if m.role == "branch"]
    if depth_alpha(parametrization, options) is not None and target.depth != base.depth and (
            cls.unscaled_blocks or not branches):
        where = (f"the blocks {_listed(cls.unscaled_blocks)} contain no residual branch scaletune can scale"
                 if cls.unscaled_blocks else "scaletune found no residual branch to scale")
        example = f" (here perhaps {list(cls.branch_hint)})" if cls.branch_hint else ""
        raise ParametrizationError(
            f"depth changes {base.depth} -> {target.depth} under {parametrization!r}, but {where}, so the depth "
            f"rule (each branch output x r^-alpha) cannot be applied. Pass branch_outputs=[patterns] to build_model: "
            f"fnmatch patterns naming the modules whose output is one residual branch{example}, or give each block "
            "a float attribute branch_mult that multiplies its branch outputs; otherwise keep the depth fixed")
    if parametrization in MUP_FAMILY and target.width != base.width:
        changing = [(n, b, t) for n, b, t in cls.unscalable_attention if b is None or t is None or b != t]
        if changing:
            dims = ", ".join(f"{n}: {'?' if b is None else b} -> {'?' if t is None else t}" for n, b, t in changing[:4])
            raise ParametrizationError(
                f"under {parametrization!r} the attention logit scale must follow the head dimension (1/d), but "
                f"scaletune cannot set it in {_listed([n for n, _, _ in changing])} and their head dimension changes "
                f"or cannot be read from attributes ({dims}). Pass attention=[patterns] to build_model (scaletune then "
                "sets `scale=` of every F.scaled_dot_product_attention call inside the module, and its float "
                "attribute attn_scale/scaling/scale if it has one), or keep the head dimension fixed as width grows")


def make_plan(cls: Classification, parametrization: str, hp: HParams, optimizer: str = "adamw",
              options: ParamOptions | None = None) -> Plan:
    """Concrete settings for every parameter group of the target model. Pure: allocates nothing."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    options = options or ParamOptions()
    check_transferable(cls, parametrization, options)
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
        branch_multiplier=hp.residual_mult * branch_multiplier(parametrization, cls.r, options),
        attention_scale=(attention_scale(parametrization, hp.attn_mult, attention[0].head_dim,
                                         attention[0].base_head_dim) if attention else None),
        zero_init_query=zero_query,
        groups=list(groups.values()),
        modules=[ModulePlan(m.name, m.role, _module_value(m, parametrization, hp, cls.r, options), m.attribute,
                            m.hook, m.query) for m in cls.modules],
        grad_clip=options.clip_rule(),
    )


def _group_name(p: ParamInfo, init: str, existing: Iterable[GroupPlan]) -> str:
    parts = [p.cls.value]
    if p.in_block:
        parts.append("block")
    if p.tied_readout:
        parts.append("tied")
    if p.cls is ParamClass.VECTOR:
        parts.append("bias" if p.is_bias else "gain" if init == "ones" else "other")
    if p.block_readout and init == "zeros":
        parts.append("readout")
    name = ".".join(parts)
    taken = {g.name for g in existing}
    suffix, candidate = 2, name
    while candidate in taken:
        candidate, suffix = f"{name}.{suffix}", suffix + 1
    return candidate


# ---------------------------------------------------------------- applying a plan


# Where a hook reads its value: built-in attributes are set directly, so foreign branch and attention hooks
# keep theirs apart from a module's own attributes.
_HOOK_VALUE = {**MULTIPLIER_ATTRS, "branch": "scaletune_branch_mult", "attention": "scaletune_attn_scale"}


def _times(output: Any, mult: float) -> Any:
    """Multiply a module's output, or the first element of a tuple output (Hugging Face modules return tuples)."""
    if isinstance(output, tuple):
        return (output[0] * mult, *output[1:])
    return output * mult


def _scale_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return _times(output, module.scaletune_mult)


def _scale_branch(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return _times(output, module.scaletune_branch_mult)


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * module.scaletune_mult, *args[1:])


class _AttentionScale(TorchFunctionMode):
    """Inside one attention module's forward: every F.scaled_dot_product_attention call uses this logit scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            args, kwargs = args[:6], {**kwargs, "scale": self.scale}
        return func(*args, **kwargs)


def _enter_attention_scale(module: nn.Module, args: tuple[Any, ...]) -> None:
    mode = _AttentionScale(module.scaletune_attn_scale)
    mode.__enter__()
    module.scaletune_modes.append(mode)


def _exit_attention_scale(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    module.scaletune_modes.pop().__exit__(None, None, None)


def _set_hook(module: nn.Module, role: str, value: float) -> None:
    """Store the value as a plain float and install the role's hook once (re-applying a plan must not stack)."""
    setattr(module, _HOOK_VALUE[role], float(value))
    roles = getattr(module, "scaletune_hook_roles", ())
    if role in roles:
        return
    if role == "attention":
        module.scaletune_modes = []
        module.register_forward_pre_hook(_enter_attention_scale)
        module.register_forward_hook(_exit_attention_scale, always_call=True)
    elif role == "output":
        module.register_forward_pre_hook(_scale_input)
    elif role == "branch":
        module.register_forward_hook(_scale_branch)
    else:
        module.register_forward_hook(_scale_output)
    module.scaletune_hook_roles = (*roles, role)


def _zero_query(module: nn.Module, query: dict[str, Any] | None) -> None:
    """Zero the query projection: the module's own ``zero_query_()``, or the located weights (a fused qkv's first third)."""
    if callable(getattr(module, "zero_query_", None)):
        module.zero_query_()
        return
    if query is None:
        return
    for p in getattr(module, query["module"]).parameters(recurse=False):
        dim = query["dim"] if p.ndim > 1 else 0
        p.narrow(dim, 0, p.shape[dim] // query["parts"]).zero_()


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
            if m.attribute is not None:
                setattr(module, m.attribute, float(m.value))
            if m.hook:
                _set_hook(module, m.role, m.value)
            if m.role == "attention" and plan.zero_init_query:
                _zero_query(module, m.query)
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
                device: str | torch.device = "cpu", classification: Classification | None = None, *,
                branch_outputs: Sequence[str] = (), attention: Sequence[str] = (),
                example_input: Any = None) -> BuiltModel:
    """Build ``factory`` at the target shape in its parametrization, with optimizer parameter groups.

    ``classification`` (of ``factory`` at these shapes) saves classifying again when building many models.
    For model code scaletune did not write, ``branch_outputs`` and ``attention`` (fnmatch patterns on module
    names) say where the residual branches end and where attention is computed, and ``example_input``
    lets it see how raw ``nn.Parameter`` matrices are used; see :func:`classify`. Raises
    :class:`ParametrizationError` rather than building a model that would not transfer.
    """
    classification = classification or classify(factory, base, target, branch_outputs=branch_outputs,
                                                 attention=attention, example_input=example_input)
    plan = make_plan(classification, parametrization, hp, optimizer, options)
    device = torch.device(device)
    # A device context makes every torch call of the build go through a dispatch hook (+50% for a small MLP).
    with nullcontext() if device == torch.get_default_device() else device:
        model = factory(target.width, target.depth)
    return BuiltModel(model, apply_plan(model, plan), plan, classification)
