"""Model families by name: the built-ins plus Python entry points in group ``scaletune.families``.

Names are looked up in this fixed registry only; nothing is ever imported from a path a user supplies.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from scaletune.models.base import ModelFamily
from scaletune.models.gpt import GPT_FAMILY
from scaletune.models.mlp import MLP_FAMILY
from scaletune.models.resnet import RESNET_FAMILY
from scaletune.models.vit import VIT_FAMILY

ENTRY_POINT_GROUP = "scaletune.families"
BUILTIN_FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (MLP_FAMILY, RESNET_FAMILY, VIT_FAMILY, GPT_FAMILY)}
_PROTOCOL_METHODS = ("validate", "build", "train_flops_per_sample")


def _plugins() -> dict[str, EntryPoint]:
    """Installed plugin families; a plugin cannot shadow a built-in name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_FAMILIES}


def family_names() -> list[str]:
    return sorted({*BUILTIN_FAMILIES, *_plugins()})


def get_family(name: str) -> ModelFamily:
    if name in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[name]
    plugin = _plugins().get(name)
    if plugin is None:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(family_names())}")
    family = plugin.load()
    missing = [m for m in _PROTOCOL_METHODS if not callable(getattr(family, m, None))]
    if missing:
        raise ValueError(f"entry point {name!r} ({plugin.value}) in group {ENTRY_POINT_GROUP!r} is not a model "
                         f"family: it lacks {missing}")
    return family
