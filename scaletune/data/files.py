"""Datasets from the user's own files (npz arrays, UTF-8 text, CIFAR-10 python batches), read only under the data root.

Paths in args are relative to the data root the server was configured with; anything that resolves outside
it (``..``, an absolute path elsewhere, a symlink pointing out) is refused, so a request cannot read other files.
Pickles are read with an unpickler that only rebuilds numpy arrays, never arbitrary objects.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from scaletune.data.base import DataError, DatasetArgs, DatasetKind, DataSpec
from scaletune.data.batching import ArrayDataset, ByteWindowsDataset

SPLIT_SEED = 0


def resolve_in_data_root(data_root: Path | None, path: str, kind: Literal["file", "folder"]) -> Path:
    """The real location of ``path`` (relative to the data root), refused unless it exists inside the root."""
    if data_root is None:
        raise DataError(
            f"cannot read {path!r}: no data root is configured, so user files are disabled; "
            "set the data root (the server's DATA_ROOT setting) to the folder holding your data"
        )
    root = data_root.resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root here; the check below catches it
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot resolve path {path!r} under the data root {root}: {exc}") from None
    if not resolved.is_relative_to(root):
        raise DataError(
            f"path {path!r} resolves to {resolved}, which is outside the data root {root}; "
            f"put the data under {root} and give its path relative to it"
        )
    exists = resolved.is_file() if kind == "file" else resolved.is_dir()
    if not exists:
        raise DataError(f"no {kind} at {path!r} (looked for {resolved}, under the data root {root})")
    return resolved


# ---- npz: arrays x (float, N x ...), y (integer labels, N), optional x_eval / y_eval ----


class NpzArgs(DatasetArgs):
    path: str = Field(min_length=1)
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)


@dataclass(frozen=True)
class NpzLayout:
    """What the headers and the labels say, checked before any example is loaded."""

    example_shape: tuple[int, ...]
    num_classes: int
    has_eval: bool


def _npy_header(archive: np.lib.npyio.NpzFile, name: str, shown: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from the member's header, without reading the array."""
    try:
        with archive.zip.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(member)
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{shown}: array {name!r} is unreadable ({exc}); write the file with numpy.savez") from None
    return shape, dtype


def _check_pair(
    archive: np.lib.npyio.NpzFile, x_name: str, y_name: str, shown: str, example_shape: tuple[int, ...] | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """Check x/y headers and label values; returns x's shape and the labels."""
    x_shape, x_dtype = _npy_header(archive, x_name, shown)
    y_shape, y_dtype = _npy_header(archive, y_name, shown)
    if x_dtype.kind != "f" or len(x_shape) < 2:
        raise DataError(
            f"{shown}: {x_name!r} must be a float array shaped (N, features...), such as float32 (N, 20) "
            f"or (N, 3, 32, 32); found {x_dtype} {x_shape}"
        )
    if x_shape[0] == 0:
        raise DataError(f"{shown}: {x_name!r} has no examples")
    if example_shape is not None and x_shape[1:] != example_shape:
        raise DataError(
            f"{shown}: {x_name!r} examples are {x_shape[1:]} but 'x' examples are {example_shape}; they must match"
        )
    if y_dtype.kind not in "iu" or y_shape != x_shape[:1]:
        raise DataError(
            f"{shown}: {y_name!r} must be an integer label array shaped ({x_shape[0]},) to match {x_name!r}; "
            f"found {y_dtype} {y_shape}"
        )
    labels = archive[y_name]
    if labels.size and labels.min() < 0:
        raise DataError(f"{shown}: {y_name!r} has negative labels; classes must be numbered 0..C-1")
    return x_shape, labels


def read_npz_layout(path: Path, shown: str) -> NpzLayout:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{shown} is not a readable .npz archive (write it with numpy.savez): {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{shown} holds a single array; expected an .npz archive with arrays 'x' and 'y' (numpy.savez)")
    with archive:
        names = set(archive.files)
        if not {"x", "y"} <= names or len(names & {"x_eval", "y_eval"}) == 1:
            raise DataError(
                f"{shown} must hold arrays 'x' and 'y', and optionally both 'x_eval' and 'y_eval'; "
                f"found {sorted(names)}"
            )
        x_shape, labels = _check_pair(archive, "x", "y", shown, None)
        has_eval = "x_eval" in names
        if has_eval:
            _, eval_labels = _check_pair(archive, "x_eval", "y_eval", shown, x_shape[1:])
            labels = np.concatenate([labels, eval_labels])
        elif x_shape[0] < 2:
            raise DataError(
                f"{shown} has {x_shape[0]} examples and no 'x_eval'; at least 2 are needed to split off eval"
            )
    return NpzLayout(example_shape=tuple(x_shape[1:]), num_classes=int(labels.max()) + 1, has_eval=has_eval)


def npz_spec(args: NpzArgs, data_root: Path | None) -> DataSpec:
    path = resolve_in_data_root(data_root, args.path, "file")
    layout = read_npz_layout(path, f"npz file {args.path!r}")
    return DataSpec(task="classification", input_shape=layout.example_shape, num_outputs=layout.num_classes)


def load_npz(args: NpzArgs, data_root: Path | None) -> ArrayDataset:
    path = resolve_in_data_root(data_root, args.path, "file")
    shown = f"npz file {args.path!r}"
    layout = read_npz_layout(path, shown)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files if name in ("x", "y", "x_eval", "y_eval")}
    for name in ("x", "x_eval"):
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise DataError(f"{shown}: {name!r} contains NaN or infinite values")
    x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if layout.has_eval:
        x_eval, y_eval = arrays["x_eval"].astype(np.float32), arrays["y_eval"].astype(np.int64)
    else:
        order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        n_eval = min(len(y) - 1, max(1, round(len(y) * args.eval_fraction)))
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        x, y, x_eval, y_eval = x[train_idx], y[train_idx], x[eval_idx], y[eval_idx]
    spec = DataSpec(task="classification", input_shape=layout.example_shape, num_outputs=layout.num_classes)
    return ArrayDataset(
        spec, (torch.from_numpy(x), torch.from_numpy(y)), (torch.from_numpy(x_eval), torch.from_numpy(y_eval))
    )


NPZ = DatasetKind(name="npz", args_model=NpzArgs, spec=npz_spec, load=load_npz)


# ---- text: one UTF-8 file, byte-level LM; the last eval_fraction of the bytes is eval ----


class TextArgs(DatasetArgs):
    path: str = Field(min_length=1)
    seq_len: int = Field(default=64, ge=1)
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)
    eval_windows: int = Field(default=256, ge=1)


