"""Deterministic batches from data held in memory: shuffled classification examples and byte windows."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from scaletune.data.base import DataError, DataSpec


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


def shuffled_index_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless full batches of indices, reshuffled every epoch, carrying over across epoch ends."""
    check_batch_size(batch_size)
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def fixed_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """x and y in order, in batches of batch_size (the last may be shorter)."""
    check_batch_size(batch_size)
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class ArrayDataset:
    """Classification examples in memory; ``prepare`` turns a stored x batch into model input
    (so large uint8 image sets stay uint8 in memory)."""

    def __init__(
        self,
        spec: DataSpec,
        train: tuple[torch.Tensor, torch.Tensor],
        eval_: tuple[torch.Tensor, torch.Tensor],
        prepare: Callable[[torch.Tensor], torch.Tensor] = _unchanged,
    ) -> None:
        self.spec = spec
        self._train_x, self._train_y = train
        self._eval_x, self._eval_y = eval_
        self._prepare = prepare

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in shuffled_index_batches(len(self._train_y), batch_size, seed):
            yield self._prepare(self._train_x[idx]), self._train_y[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in fixed_batches(self._eval_x, self._eval_y, batch_size):
            yield self._prepare(x), y


class ByteWindowsDataset:
    """Byte-level language modelling: x is a window of seq_len bytes, y the same window one byte later.

    Train windows start at uniformly random offsets; eval windows are ``eval_windows`` fixed, evenly spaced ones.
    """

    def __init__(self, source: str, train: torch.Tensor, eval_: torch.Tensor, seq_len: int, eval_windows: int) -> None:
        for split, data in (("train", train), ("eval", eval_)):
            if len(data) < seq_len + 1:
                raise DataError(
                    f"{source}: the {split} split has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                    "use more text or a smaller seq_len"
                )
        self.spec = DataSpec(task="lm", input_shape=(seq_len,), num_outputs=256)
        self._train = train
        self._offsets = torch.arange(seq_len + 1)
        eval_starts = torch.linspace(0, len(eval_) - seq_len - 1, eval_windows).long()
        self._eval = eval_[eval_starts[:, None] + self._offsets].long()

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_batch_size(batch_size)
        generator = torch.Generator().manual_seed(seed)
        last_start = len(self._train) - len(self._offsets)
        while True:
            starts = torch.randint(0, last_start + 1, (batch_size,), generator=generator)
            windows = self._train[starts[:, None] + self._offsets].long()
            yield windows[:, :-1], windows[:, 1:]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for windows, _ in fixed_batches(self._eval, self._eval, batch_size):
            yield windows[:, :-1], windows[:, 1:]
