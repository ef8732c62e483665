"""The data contracts: what every dataset provides (a spec, deterministic batches) and how one is named and built."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

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


class DataError(ValueError):
    """A dataset cannot be built from what was asked; the message says what to change."""


class DatasetArgs(BaseModel):
    """Base for a dataset's arguments: unknown keys and loosely typed values are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


A = TypeVar("A", bound=DatasetArgs)


@dataclass(frozen=True)
class DatasetKind(Generic[A]):
    """A named dataset: its argument model, a cheap spec and the loader (what an entry point must export)."""

    name: str
    args_model: type[A]
    spec: Callable[[A, Path | None], DataSpec]
    load: Callable[[A, Path | None], Dataset]
