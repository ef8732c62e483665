"""Transfer plans: exact rule-table values, full coverage, JSON round trip onto a real model, warnings."""

import json
import resource
import time

import pytest
import torch

from scaletune import apply_transfer, transfer_plan
from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory
from scaletune.parametrize import ParamOptions, build_model, classify
from scaletune.shapes import Shape
from scaletune.transfer import TransferPlan

SPEC = DataSpec(task="classification", input_shape=(12,), num_outputs=5)
LM_SPEC = DataSpec(task="lm", input_shape=(16,), num_outputs=64)
BASE, TARGET = Shape(16, 2), Shape(64, 8)
HP = HParams(lr=0.01, weight_decay=0.1, eps=1e-8, output_mult=2.0, input_mult=3.0, init_std=1.5)


def plan_for(parametrization: str, **kwargs):
    return transfer_plan("mlp", SPEC, {}, BASE, TARGET, parametrization, HP, **kwargs)


def group_of(plan, param: str) -> dict:
    """The group holding ``param`` as the plan's JSON spells it."""
    (group,) = [g for g in plan.to_dict()["groups"] if param in g["params"]]
    return group


def test_completep_values_match_the_rule_table_by_hand():
    plan = plan_for("completep")  # m = 4, r = 4, alpha = 1
    fc1 = group_of(plan, "blocks.5.fc1.weight")
    assert fc1["class"] == "hidden" and fc1["in_block"]
    assert fc1["lr"] == pytest.approx(0.01 / 4)  # eta / m_in * r^(alpha-1)
    assert fc1["weight_decay"] == pytest.approx(0.1 * 4)  # lr * wd constant in width
    assert fc1["eps"] == pytest.approx(1e-8 / 4 / 4)  # eps / m * r^-alpha
    assert fc1["init_std"] == pytest.approx(1.5 / 64 ** 0.5)
    gain = group_of(plan, "blocks.0.norm.weight")
    assert gain["lr"] == pytest.approx(0.01) and gain["weight_decay"] == 0.0
    assert gain["eps"] == pytest.approx(1e-8 / 4 / 4)
    embed = group_of(plan, "embed.weight")
    assert embed["class"] == "input" and embed["lr"] == pytest.approx(0.01)
    assert embed["init_std"] == pytest.approx(1.5 / 12 ** 0.5) and embed["multiplier"] == 3.0
    head = group_of(plan, "head.weight")
    assert head["class"] == "output" and head["init"] == "zeros"
    assert head["multiplier"] == pytest.approx(2.0 / 4) and head["lr"] == pytest.approx(0.01)
    assert plan.plan.branch_multiplier == pytest.approx(1 / 4)
    assert {"name": "head", "role": "output", "value": pytest.approx(0.5)} in [
        {k: m[k] for k in ("name", "role", "value")} for m in plan.to_dict()["module_multipliers"]]


def test_depth_mup_scales_block_lr_by_inverse_sqrt_depth():
    plan = plan_for("depth_mup")
    assert group_of(plan, "blocks.3.fc2.weight")["lr"] == pytest.approx(0.01 / 4 / 2)
    assert group_of(plan, "blocks.3.fc2.bias")["lr"] == pytest.approx(0.01 / 2)
    assert plan.plan.branch_multiplier == pytest.approx(0.5)


