"""scikit-learn's bundled 8x8 digits (1797 images, shipped inside the package, nothing downloaded).

Images are (1, 8, 8) by default; the mlp family flattens images itself, so ``flatten`` is only for
models that want (64,) vectors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from scaletune.data.base import DatasetArgs, DatasetKind, DataSpec
from scaletune.data.batching import ArrayDataset

SPLIT_SEED = 0
EVAL_FRACTION = 0.2


class DigitsArgs(DatasetArgs):
    flatten: bool = False


@lru_cache(maxsize=1)
def _standardised_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified 80/20 split with a fixed seed; pixels standardised by the train set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_eval, y_train, y_eval = train_test_split(
        digits.data, digits.target, test_size=EVAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    mean, std = x_train.mean(), x_train.std()
    return (
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(((x_eval - mean) / std).astype(np.float32)),
        torch.from_numpy(y_eval.astype(np.int64)),
    )


def digits_spec(args: DigitsArgs, data_root: Path | None) -> DataSpec:
    return DataSpec(task="classification", input_shape=(64,) if args.flatten else (1, 8, 8), num_outputs=10)


def load_digits_dataset(args: DigitsArgs, data_root: Path | None) -> ArrayDataset:
    spec = digits_spec(args, data_root)
    x_train, y_train, x_eval, y_eval = _standardised_split()
    return ArrayDataset(
        spec, (x_train.reshape(-1, *spec.input_shape), y_train), (x_eval.reshape(-1, *spec.input_shape), y_eval)
    )


KIND = DatasetKind(name="digits", args_model=DigitsArgs, spec=digits_spec, load=load_digits_dataset)
