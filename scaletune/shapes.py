"""Model shapes: the size knobs that change between proxy and target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Shape:
    """Width (model dim / channels), depth (residual blocks), for ViT patch size, for GPT the context length
    attention spans (None: the whole sequence)."""

    width: int
    depth: int
    patch_size: int | None = None
    context: int | None = None

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width}")
        if self.depth < 1:
            raise ValueError(f"depth must be a positive integer, got {self.depth}")
        for name in ("patch_size", "context"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")

    def with_(self, **changes: Any) -> Shape:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shape:
        return cls(width=int(d["width"]), depth=int(d["depth"]),
                   **{name: None if d.get(name) is None else int(d[name]) for name in ("patch_size", "context")})