@pytest.mark.parametrize("parametrization", ["sp", "mup", "depth_mup", "completep"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_every_parameter_gets_the_lr_and_weight_decay_of_the_rule_table(parametrization, optimizer):
    """An oracle written from research notes §6.2 by parameter name, independent of the classification code."""
    m, r = 4.0, 4.0  # BASE -> TARGET
    alpha = {"sp": None, "mup": None, "depth_mup": 0.5, "completep": 1.0}[parametrization]
    plan = transfer_plan("mlp", SPEC, {}, BASE, TARGET, parametrization, HP, optimizer)
    for group in plan.to_dict()["groups"]:
        for name in group["params"]:
            in_block = name.startswith("blocks.")
            role = BLOCK_ROLES[name.split(".", 2)[2]] if in_block else TOP_ROLES[name]
            assert group["in_block"] == in_block, name
            width = WIDTH_LR[optimizer][role](m)
            depth = 1.0 if alpha is None or not in_block else (
                r ** (alpha - 1) if optimizer == "adamw" else r ** (2 * alpha - 1))
            lr = HP.lr if parametrization == "sp" else HP.lr * width * depth
            assert group["lr"] == pytest.approx(lr), (name, group)
            matrix = role in ("input", "hidden", "output")
            wd = 0.0 if not matrix else HP.weight_decay if parametrization == "sp" else HP.weight_decay / width
            assert group["weight_decay"] == pytest.approx(wd), (name, group)
    expected_branch = 1.0 if alpha is None else r ** -alpha
    assert plan.plan.branch_multiplier == pytest.approx(expected_branch)


TOP_ROLES = {"embed.weight": "input", "embed.bias": "width_vector", "norm.weight": "width_vector",
             "norm.bias": "width_vector", "head.weight": "output", "head.bias": "fixed_vector"}  # the mlp family
BLOCK_ROLES = {"norm.weight": "width_vector", "norm.bias": "width_vector", "fc1.weight": "hidden",
               "fc2.weight": "hidden", "fc1.bias": "width_vector", "fc2.bias": "width_vector"}
WIDTH_LR = {  # research notes §6.2, muP: Adam LR eta (hidden eta/m_in); SGD LR eta*m_out for input, eta*m_out/m_in
    # hidden, eta*m for width vectors, eta*m_in for the readout, eta for vectors of fixed size
    "adamw": {"input": lambda m: 1.0, "hidden": lambda m: 1 / m, "output": lambda m: 1.0,
              "width_vector": lambda m: 1.0, "fixed_vector": lambda m: 1.0},
    "sgd": {"input": lambda m: m, "hidden": lambda m: 1.0, "output": lambda m: m,
            "width_vector": lambda m: m, "fixed_vector": lambda m: 1.0},
}


@pytest.mark.parametrize("family,spec,args", [("mlp", SPEC, {}),
                                              ("gpt", LM_SPEC, {"head_dim": 8, "tie_embeddings": True})])
def test_every_parameter_of_the_target_is_planned_exactly_once(family, spec, args):
    plan = transfer_plan(family, spec, args, BASE, TARGET, "completep", HP)
    model = get_family(family).build(TARGET, spec, args)
    planned = [name for g in plan.plan.groups for name in g.params]
    assert sorted(planned) == sorted(name for name, _ in model.named_parameters())
    assert sum(g.numel for g in plan.plan.groups) == sum(p.numel() for p in model.parameters())


def test_the_json_has_the_documented_keys_and_round_trips():
    plan = plan_for("completep", tuned_batch_size=32, batch_size=128, batch_rule="sqrt", provenance={"study_id": "s"})
    data = json.loads(json.dumps(plan.to_dict()))
    assert list(data) == ["family", "parametrization", "optimizer", "base", "target", "hparams", "branch_multiplier",
                          "attention_scale", "zero_init_query", "groups", "module_multipliers", "grad_clip",
                          "batch_scaling", "warnings", "provenance"]
    assert list(data["groups"][0]) == ["name", "class", "in_block", "params", "numel", "lr", "init", "init_std",
                                       "multiplier", "weight_decay", "eps"]
    assert list(data["module_multipliers"][0]) == ["name", "role", "value", "attribute", "hook", "query"]
    assert list(TransferPlan.json_types()) == list(data)
    assert TransferPlan.from_dict(data) == plan


def test_apply_transfer_after_json_round_trip_matches_building_in_the_parametrization():
    args = {"head_dim": 8}
    plan = transfer_plan("gpt", LM_SPEC, args, Shape(16, 1), Shape(32, 4), "completep", HP)
    loaded = json.loads(json.dumps(plan.to_dict()))
    model = get_family("gpt").build(Shape(32, 4), LM_SPEC, args)
    groups = apply_transfer(model, loaded)

    factory = family_factory(get_family("gpt"), Shape(32, 4), LM_SPEC, args)
    reference = build_model(factory, Shape(16, 1), Shape(32, 4), "completep", HP)
    assert [(g["name"], g["lr"], g["weight_decay"], g["eps"]) for g in groups] == \
        [(g["name"], g["lr"], g["weight_decay"], g["eps"]) for g in reference.param_groups]
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert torch.count_nonzero(model.blocks[2].attn.qkv.weight[:32]) == 0  # zero-initialised query
    assert model.blocks[3].branch_mult == pytest.approx(0.25)
    assert model.blocks[0].attn.attn_scale == pytest.approx(8 ** 0.5 / 8)  # attn_mult * sqrt(d_base) / d

    opt = torch.optim.AdamW(groups)
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens.reshape(-1)).backward()
    opt.step()
    assert torch.count_nonzero(model.lm_head.weight) > 0


def test_apply_transfer_refuses_a_model_of_another_shape():
    plan = plan_for("mup")
    wrong = get_family("mlp").build(Shape(32, 8), SPEC, {})
    with pytest.raises(ValueError, match="do not match|elements in the model"):
        apply_transfer(wrong, plan)
    deeper = get_family("mlp").build(Shape(64, 9), SPEC, {})
    with pytest.raises(ValueError, match="in the model but not the plan"):
        apply_transfer(deeper, plan.to_dict())


@pytest.mark.parametrize("rule,factor", [("sqrt", 2.0), ("linear", 4.0)])
def test_batch_rule_rescales_every_group_lr_and_is_labelled_heuristic(rule, factor):
    plain = plan_for("completep", tuned_batch_size=32, batch_size=128)
    scaled = plan_for("completep", tuned_batch_size=32, batch_size=128, batch_rule=rule)
    assert [g.lr for g in scaled.plan.groups] == pytest.approx([factor * g.lr for g in plain.plan.groups])
    assert scaled.batch_scaling["heuristic"] is True and scaled.batch_scaling["lr_factor"] == pytest.approx(factor)
    assert any("heuristic" in w for w in scaled.warnings)
    assert plain.batch_scaling is None
    assert any("batch size differs" in w for w in plain.warnings)
    assert scaled.plan.hparams["lr"] == 0.01  # tuned values stay in base units


def test_batch_rule_needs_both_batch_sizes_and_a_known_rule():
    with pytest.raises(ValueError, match="tuned_batch_size and batch_size"):
        plan_for("mup", batch_size=64, batch_rule="sqrt")
    with pytest.raises(ValueError, match="unknown batch_rule"):
        plan_for("mup", tuned_batch_size=32, batch_size=64, batch_rule="cubic")


def test_untransferred_axes_warn_only_when_they_change():
    same = plan_for("completep", tuned_batch_size=32, batch_size=32, tuned_steps=100, steps=100,
                    tuned_seq_len=64, seq_len=64)
    assert same.warnings == []
    changed = plan_for("completep", tuned_batch_size=32, batch_size=64, tuned_steps=100, steps=1000,
                       tuned_seq_len=64, seq_len=256)
    text = " ".join(changed.warnings)
    assert "batch size" in text and "steps" in text and "sequence length" in text
    assert [g.lr for g in changed.plan.groups] == [g.lr for g in same.plan.groups]


def test_parametrizations_that_do_not_transfer_an_axis_warn():
    assert any("depth changes" in w for w in plan_for("mup").warnings)
    sp = " ".join(plan_for("sp").warnings)
    assert "width changes" in sp and "depth changes" in sp
    wide_only = transfer_plan("mlp", SPEC, {}, BASE, Shape(64, 2), "mup", HP)
    assert wide_only.warnings == []


def test_provenance_keeps_the_callers_fields_and_adds_the_version():
    plan = plan_for("mup", provenance={"study_id": "s1", "best_trial": 7, "value": 1.25})
    assert plan.provenance["study_id"] == "s1" and plan.provenance["best_trial"] == 7
    assert plan.provenance["scaletune_version"]


def test_billion_parameter_gpt_is_planned_in_under_a_second_without_allocating():
    spec = DataSpec(task="lm", input_shape=(1024,), num_outputs=50304)
    args = {"head_dim": 128}
    transfer_plan("gpt", spec, args, Shape(256, 4), Shape(512, 8), "completep", HP)  # warm up lazy imports
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()  # CPU time: other processes on a shared machine do not count against us
    plan = transfer_plan("gpt", spec, args, Shape(256, 4), Shape(4096, 48), "completep", HP)
    elapsed = time.process_time() - started
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert sum(g.numel for g in plan.plan.groups) > 9e9
    assert elapsed < 1.0
    assert rss_growth_mib < 100  # the target's weights alone would be ~40 GB in fp32


def test_the_clipping_rule_travels_with_the_plan():
    assert plan_for("mup").to_dict()["grad_clip"] == {"rule": "off"}  # the default never confounds a check
    plan = plan_for("mup", options=ParamOptions(grad_clip="relative", grad_clip_factor=3.0))
    assert plan.to_dict()["grad_clip"] == {"rule": "relative", "factor": 3.0}
    loaded = TransferPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert loaded.plan.grad_clip == {"rule": "relative", "factor": 3.0}


def test_depth_mup_with_two_layer_blocks_warns_with_the_measurement_and_points_to_completep():
    (warning,) = [w for w in plan_for("depth_mup").warnings if "depth^-1/2" in w]
    assert "+0.56" in warning and "+0.60" in warning and "docs/benchmarks.md" in warning
    assert "'completep'" in warning and "2 layers" in warning
    assert "-0.32" in warning and "-0.77" in warning and "+0.44" in warning  # the ResNet at 40, 80, 160 steps
    assert not any("depth^-1/2" in w for w in plan_for("completep").warnings)
    same_depth = transfer_plan("mlp", SPEC, {}, BASE, Shape(64, 2), "depth_mup", HP)
    assert not any("depth^-1/2" in w for w in same_depth.warnings)  # no depth transfer, nothing to warn about
    overridden = plan_for("completep", options=ParamOptions(alpha=0.5))
    assert any("depth^-1/2" in w for w in overridden.warnings)


def test_block_layers_counts_the_weight_matrices_of_one_residual_block():
    mlp = classify(family_factory(get_family("mlp"), TARGET, SPEC, {}), BASE, TARGET)
    gpt = classify(family_factory(get_family("gpt"), TARGET, LM_SPEC, {"head_dim": 8}), BASE, TARGET)
    assert mlp.block_layers == 2 and gpt.block_layers == 4
