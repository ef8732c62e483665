"""Shared pieces of the benchmarks: single-threaded trial workers, a process pool, docs section writing."""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCHMARKS_MD = DOCS / "benchmarks.md"
IMG = DOCS / "img"
PROCESSES = 2  # the benchmarks are budgeted for 2 CPU cores
# Readout and query start from their normal init, not zero, in the LR benchmarks: at these few-hundred-step
# budgets zero-init made the muP family's loss worse and far noisier between seeds (gpt w64, 150 steps,
# lr 2^-4.5, seeds 0/1: zero-init 2.68/2.82, normal init 2.43/2.45), which buried the optimum in noise.
# SP never zero-inits, so with these options mup at the base width is exactly SP.
PARAM_OPTIONS: dict[str, bool] = {"zero_init_readout": False, "zero_init_query": False}

if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from scaletune.runner import TrialConfig, run_trial  # noqa: E402


def single_thread() -> None:
    """One torch thread per process: two processes on two cores beat two threads fighting over each."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class Outcome:
    """What a benchmark keeps of one trial; ``loss`` is None when it diverged."""

    status: str
    loss: float | None
    flops: float
    cpu_seconds: float


def run_config(cfg: TrialConfig) -> Outcome:
    """Run one trial and measure the CPU time this process spent on it."""
    started = time.process_time()
    result = run_trial(cfg)
    loss = result.final_eval_loss if result.status == "completed" else None
    return Outcome(result.status, loss, result.flops, time.process_time() - started)


def make_pool(processes: int = PROCESSES) -> Pool:
    """Spawned (not forked) workers, so no torch thread pool state is inherited."""
    return multiprocessing.get_context("spawn").Pool(processes, initializer=single_thread)


def write_section(header: str, body: str, path: Path = BENCHMARKS_MD, level: int = 2) -> None:
    """Replace (or append) the ``## header`` section of a shared markdown file, leaving other sections intact.

    ``level`` 3 replaces a ``### header`` subsection up to the next ``##`` or ``###`` heading; a subsection is
    placed by hand the first time (appended at the end otherwise).
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{'#' * level} {header}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{'#' * level} {re.escape(header)}\n.*?(?=^#{{2,{level}}} |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
