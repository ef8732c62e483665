"""What every dataset provides: a description for model builders and deterministic batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Task = Literal["classification", "lm"]


@dataclass(frozen=True)
class DataSpec:
    """What a model family needs to know about its data.

    classification: x is float (B, *input_shape), y is int64 (B,) with num_outputs classes.
    lm: x and y are int64 (B, seq_len) tokens, y is x shifted by one; num_outputs is the vocab size.
    input_shape is (features,) for vectors, (C, H, W) for images, (seq_len,) for text.
    """

    task: Task
    input_shape: tuple[int, ...]
    num_outputs: int


class Dataset(Protocol):
    spec: DataSpec

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless, deterministic for a given seed."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out split, finite, same order every call."""
        ...
