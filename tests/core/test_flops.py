"""Analytic training FLOPs agree with PyTorch's own FLOP counter (forward x 3) for every family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaletune.data.base import DataSpec
from scaletune.models import get_family
from scaletune.shapes import Shape

DIGITS = DataSpec("classification", (1, 8, 8), 10)
CIFAR_LIKE = DataSpec("classification", (3, 16, 16), 10)
VECTORS = DataSpec("classification", (64,), 10)
PYTEXT = DataSpec("lm", (64,), 256)
BATCH = 4

CASES: list[tuple[str, Shape, DataSpec, dict[str, Any]]] = [
    ("mlp", Shape(32, 2), VECTORS, {}),
    ("mlp", Shape(48, 3), DIGITS, {"expansion": 4}),
    ("resnet", Shape(16, 1), CIFAR_LIKE, {}),
    ("resnet", Shape(32, 2), DIGITS, {"strides": [1, 1, 2]}),
    ("vit", Shape(32, 2), DIGITS, {}),
    ("vit", Shape(48, 3, patch_size=4), CIFAR_LIKE, {"base_patch": 2, "mlp_ratio": 2}),
    ("gpt", Shape(32, 2), PYTEXT, {}),
    ("gpt", Shape(32, 2, context=16), PYTEXT, {}),
    ("gpt", Shape(48, 3), DataSpec("lm", (128,), 512), {"tie_embeddings": True, "head_dim": 8}),
]


def counted_train_flops_per_sample(name: str, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
    model = get_family(name).build(shape, data, args).eval()
    if data.task == "lm":
        x = torch.randint(0, data.num_outputs, (BATCH, *data.input_shape))
    else:
        x = torch.randn(BATCH, *data.input_shape)
    # On CPU the fused SDPA kernels are invisible to FlopCounterMode; the math backend runs QK^T and AV as bmm.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / BATCH


@pytest.mark.parametrize(("name", "shape", "data", "args"), CASES,
                         ids=[f"{c[0]}-{c[1].width}x{c[1].depth}{f'-ctx{c[1].context}' if c[1].context else ''}"
                              for c in CASES])
def test_analytic_flops_match_the_flop_counter(name: str, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
    analytic = get_family(name).train_flops_per_sample(shape, data, args)
    assert analytic == pytest.approx(counted_train_flops_per_sample(name, shape, data, args), rel=0.02)


def test_attention_flops_grow_quadratically_with_sequence_length() -> None:
    gpt = get_family("gpt")
    shape = Shape(32, 2)

    def flops(seq_len: int) -> float:
        return gpt.train_flops_per_sample(shape, DataSpec("lm", (seq_len,), 256), {})

    # linear-in-T terms cancel in the second difference, leaving 3 x depth x 4 T^2 d
    second_difference = flops(192) - 2 * flops(128) + flops(64)
    assert second_difference == pytest.approx(3 * 2 * 4 * shape.width * (192**2 - 2 * 128**2 + 64**2))


def test_smaller_vit_patches_cost_more() -> None:
    vit = get_family("vit")
    costs = [vit.train_flops_per_sample(Shape(32, 2, patch_size=p), CIFAR_LIKE, {"base_patch": 4}) for p in (8, 4, 2)]
    assert costs[0] < costs[1] < costs[2]
