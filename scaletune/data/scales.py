"""Generated grey images with structure at two scales, so ViT patch size and width trade off for real.

Each image is ``size x size`` pixels: one large Gaussian blob (std size/8) in one of four quadrants (the
coarse cue, visible through any patch size) and one small 5x5 glyph (plus, cross, ring or dot; the fine
cue) at a uniformly random position, plus white noise. The label is ``4 * quadrant + glyph`` (16 classes).
A big patch embeds p*p pixels into ``width`` dimensions: at p*p > width the embedding must compress, and
telling the glyphs apart at any of the p*p offsets inside a patch needs many filters, so a big-patch model
learns the blob fast and the glyph slowly; a small patch needs more tokens (more FLOPs per image) but no
compression. The train stream is unlimited (fresh images from a seeded generator), so curves follow
compute, not memorisation.

``fine="texture"`` swaps the glyph for a period-2 texture (checkerboard, vertical stripes, horizontal stripes or
none) in the image grid's phase, filling a random ``texture x texture`` square: almost all of its energy lies above
the frequencies a FlexiViT kernel upsampled from a smaller base patch can see (the PI-resized 16x16 kernel of an 8x8 base spans
bilinear upsamplings, to which a period-2 pattern is nearly orthogonal), so at patch 16 over base 8 the fine cue
is invisible and the loss cannot go below ln 4, while the base patch sees it in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from scaletune.data.base import DatasetArgs, DatasetKind, DataSpec
from scaletune.data.batching import check_batch_size, fixed_batches
from scaletune.data.teacher import derived_generator

QUADRANTS = 4
GLYPH = 5


def _glyphs() -> torch.Tensor:
    """The four 5x5 glyphs: plus, cross, ring, dot."""
    g = torch.zeros(4, GLYPH, GLYPH)
    g[0, 2, :] = g[0, :, 2] = 1.0
    g[1] = (torch.eye(GLYPH) + torch.eye(GLYPH).flip(1)).clamp(max=1.0)
    g[2, 0, :] = g[2, -1, :] = g[2, :, 0] = g[2, :, -1] = 1.0
    g[3, 1:4, 1:4] = 1.0
    return g


GLYPHS = _glyphs()
TEXTURES = 4  # checkerboard, vertical stripes, horizontal stripes, none
_EVAL_STREAM, _TRAIN_STREAM = 1, 2


class ScalesArgs(DatasetArgs):
    seed: int = Field(default=0, ge=0)
    size: int = Field(default=32, ge=32, multiple_of=8)
    glyph: float = Field(default=1.5, gt=0, description="amplitude of the fine cue (glyph or texture)")
    noise: float = Field(default=0.5, ge=0)
    eval_size: int = Field(default=2048, ge=1)
    fine: Literal["glyph", "texture"] = "glyph"
    texture: int = Field(default=16, ge=2, description="side of the textured square (fine='texture')")


def _textures(side: int) -> torch.Tensor:
    """(TEXTURES, side, side): the period-2 patterns, the last one empty."""
    i = torch.arange(side)
    rows, cols = torch.meshgrid(i, i, indexing="ij")
    return torch.stack([(-1.0) ** (rows + cols), (-1.0) ** cols, (-1.0) ** rows, torch.zeros(side, side)])


def _paste(pixels: torch.Tensor, patterns: torch.Tensor, top: torch.Tensor) -> None:
    """Adds patterns[k] (n, s, s) to each image at its top-left corner top[k] (n, 2), in place."""
    n, side = patterns.shape[0], patterns.shape[-1]
    offsets = torch.arange(side)
    r = (top[:, 0, None] + offsets)[:, :, None].expand(n, side, side)
    c = (top[:, 1, None] + offsets)[:, None, :].expand(n, side, side)
    pixels[torch.arange(n)[:, None, None], r, c] += patterns


def scales_images(args: ScalesArgs, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, size, size) and labels drawn with ``g``; pixels are about zero-mean, unit-variance."""
    size = args.size
    quadrant = torch.randint(0, QUADRANTS, (n,), generator=g)
    kind = torch.randint(0, len(GLYPHS), (n,), generator=g)  # len(GLYPHS) == TEXTURES: one label layout
    half = size / 2
    centre = torch.stack([(quadrant // 2).float(), (quadrant % 2).float()], dim=1) * half + half / 2
    centre = centre + (torch.rand(n, 2, generator=g) - 0.5) * half / 2
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    dy, dx = rows[None] - centre[:, 0, None, None], cols[None] - centre[:, 1, None, None]
    blob = 2.0 * torch.exp(-(dx**2 + dy**2) / (2 * (size / 8) ** 2))
    pixels = blob - blob.mean(dim=(1, 2), keepdim=True) + args.noise * torch.randn(n, size, size, generator=g)
    if args.fine == "glyph":
        _paste(pixels, args.glyph * GLYPHS[kind], torch.randint(0, size - GLYPH + 1, (n, 2), generator=g))
    else:  # the texture keeps the image grid's phase wherever the square lies
        side = min(args.texture, size)
        square = torch.zeros(n, size, size)
        _paste(square, torch.ones(n, side, side), torch.randint(0, size - side + 1, (n, 2), generator=g))
        pixels += args.glyph * _textures(size)[kind] * square
    return pixels.unsqueeze(1), quadrant * len(GLYPHS) + kind


class ScalesDataset:
    def __init__(self, args: ScalesArgs) -> None:
        self.spec = scales_spec(args, None)
        self._args = args
        self._eval_x, self._eval_y = scales_images(args, args.eval_size, derived_generator(args.seed, _EVAL_STREAM))

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_batch_size(batch_size)
        g = derived_generator(self._args.seed, _TRAIN_STREAM, seed)
        while True:
            yield scales_images(self._args, batch_size, g)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return fixed_batches(self._eval_x, self._eval_y, batch_size)


def scales_spec(args: ScalesArgs, data_root: Path | None) -> DataSpec:
    return DataSpec(task="classification", input_shape=(1, args.size, args.size),
                    num_outputs=QUADRANTS * len(GLYPHS))


def load_scales(args: ScalesArgs, data_root: Path | None) -> ScalesDataset:
    return ScalesDataset(args)


KIND = DatasetKind(name="scales", args_model=ScalesArgs, spec=scales_spec, load=load_scales)
