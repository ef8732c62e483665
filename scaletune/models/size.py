"""A family's model at a shape, for the parametrization core and for size limits: builder and parameter count.

Counting builds on the meta device, so nothing is allocated however large the shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models.base import ModelFamily
from scaletune.parametrize import Factory
from scaletune.shapes import Shape


def family_factory(family: ModelFamily, shape: Shape, spec: DataSpec, args: dict[str, Any]) -> Factory:
    """The ``(width, depth) -> model`` builder parametrize needs; other shape fields (patch size) stay the target's."""
    def factory(width: int, depth: int) -> nn.Module:
        return family.build(shape.with_(width=width, depth=depth), spec, args)
    return factory


def count_params(factory: Factory, shape: Shape) -> int:
    """Parameter count of the model at ``shape``, built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        model = factory(shape.width, shape.depth)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def params_by_depth(factory: Factory, shape: Shape) -> int:
    """Parameter count from one- and two-block models: blocks repeat, so it is affine in depth.

    Building a 100,000-block model even on the meta device takes a minute; a request must not.
    """
    one, two = count_params(factory, shape.with_(depth=1)), count_params(factory, shape.with_(depth=2))
    return one + (shape.depth - 1) * (two - one)
