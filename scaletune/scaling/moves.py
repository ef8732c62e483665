"""Which shape changes a schedule may make, over one axis or the product of several (joint schedules)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from scaletune.shapes import Shape

AXES = ("patch_size", "context", "width", "depth")


def product_shapes(base: Shape, axes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
    """Every combination of the given axis values on top of ``base``, named ``axis=value,axis=value``."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown or not axes:
        raise ValueError(f"axes must be some of {', '.join(AXES)}; got {sorted(axes) or 'none'}")
    names = list(axes)
    return {",".join(f"{a}={v}" for a, v in zip(names, combo)): base.with_(**dict(zip(names, combo)))
            for combo in itertools.product(*(axes[a] for a in names))}


def surgery_moves(shapes: Mapping[str, Shape], max_axes: int = 2,
                  max_width_factor: int | None = None) -> Callable[[str, str], bool]:
    """The moves surgery can make between named shapes, for ``ScheduleConstraints.allowed``.

    A move changes between 1 and ``max_axes`` axes at once; patch size and context may change either way (both
    in place), width only grows by a whole factor (at most ``max_width_factor``), depth only grows.
    """
    if max_axes < 1:
        raise ValueError(f"max_axes must be at least 1, got {max_axes}")

    def allowed(src: str, dst: str) -> bool:
        a, b = shapes[src], shapes[dst]
        changed = [axis for axis in AXES if getattr(a, axis) != getattr(b, axis)]
        if not 1 <= len(changed) <= max_axes or b.depth < a.depth:
            return False
        if b.width != a.width:
            factor, rest = divmod(b.width, a.width)
            return rest == 0 and factor > 1 and (max_width_factor is None or factor <= max_width_factor)
        return True

    return allowed
