"""A byte-level language-modelling corpus from the running interpreter's own standard library sources.

Every Python installation carries it, so LM studies need no download. Files are split into train and
eval by a hash of their path (about 5% of files; eval takes 5% of ``max_bytes``, train the rest).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from scaletune.data.base import DatasetArgs, DatasetKind, DataSpec
from scaletune.data.batching import ByteWindowsDataset

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib"})
EVAL_PERCENT = 5


class PyTextArgs(DatasetArgs):
    max_bytes: int = Field(default=8_000_000, ge=1024)
    seq_len: int = Field(default=64, ge=1)
    eval_windows: int = Field(default=256, ge=1)


def stdlib_sources() -> list[str]:
    """Paths of the standard library's .py files relative to its root, sorted, tests and idlelib left out."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]  # prune: site-packages can be huge
        relative_dir = Path(directory).relative_to(root)
        found += [(relative_dir / name).as_posix() for name in filenames if name.endswith(".py")]
    return sorted(found)


def is_eval_file(relative_path: str) -> bool:
    """Stable across runs and machines (unlike ``hash``), so the split never moves."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < EVAL_PERCENT


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    eval: torch.Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]


def as_byte_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


@lru_cache(maxsize=2)
def load_corpus(max_bytes: int) -> Corpus:
    """Read files in sorted order, each into its split, until the split's share of max_bytes is full.

    Eval gets its own 5% share so that even a small cap has an eval split; a file is cut at the cap.
    Cached per process: workers run many trials on the same corpus.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    eval_budget = max_bytes * EVAL_PERCENT // 100
    remaining = {False: max_bytes - eval_budget, True: eval_budget}
    chunks: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    for relative_path in stdlib_sources():
        split = is_eval_file(relative_path)
        if remaining[split] <= 0:
            if remaining[not split] <= 0:
                break
            continue
        text = (root / relative_path).read_bytes()[: remaining[split]]
        remaining[split] -= len(text)
        chunks[split].append(text)
        names[split].append(relative_path)
    return Corpus(
        train=as_byte_tensor(b"".join(chunks[False])),
        eval=as_byte_tensor(b"".join(chunks[True])),
        train_files=tuple(names[False]),
        eval_files=tuple(names[True]),
    )


def pytext_spec(args: PyTextArgs, data_root: Path | None) -> DataSpec:
    return DataSpec(task="lm", input_shape=(args.seq_len,), num_outputs=256)


def load_pytext(args: PyTextArgs, data_root: Path | None) -> ByteWindowsDataset:
    corpus = load_corpus(args.max_bytes)
    return ByteWindowsDataset(
        f"pytext with max_bytes={args.max_bytes} (raise it for a larger corpus)",
        corpus.train,
        corpus.eval,
        args.seq_len,
        args.eval_windows,
    )


KIND = DatasetKind(name="pytext", args_model=PyTextArgs, spec=pytext_spec, load=load_pytext)
