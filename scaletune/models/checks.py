"""Argument and data checks shared by the built-in families, so every family rejects bad input the same way."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from scaletune.data.base import DataSpec, Task
from scaletune.shapes import Shape

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_known_args(family: str, args: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"unknown args {unknown} for model family {family!r}; allowed args are {sorted(allowed)}")


def check_task(family: str, data: DataSpec, task: Task) -> None:
    if data.task != task:
        raise ValueError(f"model family {family!r} needs a dataset with task {task!r}, but this dataset's task is "
                         f"{data.task!r}; pick another dataset or another family")


def image_shape(family: str, data: DataSpec) -> tuple[int, int, int]:
    """(C, H, W) of an image dataset."""
    if len(data.input_shape) != 3:
        raise ValueError(f"model family {family!r} needs images of shape (C, H, W), but the dataset's inputs have "
                         f"shape {tuple(data.input_shape)}; use an image dataset or the 'mlp' family")
    channels, height, width = data.input_shape
    return channels, height, width


SHAPE_FIELD_OWNERS = {"patch_size": "vit", "context": "gpt"}  # shape fields only one family reads


def check_shape_fields(family: str, shape: Shape) -> None:
    """Refuse a patch size or context on a family that would silently ignore it."""
    for name, owner in SHAPE_FIELD_OWNERS.items():
        if getattr(shape, name) is not None and family != owner:
            raise ValueError(f"{name} applies only to the {owner!r} family; remove it from the {family!r} shape")


def positive_int_arg(family: str, args: dict[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"arg {key!r} of model family {family!r} must be a positive integer, got {value!r}")
    return value


def bool_arg(family: str, args: dict[str, Any], key: str, default: bool) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"arg {key!r} of model family {family!r} must be true or false, got {value!r}")
    return value


def activation_arg(family: str, args: dict[str, Any], default: str = "gelu") -> str:
    value = args.get("activation", default)
    if value not in ACTIVATIONS:
        raise ValueError(f"arg 'activation' of model family {family!r} must be one of {sorted(ACTIVATIONS)}, "
                         f"got {value!r}")
    return value


def check_heads(width: int, head_dim: int) -> None:
    if width % head_dim:
        raise ValueError(f"width {width} is not divisible by head_dim {head_dim}; choose a multiple of {head_dim}")
