"""Datasets by name: the built-ins plus those installed under the ``scaletune.datasets`` entry point group.

A request names a dataset and passes JSON args; this module is the only way from that name to code,
so nothing in a request is ever imported or evaluated.
"""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from scaletune.data import digits, files, pytext, scales, teacher
from scaletune.data.base import DataError, Dataset, DatasetArgs, DatasetKind, DataSpec

ENTRY_POINT_GROUP = "scaletune.datasets"
BUILTIN_KINDS: dict[str, DatasetKind[Any]] = {
    kind.name: kind for kind in (digits.KIND, teacher.KIND, scales.KIND, pytext.KIND, files.NPZ, files.TEXT, files.CIFAR10)}
A = TypeVar("A", bound=DatasetArgs)


@lru_cache(maxsize=1)
def _plugin_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugins by name; a plugin cannot shadow a built-in."""
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in installed if ep.name not in BUILTIN_KINDS}


def dataset_names() -> list[str]:
    """Every dataset name a request may use, sorted."""
    return sorted({*BUILTIN_KINDS, *_plugin_entry_points()})


def _kind(name: str) -> DatasetKind[Any]:
    builtin = BUILTIN_KINDS.get(name)
    if builtin is not None:
        return builtin
    entry_point = _plugin_entry_points().get(name)
    if entry_point is None:
        raise DataError(f"unknown dataset {name!r}; available datasets: {', '.join(dataset_names())}")
    kind = entry_point.load()
    if not isinstance(kind, DatasetKind) or kind.name != name:
        raise DataError(
            f"the plugin dataset {name!r} ({entry_point.value}) does not export a DatasetKind named {name!r}"
        )
    return kind


def describe_args(args_model: type[DatasetArgs]) -> str:
    """The allowed arguments as a person reads them: ``name (type, default ...)``."""
    parts = []
    for field_name, field in args_model.model_fields.items():
        type_name = getattr(field.annotation, "__name__", None) or str(field.annotation)
        default = "required" if field.is_required() else f"default {field.default!r}"
        parts.append(f"{field_name} ({type_name}, {default})")
    return "; ".join(parts) if parts else "none"


def _parse_args(kind: DatasetKind[A], args: dict[str, Any]) -> A:
    try:
        return kind.args_model(**args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in exc.errors()
        )
        raise DataError(
            f"invalid args for dataset {kind.name!r}: {problems}. Allowed args: {describe_args(kind.args_model)}"
        ) from None


def _as_path(data_root: Path | str | None) -> Path | None:
    return None if data_root is None else Path(data_root)


def dataset_spec(name: str, args: dict[str, Any], data_root: Path | str | None = None) -> DataSpec:
    """The DataSpec without loading the data (reads at most file headers); validates name, args and paths."""
    kind = _kind(name)
    return kind.spec(_parse_args(kind, args), _as_path(data_root))


def get_dataset(name: str, args: dict[str, Any], data_root: Path | str | None = None) -> Dataset:
    """Load a dataset by name; user files are read only from under ``data_root``."""
    kind = _kind(name)
    return kind.load(_parse_args(kind, args), _as_path(data_root))
