"""The rule tables, exactly, on small models the tests define themselves (no annotations needed)."""

import math

import pytest
import torch
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.parametrize import (
    ParamClass, ParamOptions, Plan, apply_plan, build_model, classify, make_optimizer, make_plan,
)
from scaletune.runner import family_factory
from scaletune.shapes import Shape


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.branch_mult = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch_mult * self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, width: int, depth: int, features: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(self.norm(h))


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.attn_scale = 1 / math.sqrt(head_dim)
        self.branch_mult = 1.0
        self.qkv = nn.Linear(width, 3 * width)

    def zero_query_(self) -> None:
        with torch.no_grad():
            self.qkv.weight[: self.qkv.out_features // 3].zero_()
            self.qkv.bias[: self.qkv.out_features // 3].zero_()


class TinyLM(nn.Module):
    def __init__(self, width: int, depth: int, vocab: int = 50, tied: bool = True, fixed_heads: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.attns = nn.ModuleList(Attention(width, width // 4 if fixed_heads else 16) for _ in range(depth))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx)
        for a in self.attns:
            h = h + a.branch_mult * a.qkv(h)[..., : h.shape[-1]] * a.attn_scale
        return self.lm_head(h)


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.branch_mult = 1.0


class TinyResNet(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stages = nn.ModuleList(
            nn.ModuleList(Stage(width if i == 0 else 2 * width, 2 * width) for i in range(depth)) for _ in range(2))
        self.fc = nn.Linear(2 * width, 10)


BASE, TARGET = Shape(64, 2), Shape(256, 8)
HP = HParams(lr=0.01, weight_decay=0.1, eps=1e-8, init_std=2.0, output_mult=3.0, input_mult=5.0)


def _plan(pz: str, opt: str = "adamw", factory=ResMLP, target: Shape = TARGET, **options) -> Plan:
    return make_plan(classify(factory, BASE, target), pz, HP, opt, ParamOptions(**options))


def _setting(plan: Plan, param: str) -> dict:
    (group,) = [g for g in plan.groups if param in g.params]
    return {k: getattr(group, k) for k in ("lr", "weight_decay", "eps", "init", "init_std", "multiplier")}


def test_classifies_every_role_without_annotations() -> None:
    c = {p.name: p for p in classify(ResMLP, BASE, TARGET).params}
    assert c["inp.weight"].cls is ParamClass.INPUT and not c["inp.weight"].in_block
    assert c["inp.bias"].cls is ParamClass.VECTOR and c["inp.bias"].m == 4
    assert c["blocks.7.fc1.weight"].cls is ParamClass.HIDDEN and c["blocks.7.fc1.weight"].in_block
    assert (c["blocks.7.fc2.weight"].m_in, c["blocks.7.fc2.weight"].m_out) == (4, 4)
    assert c["blocks.3.norm.weight"].cls is ParamClass.VECTOR and c["blocks.3.norm.weight"].in_block
    assert c["norm.weight"].cls is ParamClass.VECTOR and not c["norm.weight"].in_block
    assert c["out.weight"].cls is ParamClass.OUTPUT and c["out.weight"].m_in == 4
    assert c["out.bias"].cls is ParamClass.VECTOR and c["out.bias"].m == 1


def test_conv_roles_and_shortcut_outside_the_branch() -> None:
    c = {p.name: p for p in classify(TinyResNet, Shape(8, 2), Shape(32, 4)).params}
    assert c["stem.weight"].cls is ParamClass.INPUT
    conv = c["stages.1.3.conv.weight"]
    assert conv.cls is ParamClass.HIDDEN and conv.in_block and conv.m_in == 4 and conv.base_fan_in == 16 * 9
    assert c["stages.0.0.shortcut.weight"].in_block  # one shortcut per block here, so it grows with depth
    assert c["fc.weight"].cls is ParamClass.OUTPUT


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_sp_is_one_lr_and_fan_in_init(opt: str) -> None:
    plan = _plan("sp", opt)
    assert {g.lr for g in plan.groups} == {0.01}
    assert _setting(plan, "blocks.0.fc1.weight")["init_std"] == pytest.approx(2.0 / 16)
    assert _setting(plan, "out.weight") == dict(lr=0.01, weight_decay=0.1, eps=1e-8, init="normal",
                                                init_std=pytest.approx(2.0 / 16), multiplier=3.0)
    assert plan.branch_multiplier == 1.0


def test_mup_adam_table() -> None:
    plan = _plan("mup")
    assert _setting(plan, "inp.weight") == dict(lr=0.01, weight_decay=0.1, eps=1e-8, init="normal",
                                                init_std=pytest.approx(2.0 / math.sqrt(12)), multiplier=5.0)
    assert _setting(plan, "blocks.5.fc1.weight") == dict(lr=pytest.approx(0.01 / 4), weight_decay=pytest.approx(0.4),
                                                         eps=pytest.approx(1e-8 / 4), init="normal",
                                                         init_std=pytest.approx(2.0 / 16), multiplier=1.0)
    # fc2 has fan_in 2*width: same ratio, larger fan_in
    assert _setting(plan, "blocks.5.fc2.weight")["init_std"] == pytest.approx(2.0 / math.sqrt(512))
    assert _setting(plan, "out.weight") == dict(lr=0.01, weight_decay=0.1, eps=1e-8, init="zeros", init_std=0.0,
                                                multiplier=pytest.approx(3.0 / 4))
    assert _setting(plan, "blocks.5.norm.weight") == dict(lr=0.01, weight_decay=0.0, eps=pytest.approx(1e-8 / 4),
                                                          init="ones", init_std=0.0, multiplier=1.0)
    assert _setting(plan, "norm.bias")["eps"] == 1e-8  # outside blocks: eps unscaled
    assert plan.branch_multiplier == 1.0
    outputs = [m for m in plan.modules if m.role == "output"]
    assert [(m.name, m.value) for m in outputs] == [("out", pytest.approx(0.75))]


def test_readout_init_is_constant_in_width_when_not_zeroed() -> None:
    plan = _plan("mup", zero_init_readout=False)
    assert _setting(plan, "out.weight")["init_std"] == pytest.approx(2.0 / 8)  # 1/sqrt(base fan_in 64)


@pytest.mark.parametrize("pz,alpha", [("depth_mup", 0.5), ("completep", 1.0)])
def test_depth_rules_adam(pz: str, alpha: float) -> None:
    plan, r = _plan(pz), 4.0
    assert plan.branch_multiplier == pytest.approx(r ** -alpha)
    hidden = _setting(plan, "blocks.0.fc1.weight")
    assert hidden["lr"] == pytest.approx(0.01 / 4 * r ** (alpha - 1))
    assert hidden["eps"] == pytest.approx(1e-8 / 4 * r ** -alpha)
    assert hidden["weight_decay"] == pytest.approx(0.4)  # no depth factor (CompleteP)
    assert hidden["init_std"] == pytest.approx(2.0 / 16)  # no depth factor in init
    gain = _setting(plan, "blocks.0.norm.weight")
    assert gain["lr"] == pytest.approx(0.01 * r ** (alpha - 1))
    assert gain["eps"] == pytest.approx(1e-8 / 4 * r ** -alpha)
    assert _setting(plan, "norm.weight")["lr"] == 0.01  # final norm: no depth factor
    assert _setting(plan, "inp.weight")["lr"] == 0.01


@pytest.mark.parametrize("pz,depth_factor", [("mup", 1.0), ("depth_mup", 1.0), ("completep", 4.0)])
def test_sgd_table(pz: str, depth_factor: float) -> None:
    plan = _plan(pz, "sgd")
    assert _setting(plan, "inp.weight")["lr"] == pytest.approx(0.01 * 4)
    assert _setting(plan, "inp.weight")["weight_decay"] == pytest.approx(0.1 / 4)
    assert _setting(plan, "blocks.1.fc1.weight")["lr"] == pytest.approx(0.01 * depth_factor)  # m_out/m_in = 1
    assert _setting(plan, "blocks.1.norm.bias")["lr"] == pytest.approx(0.01 * 4 * depth_factor)
    assert _setting(plan, "out.weight")["lr"] == pytest.approx(0.01 * 4)
    assert _setting(plan, "out.weight")["weight_decay"] == pytest.approx(0.1 / 4)
    assert _setting(plan, "out.bias")["lr"] == pytest.approx(0.01)


def test_alternative_rules_are_options() -> None:
    plan = _plan("completep", weight_decay_rule="unscaled", eps_rule="global")
    hidden = _setting(plan, "blocks.0.fc1.weight")
    assert hidden["weight_decay"] == 0.1
    assert _setting(plan, "inp.weight")["eps"] == pytest.approx(1e-8 / 4 / 4)
    assert _setting(_plan("completep", eps_rule="none"), "blocks.0.fc1.weight")["eps"] == 1e-8
    assert _plan("completep", alpha=0.5).branch_multiplier == pytest.approx(0.5)


def test_tied_embedding_is_input_like_and_never_zeroed() -> None:
    c = {p.name: p for p in classify(TinyLM, BASE, TARGET).params}
    assert "lm_head.weight" not in c and c["wte.weight"].tied_readout and c["wte.weight"].cls is ParamClass.INPUT
    plan = _plan("mup", factory=TinyLM)
    assert _setting(plan, "wte.weight") == dict(lr=0.01, weight_decay=0.1, eps=1e-8, init="normal",
                                                init_std=2.0, multiplier=5.0)
    roles = {m.name: (m.role, m.value) for m in plan.modules}
    assert roles["lm_head"] == ("output", pytest.approx(0.75)) and roles["wte"] == ("input", 5.0)


def test_attention_scale_is_one_over_d_in_mup_family() -> None:
    fixed = _plan("mup", factory=lambda w, d: TinyLM(w, d, fixed_heads=True))
    assert fixed.attention_scale == pytest.approx(math.sqrt(16) / 64)
    sp = _plan("sp", factory=lambda w, d: TinyLM(w, d, fixed_heads=True))
    assert sp.attention_scale == pytest.approx(1 / 8)
    same_head_dim = _plan("completep", factory=TinyLM)
    assert same_head_dim.attention_scale == pytest.approx(1 / 4)


@pytest.mark.parametrize("pz", ["mup", "depth_mup", "completep"])
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("factory", [ResMLP, TinyLM])
def test_mup_family_equals_sp_at_the_base_shape(pz: str, opt: str, factory) -> None:
    options = ParamOptions(zero_init_readout=False, zero_init_query=False)
    mu = make_plan(classify(factory, BASE, BASE), pz, HP, opt, options)
    sp = make_plan(classify(factory, BASE, BASE), "sp", HP, opt, options)
    assert [(g.params, g.lr, g.weight_decay, g.eps, g.init, g.init_std, g.multiplier) for g in mu.groups] == \
        [(g.params, g.lr, g.weight_decay, g.eps, g.init, g.init_std, g.multiplier) for g in sp.groups]
    assert [(m.name, m.value) for m in mu.modules] == [(m.name, m.value) for m in sp.modules]
    x = torch.randn(4, 12) if factory is ResMLP else torch.randint(0, 50, (2, 7))
    outs = []
    for pz_ in (pz, "sp"):
        torch.manual_seed(0)
        built = build_model(factory, BASE, BASE, pz_, HP, opt, options)
        outs.append(built.model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_plan_covers_every_parameter_exactly_once() -> None:
    for factory in (ResMLP, TinyLM, TinyResNet):
        with torch.device("meta"):
            model = factory(TARGET.width, TARGET.depth)
        plan = make_plan(classify(factory, BASE, TARGET), "completep", HP)
        names = [n for g in plan.groups for n in g.params]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert sum(g.numel for g in plan.groups) == sum(p.numel() for p in model.parameters())


def test_billion_parameter_target_is_planned_without_allocating() -> None:
    cls = classify(TinyLM, Shape(64, 2), Shape(8192, 48))
    plan = make_plan(cls, "completep", HP)
    assert sum(g.numel for g in plan.groups) > 1e9


def test_apply_plan_initialises_and_multipliers_do_not_stack() -> None:
    torch.manual_seed(0)
    built = build_model(ResMLP, BASE, TARGET, "mup", HP)
    model = built.model
    assert torch.count_nonzero(model.out.weight) == 0
    assert model.blocks[0].fc1.weight.std().item() == pytest.approx(2.0 / 16, rel=0.05)
    assert model.blocks[0].norm.weight.eq(1).all() and model.blocks[0].fc1.bias.eq(0).all()
    apply_plan(model, built.plan)  # re-applying must not install a second hook
    nn.init.normal_(model.out.weight)
    x = torch.randn(3, 12)
    h = model.inp(x)  # hook: x5
    for b in model.blocks:
        h = b(h)
    expected = nn.functional.linear(model.norm(h) * 0.75, model.out.weight, model.out.bias)
    torch.testing.assert_close(model(x), expected)
    assert isinstance(model.out.scaletune_mult, float)


def test_apply_plan_refuses_a_model_that_does_not_match() -> None:
    plan = make_plan(classify(ResMLP, BASE, TARGET), "mup", HP)
    with pytest.raises(ValueError, match="do not match the plan"):
        apply_plan(ResMLP(256, 4), plan)
    with pytest.raises(ValueError, match="elements in the model"):
        apply_plan(ResMLP(128, 8), plan)


def test_plan_round_trips_through_json_and_optimizer_uses_group_settings() -> None:
    built = build_model(ResMLP, BASE, TARGET, "completep", HP)
    plan = Plan.from_dict(built.plan.to_dict())
    assert plan == built.plan
    opt = make_optimizer(built.param_groups, "adamw", HP)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["hidden.block"]["lr"] == pytest.approx(0.01 / 4)
    assert by_name["hidden.block"]["eps"] == pytest.approx(1e-8 / 4 / 4)
    assert by_name["vector.bias"]["weight_decay"] == 0.0


RESNET_SPEC = DataSpec("classification", (1, 8, 8), 10)


def resnet_plan(parametrization: str, hp: HParams, optimizer: str = "adamw", **options):
    factory = family_factory(get_family("resnet"), Shape(8, 8), RESNET_SPEC, {})
    return make_plan(classify(factory, Shape(8, 2), Shape(8, 8)), parametrization, hp, optimizer,
                     ParamOptions(**options))


def test_bordelon_resnet_branches_are_beta0_over_sqrt_depth_and_sgd_lr_does_not_move():
    """Bordelon et al.: branch = beta_0 / sqrt(L) (relative to the base depth); SGD keeps its LR across depth."""
    plan = resnet_plan("depth_mup", HParams(lr=0.1, residual_mult=0.5), optimizer="sgd")
    assert plan.branch_multiplier == pytest.approx(0.5 / 2)  # beta_0 x (8/2)^-1/2
    assert [m.value for m in plan.modules if m.role == "branch"] == pytest.approx([0.25] * 24)  # 3 stages x 8
    conv = [g for g in plan.groups if "stages.0.blocks.5.conv1.weight" in g.params][0]
    assert conv.lr == pytest.approx(0.1)  # SGD, alpha = 1/2: depth factor r^(2 alpha - 1) = 1; width m = 1


def test_zero_init_block_readout_zeroes_only_the_last_layer_of_each_branch():
    hp = HParams(lr=0.01)
    plan = resnet_plan("depth_mup", hp, zero_init_block_readout=True)
    zeroed = {n for g in plan.groups if g.init == "zeros" and g.cls == "hidden" for n in g.params}
    assert zeroed == {f"stages.{s}.blocks.{b}.conv2.weight" for s in range(3) for b in range(8)}
    assert all(g.name.endswith("readout") for g in plan.groups if g.init == "zeros" and g.cls == "hidden")
    assert not any(g.init == "zeros" and g.cls == "hidden" for g in resnet_plan("depth_mup", hp).groups)
    factory = family_factory(get_family("resnet"), Shape(8, 8), RESNET_SPEC, {})
    built = build_model(factory, Shape(8, 2), Shape(8, 8), "depth_mup", hp,
                        options=ParamOptions(zero_init_block_readout=True))
    block = built.model.stages[1].blocks[3]
    assert torch.count_nonzero(block.conv2.weight) == 0 and torch.count_nonzero(block.conv1.weight) > 0
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(block(x), x)  # at init the branch adds exactly zero
