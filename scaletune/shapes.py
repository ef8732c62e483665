"""Model shapes: the size knobs that change between proxy and target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Shape:
    """Width (model dim / channels), depth (residual blocks) and, for ViT, patch size."""

    width: int
    depth: int
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width}")
        if self.depth < 1:
            raise ValueError(f"depth must be a positive integer, got {self.depth}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size}")

    def with_(self, **changes: Any) -> Shape:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shape:
        return cls(width=int(d["width"]), depth=int(d["depth"]),
                   patch_size=None if d.get("patch_size") is None else int(d["patch_size"]))
