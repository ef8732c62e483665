"""Synthetic classification labelled by a seeded random teacher network: unlimited data, no files.

The teacher is ``logits = tanh(x W1 + b1) W2`` with x ~ N(0, I). Labels are the argmax of the
logits, or, with ``temperature``, a sample from softmax(logits / temperature).
Weights, the eval set and each train stream come from distinct seeds derived from ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from scaletune.data.base import DatasetArgs, DatasetKind, DataSpec
from scaletune.data.batching import check_batch_size, fixed_batches

_WEIGHTS_STREAM, _EVAL_STREAM, _TRAIN_STREAM = 0, 1, 2


class TeacherArgs(DatasetArgs):
    seed: int = Field(default=0, ge=0)
    features: int = Field(default=32, ge=1)
    classes: int = Field(default=10, ge=2)
    teacher_width: int = Field(default=64, ge=1)
    temperature: float | None = Field(default=None, gt=0)
    eval_size: int = Field(default=2048, ge=1)


def derived_generator(*seeds: int) -> torch.Generator:
    """A torch generator whose stream depends on every seed given, so streams never coincide."""
    state = np.random.SeedSequence(list(seeds)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class TeacherDataset:
    def __init__(self, args: TeacherArgs) -> None:
        self.spec = teacher_spec(args, None)
        self._args = args
        g = derived_generator(args.seed, _WEIGHTS_STREAM)
        self._w1 = torch.randn(args.features, args.teacher_width, generator=g) / args.features**0.5
        self._b1 = 0.1 * torch.randn(args.teacher_width, generator=g)
        self._w2 = torch.randn(args.teacher_width, args.classes, generator=g) / args.teacher_width**0.5
        self._eval_x, self._eval_y = self._sample(args.eval_size, derived_generator(args.seed, _EVAL_STREAM))

    def _sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self._args.features, generator=g)
        logits = torch.tanh(x @ self._w1 + self._b1) @ self._w2
        if self._args.temperature is None:
            return x, logits.argmax(dim=1)
        probs = torch.softmax(logits / self._args.temperature, dim=1)
        return x, torch.multinomial(probs, 1, generator=g).squeeze(1)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_batch_size(batch_size)
        g = derived_generator(self._args.seed, _TRAIN_STREAM, seed)
        while True:
            yield self._sample(batch_size, g)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return fixed_batches(self._eval_x, self._eval_y, batch_size)


def teacher_spec(args: TeacherArgs, data_root: Path | None) -> DataSpec:
    return DataSpec(task="classification", input_shape=(args.features,), num_outputs=args.classes)


def load_teacher(args: TeacherArgs, data_root: Path | None) -> TeacherDataset:
    return TeacherDataset(args)


KIND = DatasetKind(name="teacher", args_model=TeacherArgs, spec=teacher_spec, load=load_teacher)