def text_spec(args: TextArgs, data_root: Path | None) -> DataSpec:
    resolve_in_data_root(data_root, args.path, "file")
    return DataSpec(task="lm", input_shape=(args.seq_len,), num_outputs=256)


def load_text(args: TextArgs, data_root: Path | None) -> ByteWindowsDataset:
    data = resolve_in_data_root(data_root, args.path, "file").read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text file {args.path!r} is not UTF-8: {exc.reason} at byte {exc.start}; re-encode it as UTF-8"
        ) from None
    corpus = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    cut = len(corpus) - int(len(corpus) * args.eval_fraction)
    return ByteWindowsDataset(f"text file {args.path!r}", corpus[:cut], corpus[cut:], args.seq_len, args.eval_windows)


TEXT = DatasetKind(name="text", args_model=TextArgs, spec=text_spec, load=load_text)


# ---- cifar10: the python-pickle batch folder (data_batch_1..5, test_batch) ----

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_IMAGE_SHAPE = (3, 32, 32)
CIFAR_CLASSES = 10


class Cifar10Args(DatasetArgs):
    path: str = Field(min_length=1)
    max_train: int | None = Field(default=None, ge=1)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists and numpy arrays; refuses every other global, so a pickle cannot run code."""

    ALLOWED = frozenset(
        {
            ("_codecs", "encode"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        module = module.replace("numpy.core.", "numpy._core.", 1)  # pickles from numpy < 2
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _cifar_folder(args: Cifar10Args, data_root: Path | None) -> Path:
    folder = resolve_in_data_root(data_root, args.path, "folder")
    missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"cifar10 folder {args.path!r} ({folder}) lacks {', '.join(missing)}; expected the python version's "
            f"files {', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_TEST_FILE}"
        )
    return folder


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = NumpyOnlyUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'): {exc}"
        ) from None
    pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected b'data' uint8 (N, {pixels}) and N b'labels'; found {data.dtype} {data.shape} "
            f"and {labels.shape[0] if labels.ndim else 0} labels"
        )
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() >= CIFAR_CLASSES)):
        raise DataError(f"{path}: labels must be integers 0..{CIFAR_CLASSES - 1}")
    return data.reshape(-1, *CIFAR_IMAGE_SHAPE), labels.astype(np.int64)


def _channel_mean_std(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel statistics from pixel-value histograms, without a float copy of the images."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256)
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
        stds.append(max(std, 1.0))  # one grey level: a (near-)constant channel must not blow up
    shape = (1, len(means), 1, 1)
    return torch.tensor(means, dtype=torch.float32).view(shape), torch.tensor(stds, dtype=torch.float32).view(shape)


def _standardiser(mean: torch.Tensor, std: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def standardise(images: torch.Tensor) -> torch.Tensor:
        return (images.float() - mean) / std

    return standardise


def cifar10_spec(args: Cifar10Args, data_root: Path | None) -> DataSpec:
    _cifar_folder(args, data_root)
    return DataSpec(task="classification", input_shape=CIFAR_IMAGE_SHAPE, num_outputs=CIFAR_CLASSES)


def load_cifar10(args: Cifar10Args, data_root: Path | None) -> ArrayDataset:
    """Images stay uint8 in memory (a quarter of float32) and are standardised per batch with train statistics."""
    folder = _cifar_folder(args, data_root)
    train_parts = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    x_train = np.concatenate([x for x, _ in train_parts])
    y_train = np.concatenate([y for _, y in train_parts])
    if args.max_train is not None and args.max_train < len(y_train):
        keep = np.random.default_rng(SPLIT_SEED).permutation(len(y_train))[: args.max_train]
        x_train, y_train = x_train[keep], y_train[keep]
    x_eval, y_eval = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    mean, std = _channel_mean_std(x_train)
    spec = DataSpec(task="classification", input_shape=CIFAR_IMAGE_SHAPE, num_outputs=CIFAR_CLASSES)
    return ArrayDataset(
        spec,
        (torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train)),
        (torch.from_numpy(np.ascontiguousarray(x_eval)), torch.from_numpy(y_eval)),
        prepare=_standardiser(mean, std),
    )


CIFAR10 = DatasetKind(name="cifar10", args_model=Cifar10Args, spec=cifar10_spec, load=load_cifar10)
