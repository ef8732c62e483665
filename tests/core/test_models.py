"""The built-in model families: shapes, conventions the parametrization relies on, validation and the registry."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models import family_names, get_family, registry
from scaletune.models.patch_embed import FlexiPatchEmbed
from scaletune.models.size import count_params, family_factory, params_by_depth
from scaletune.models.transformer import SelfAttention
from scaletune.shapes import Shape

DIGITS = DataSpec("classification", (1, 8, 8), 10)
VECTORS = DataSpec("classification", (64,), 10)
PYTEXT = DataSpec("lm", (64,), 256)
SMALL = Shape(width=32, depth=2)

# (family, data, args): every family on its natural data, plus the variants that change the architecture
CASES: list[tuple[str, DataSpec, dict[str, Any]]] = [
    ("mlp", VECTORS, {}),
    ("mlp", DIGITS, {"activation": "relu", "expansion": 2}),
    ("resnet", DIGITS, {}),
    ("resnet", DIGITS, {"strides": [1, 1, 2]}),
    ("vit", DIGITS, {}),
    ("vit", DIGITS, {"base_patch": 2, "head_dim": 8, "mlp_ratio": 2}),
    ("gpt", PYTEXT, {}),
    ("gpt", PYTEXT, {"tie_embeddings": True}),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def sample_inputs(data: DataSpec, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if data.task == "lm":
        return torch.randint(0, data.num_outputs, (batch, *data.input_shape), generator=gen)
    return torch.randn(batch, *data.input_shape, generator=gen)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_four_built_in_families_are_registered() -> None:
    assert {"mlp", "resnet", "vit", "gpt"} <= set(family_names())
    for name in ("mlp", "resnet", "vit", "gpt"):
        assert get_family(name).name == name


@pytest.mark.parametrize(("name", "data", "args"), CASES, ids=IDS)
def test_forward_gives_one_output_per_class_or_token(name: str, data: DataSpec, args: dict[str, Any]) -> None:
    model = get_family(name).build(SMALL, data, args).eval()
    out = model(sample_inputs(data))
    expected = (3, 64, 256) if data.task == "lm" else (3, 10)
    assert out.shape == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "data", "args"), CASES, ids=IDS)
def test_builds_on_the_meta_device_without_allocating(name: str, data: DataSpec, args: dict[str, Any]) -> None:
    with torch.device("meta"):
        model = get_family(name).build(Shape(width=4096, depth=48), data, args)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(("name", "data", "args"), CASES, ids=IDS)
def test_params_grow_linearly_in_depth_and_quadratically_in_width(name: str, data: DataSpec,
                                                                  args: dict[str, Any]) -> None:
    family = get_family(name)

    def count(width: int, depth: int) -> int:
        with torch.device("meta"):
            return n_params(family.build(Shape(width, depth), data, args))

    per_block = count(32, 3) - count(32, 2)
    assert per_block > 0
    assert count(32, 5) - count(32, 3) == 2 * per_block
    wide_per_block = count(64, 3) - count(64, 2)
    assert 3.8 < wide_per_block / per_block <= 4.0  # weight matrices dominate, biases and norms are linear


@pytest.mark.parametrize(("name", "data", "args"), CASES, ids=IDS)
def test_residual_branches_are_scaled_by_branch_mult(name: str, data: DataSpec, args: dict[str, Any]) -> None:
    """With every branch_mult at 0, nothing inside a residual branch can change the output."""
    model = get_family(name).build(SMALL, data, args).eval()
    blocks = [m for m in model.modules() if isinstance(getattr(m, "branch_mult", None), float)]
    assert len(blocks) == SMALL.depth * (3 if name == "resnet" else 1)
    x = sample_inputs(data)
    before = model(x)
    for block in blocks:
        block.branch_mult = 0.0
    without_branches = model(x)
    assert not torch.allclose(before, without_branches)
    with torch.no_grad():
        for block in blocks:
            for param_name, param in block.named_parameters():
                if not param_name.startswith("shortcut"):
                    param.add_(torch.randn_like(param))
    assert torch.allclose(model(x), without_branches)


@pytest.mark.parametrize(("name", "data"), [("vit", DIGITS), ("gpt", PYTEXT)])
def test_attention_modules_follow_the_convention(name: str, data: DataSpec) -> None:
    model = get_family(name).build(Shape(48, 2), data, {})
    attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(attention) == 2
    for attn in attention:
        assert attn.head_dim == 16 and attn.heads == 3
        assert isinstance(attn.attn_scale, float) and attn.attn_scale == pytest.approx(0.25)
        attn.zero_query_()
        assert attn.qkv.weight[:48].abs().sum() == 0 and attn.qkv.bias[:48].abs().sum() == 0
        assert attn.qkv.weight[48:].abs().sum() > 0


def test_attn_scale_is_the_logit_scale() -> None:
    """Scaling the logits by 0 makes attention uniform: each position outputs proj(mean of values)."""
    attn = SelfAttention(width=32, head_dim=16, causal=False)
    attn.attn_scale = 0.0
    x = torch.randn(2, 5, 32)
    values = attn.qkv(x)[..., 64:]
    expected = attn.proj(values.mean(dim=1, keepdim=True)).expand(-1, 5, -1)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_gpt_is_causal() -> None:
    model = get_family("gpt").build(SMALL, PYTEXT, {}).eval()
    x = sample_inputs(PYTEXT)
    changed = x.clone()
    changed[:, 40] = (changed[:, 40] + 1) % PYTEXT.num_outputs
    before, after = model(x), model(changed)
    assert torch.allclose(before[:, :40], after[:, :40], atol=1e-6)
    assert not torch.allclose(before[:, 40:], after[:, 40:])


def test_gpt_tied_embeddings_share_storage() -> None:
    tied = get_family("gpt").build(SMALL, PYTEXT, {"tie_embeddings": True})
    assert tied.lm_head.weight is tied.wte.weight
    untied = get_family("gpt").build(SMALL, PYTEXT, {})
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert n_params(untied) - n_params(tied) == PYTEXT.num_outputs * SMALL.width


def test_vit_patch_size_changes_without_touching_parameters() -> None:
    data = DataSpec("classification", (3, 12, 12), 10)
    model = get_family("vit").build(SMALL, data, {"base_patch": 3}).eval()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    x = sample_inputs(data)
    tokens = []
    model.patch_embed.register_forward_hook(lambda m, a, out: tokens.append(out.shape[1]))
    for patch in (3, 2, 4, 6):
        model.set_patch_size(patch)
        assert model(x).shape == (3, 10)
    assert tokens == [16, 36, 9, 4]
    for name, param in model.named_parameters():
        assert param.data_ptr() == before[name][0] and torch.equal(param, before[name][1])
    with pytest.raises(ValueError, match="patch_size 5 does not divide the 12x12 image"):
        model.set_patch_size(5)


def test_vit_shape_patch_size_picks_the_patch_but_not_the_parameters() -> None:
    family = get_family("vit")
    coarse = family.build(Shape(32, 2, patch_size=4), DIGITS, {"base_patch": 2})
    fine = family.build(Shape(32, 2), DIGITS, {"base_patch": 2})
    assert (coarse.patch_size, fine.patch_size) == (4, 2)
    assert {n: p.shape for n, p in coarse.named_parameters()} == {n: p.shape for n, p in fine.named_parameters()}


@pytest.mark.parametrize("patch", [4, 6, 7])
def test_pi_resize_is_exact_for_upsampled_patches(patch: int) -> None:
    """FlexiViT: for x' = B x (bilinear upsampling), <x', PI-resize(w)> == <x, w>."""
    embed = FlexiPatchEmbed(in_channels=3, width=8, base_patch=2)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    upsampled = F.interpolate(x, size=(patch, patch), mode="bilinear", align_corners=False)
    embed.double()
    assert torch.allclose(embed(upsampled, patch), embed(x, 2), atol=1e-10)
    naive = F.interpolate(embed.weight, size=(patch, patch), mode="bilinear", align_corners=False)
    assert not torch.allclose(F.conv2d(upsampled, naive, embed.bias, stride=patch).flatten(1), embed(x, 2).flatten(1))


def test_mlp_flattens_images_into_features() -> None:
    model = get_family("mlp").build(SMALL, DIGITS, {})
    assert model.embed.in_features == 64


@pytest.mark.parametrize(("name", "shape", "data", "args", "message"), [
    ("vit", Shape(100, 2), DIGITS, {}, "width 100 is not divisible by head_dim 16; choose a multiple of 16"),
    ("gpt", Shape(40, 2), PYTEXT, {"head_dim": 16}, "width 40 is not divisible by head_dim 16"),
    ("vit", Shape(32, 2, patch_size=3), DIGITS, {},
     r"patch_size 3 does not divide the 8x8 image; choose one of \[1, 2, 4, 8\]"),
    ("vit", SMALL, DIGITS, {"base_patch": 3}, "base_patch 3 does not divide the 8x8 image"),
    ("gpt", SMALL, DIGITS, {}, "needs a dataset with task 'lm', but this dataset's task is 'classification'"),
    ("mlp", SMALL, PYTEXT, {}, "needs a dataset with task 'classification'"),
    ("resnet", SMALL, VECTORS, {}, r"needs images of shape \(C, H, W\)"),
    ("mlp", SMALL, VECTORS, {"dropout": 0.1}, r"unknown args \['dropout'\] for model family 'mlp'; allowed args are"),
    ("mlp", SMALL, VECTORS, {"activation": "tanh"}, r"must be one of \['gelu', 'relu'\]"),
    ("mlp", SMALL, VECTORS, {"expansion": 0}, "'expansion' of model family 'mlp' must be a positive integer"),
    ("resnet", SMALL, DIGITS, {"strides": [1, 2]}, "'strides' of model family 'resnet' must be 3 positive integers"),
    ("resnet", Shape(32, 2, patch_size=2), DIGITS, {}, "patch_size applies only to the 'vit' family"),
    ("vit", Shape(32, 2, context=4), DIGITS, {}, "context applies only to the 'gpt' family"),
    ("gpt", Shape(32, 2, context=24), PYTEXT, {},
     r"context 24 does not divide the dataset's sequence length 64; choose one of \[1, 2, 4, 8, 16, 32, 64\]"),
    ("gpt", SMALL, PYTEXT, {"tie_embeddings": "yes"}, "must be true or false"),
])
def test_validate_explains_what_to_change(name: str, shape: Shape, data: DataSpec, args: dict[str, Any],
                                          message: str) -> None:
    family = get_family(name)
    with pytest.raises(ValueError, match=message):
        family.validate(shape, data, args)
    with pytest.raises(ValueError, match=message):
        family.build(shape, data, args)


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'transformerxl'; known families: gpt, mlp, resnet, vit"):
        get_family("transformerxl")


def _plugins(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    eps = [EntryPoint(name=n, value=v, group=registry.ENTRY_POINT_GROUP) for n, v in values.items()]
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep for ep in eps if ep.group == group])


def test_entry_point_families_are_found_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, wide_mlp="scaletune.models.mlp:MLP_FAMILY")
    assert "wide_mlp" in family_names()
    assert get_family("wide_mlp") is registry.BUILTIN_FAMILIES["mlp"]


def test_entry_points_cannot_shadow_built_ins_or_be_other_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    _plugins(monkeypatch, gpt="scaletune.models.mlp:MLP_FAMILY", broken="scaletune.models.mlp:NAME")
    assert get_family("gpt").name == "gpt"
    with pytest.raises(ValueError, match="entry point 'broken'.*is not a model family"):
        get_family("broken")


@pytest.mark.parametrize(("name", "data", "args"), CASES, ids=IDS)
def test_a_family_counts_its_parameters_exactly_without_building_every_block(name: str, data: DataSpec,
                                                                            args: dict[str, Any]) -> None:
    shape = SMALL.with_(depth=5)
    factory = family_factory(get_family(name), shape, data, args)
    real = n_params(factory(shape.width, shape.depth))  # a tied readout counts once, as in the real model
    assert count_params(factory, shape) == real
    assert params_by_depth(factory, shape) == real
