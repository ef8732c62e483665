"""Trials per hour vs pack size: K same-shape proxy trials trained as one computation (scaletune.packs).

For each case (mlp 16x1 and 64x2 on teacher data, gpt 32x2 on pytext), T = 32 trials with distinct learning
rates and distinct seeds (so every member has its own data order, the general case) run unpacked (run_trial
one after another) and in packs of K = 1, 2, 4, 8, 16, 32 (T / K packs each). Each round runs every arm of a
case in one fresh spawned process with one torch thread, after a warm-up there; rounds alternate the arms'
order so machine load falls on all of them alike, and the table gives medians over rounds with min-max.
Trials per hour are given per CPU-hour of the process (robust to other jobs on the machine) and per wall hour.

    .venv/bin/python bench/packs.py [--quick] [--rounds N] [--device cpu|cuda]
    .venv/bin/python bench/packs.py --last [--quick] [--rounds N]

``--last``: when one member of a pack is left (the others pruned), is it cheaper to go on in the stack or to finish
it on the plain loop (``scaletune.packs.train.FINISH_ALONE``)? Per case, packs of 8 whose members 2-8 are stopped at
the first of five evals, so member 1 trains the last 80% of its steps alone; both arms in one process per round,
the order alternating by round; CPU seconds per arm, and member 1's final losses compared between the arms.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from common import markdown_table, single_thread, write_section

import scaletune.packs.train as pack_training
from scaletune.hparams import HParams
from scaletune.packs import pack_size_for, run_pack
from scaletune.models.size import count_params
from scaletune.runner import TrialConfig, prepare_trial, run_trial
from scaletune.shapes import Shape
from scaletune.train import Budget

SECTION = "Proxy packs: trials per hour vs pack size"
TRIALS = 32
PACK_SIZES = (1, 2, 4, 8, 16, 32)
UNPACKED = 0  # the arm that runs run_trial per trial
LAST_SECTION = "Proxy packs: the last member"
LAST_PACK = 8
LAST_EVALS = 5  # members 2..8 stop at the first eval, member 1 trains the other (LAST_EVALS - 1) / LAST_EVALS alone
LAST_STEPS_FACTOR = 4  # longer runs than the throughput table's, so the stretch alone dominates each arm
PYTEXT_ARGS: dict[str, Any] = {"seq_len": 32, "max_bytes": 2_000_000, "eval_windows": 128}


@dataclass(frozen=True)
class Case:
    name: str
    cfg: TrialConfig


def cases(quick: bool, device: str) -> list[Case]:
    """The tuning-cost benchmark's proxies and budgets, with fewer steps (throughput, not loss, is measured)."""
    mlp_budget = Budget(steps=20 if quick else 50, batch_size=32, eval_every=10_000)
    gpt_budget = Budget(steps=5 if quick else 20, batch_size=8, eval_every=10_000, eval_batches=4)

    def mlp(width: int, depth: int) -> TrialConfig:
        return TrialConfig(family="mlp", args={}, base=Shape(16, 1), shape=Shape(width, depth),
                           parametrization="depth_mup", optimizer="adamw", dataset="teacher", dataset_args={},
                           budget=mlp_budget, hparams=HParams(), device=device)

    gpt = TrialConfig(family="gpt", args={"head_dim": 8}, base=Shape(16, 1), shape=Shape(32, 2),
                      parametrization="completep", optimizer="adamw", dataset="pytext", dataset_args=PYTEXT_ARGS,
                      budget=gpt_budget, hparams=HParams(), device=device)
    return [Case("mlp 16x1", mlp(16, 1)), Case("mlp 64x2", mlp(64, 2)), Case("gpt 32x2", gpt)]


def trials(cfg: TrialConfig, n: int) -> list[TrialConfig]:
    """n trials spread over two octaves of learning rate, each with its own seed."""
    return [replace(cfg, seed=i, hparams=HParams(lr=1e-3 * 4 ** (i / max(n - 1, 1)), warmup_frac=0.05))
            for i in range(n)]


class PeakMemory:
    """Peak memory of one arm: resident set sampled every 5 ms above its level at the start (freed heap is
    handed back to the OS first, so an earlier arm's high-water mark does not hide this one's); on CUDA, the
    allocator's peak."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start = self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.start = self.peak = self.rss()
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def measure_arm(cfg: TrialConfig, pack: int, n: int) -> dict[str, float]:
    """Run n trials unpacked (pack 0) or in packs of ``pack``: wall and CPU seconds, memory peak above the start."""
    cfgs = trials(cfg, n)
    with PeakMemory(cfg.device or "cpu") as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        if pack == UNPACKED:
            statuses = [run_trial(c).status for c in cfgs]
        else:
            statuses = [r.status for i in range(0, n, pack) for r in run_pack(cfgs[i : i + pack])]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "peak": memory.peak, "extra": memory.peak - memory.start,
            "completed": statuses.count("completed")}


def measure_round(cfg: TrialConfig, arms: list[int], n: int) -> dict[int, dict[str, float]]:
    """Every arm of one case in this (fresh, single-threaded) process, in the given order, after a warm-up."""
    single_thread()
    short = replace(cfg, budget=replace(cfg.budget, steps=2))
    run_pack(trials(short, 2))  # warm-up: imports, data, first kernels
    run_trial(short)
    return {pack: measure_arm(cfg, pack, n) for pack in arms}


def last_member_config(cfg: TrialConfig) -> TrialConfig:
    steps = cfg.budget.steps * LAST_STEPS_FACTOR
    return replace(cfg, budget=replace(cfg.budget, steps=steps, eval_every=steps // LAST_EVALS))


def stop(_point: Any) -> bool:
    return True


def measure_last_arm(cfg: TrialConfig, alone: bool, n: int) -> dict[str, Any]:
    """n trials in packs of LAST_PACK whose members but the first stop at the first eval; CPU and wall seconds."""
    pack_training.FINISH_ALONE = alone
    cfgs, callbacks = trials(cfg, n), [None] + [stop] * (LAST_PACK - 1)
    wall, cpu = time.perf_counter(), time.process_time()
    results = [run_pack(cfgs[i : i + LAST_PACK], callbacks) for i in range(0, n, LAST_PACK)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "last_losses": [pack[0].final_eval_loss for pack in results],
            "completed": sum(pack[0].status == "completed" for pack in results)}


def measure_last_round(cfg: TrialConfig, order: list[bool], n: int) -> dict[bool, dict[str, Any]]:
    single_thread()
    short = replace(cfg, budget=replace(cfg.budget, steps=2, eval_every=1))
    for alone in (True, False):  # warm-up: imports, data, first kernels of both paths
        pack_training.FINISH_ALONE = alone
        run_pack(trials(short, 2), [None, stop])
    return {alone: measure_last_arm(cfg, alone, n) for alone in order}


def run_last(opts: argparse.Namespace) -> None:
    """The --last comparison: finish the last member alone or in the stack; writes its own docs section."""
    n = LAST_PACK if opts.quick else 4 * LAST_PACK
    all_cases = [Case(c.name, last_member_config(c.cfg)) for c in cases(opts.quick, "cpu")]
    started = time.perf_counter()
    results: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    context = multiprocessing.get_context("spawn")
    for r in range(opts.rounds):
        for case in all_cases:
            order = [False, True] if r % 2 == 0 else [True, False]
            with context.Pool(1) as pool:
                outcome = pool.apply(measure_last_round, (case.cfg, order, n))
            for alone, measured in outcome.items():
                results.setdefault((case.name, alone), []).append(measured)
                print(f"round {r + 1} {case.name} {'alone' if alone else 'stack'}: {measured}", flush=True)
    rows = []
    for case in all_cases:
        stack, alone = results[(case.name, False)], results[(case.name, True)]
        diffs = [abs(a - b) / abs(b) for s_run, a_run in zip(stack, alone)
                 for a, b in zip(a_run["last_losses"], s_run["last_losses"])]
        budget = case.cfg.budget
        rows.append([case.name, f"{budget.steps} ({budget.steps - budget.eval_every} alone)",
                     median_range([r["cpu"] for r in stack], ".2f"), median_range([r["cpu"] for r in alone], ".2f"),
                     f"{statistics.median(r['cpu'] for r in stack) / statistics.median(r['cpu'] for r in alone):.2f}x",
                     f"{max(diffs):.1e}", f"{min(r['completed'] for r in stack + alone)}/{n // LAST_PACK}"])
    table = markdown_table(["case", "steps (of which member 1 alone)", "CPU s, last member in the stack",
                            "CPU s, last member on the plain loop", "stack / plain loop",
                            "member 1's final loss, max relative difference", "member 1 completed"], rows)
    load = os.getloadavg()
    body = f"""Command: `.venv/bin/python bench/packs.py --last{' --quick' if opts.quick else ''} --rounds {opts.rounds}` ({(time.perf_counter() - started) / 60:.1f} min wall, {time.strftime('%Y-%m-%d')}).
Protocol (fixed before the run): per case {n} trials (the throughput table's learning rates and seeds, {LAST_STEPS_FACTOR}x its
steps, {LAST_EVALS} evals) in packs of {LAST_PACK}; the callbacks of members 2-{LAST_PACK} stop them at the first eval, so
member 1 trains the remaining {LAST_EVALS - 1}/{LAST_EVALS} of its steps as the pack's only member. Arm "stack": it goes on
as a stack of one (vmap); arm "plain loop": it leaves the stack with its parameters, buffers and optimizer state and
finishes on the core training loop (`FINISH_ALONE`, the code's default). Both arms of a case run in one fresh
spawned process per round with one torch thread, after a warm-up, in alternating order; {opts.rounds} rounds; medians
(min-max) of each arm's CPU seconds (all its packs, build and evals included). Load average (1/5/15 min) at the
end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on 2 cores (above about 1, other work shared them: CPU seconds are
less affected than wall time, not immune).

{table}
"""
    print(body)
    if not opts.quick:
        write_section(LAST_SECTION, body)


def median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(results: dict[tuple[str, int], list[dict[str, float]]], all_cases: list[Case], sizes: tuple[int, ...],
           rounds: int, n: int, wall: float, device: str, load: tuple[float, float, float], quick: bool) -> str:
    rows = []
    for case in all_cases:
        base_cpu = statistics.median(r["cpu"] for r in results[(case.name, UNPACKED)])
        for pack in (UNPACKED, *sizes):
            runs = results[(case.name, pack)]
            rows.append([
                case.name if pack == UNPACKED else "", "unpacked" if pack == UNPACKED else pack,
                median_range([n / r["cpu"] * 3600 for r in runs], ".0f"),
                f"{base_cpu / statistics.median(r['cpu'] for r in runs):.2f}x",
                median_range([n / r["wall"] * 3600 for r in runs], ".0f"),
                f"{statistics.median(r['extra'] for r in runs) / 2**20:.1f}",
                f"{min(int(r['completed']) for r in runs)}/{n}",
            ])
    table = markdown_table(["case", "pack size", "trials per CPU-hour, median (min-max)", "vs unpacked (CPU)",
                            "trials per wall hour, median (min-max)",
                            "peak memory above start, MiB" if device == "cpu" else "peak allocated above start, MiB",
                            "completed"], rows)
    rounds_text = (f"the arms alternate in {rounds} rounds so the load falls on all of them, and the ratio column "
                   "compares medians" if rounds > 1 else "one round (a single measurement per arm, no spread)")
    auto_sizes = "; ".join(f"{c.name} ({count_params(prepare_trial(c.cfg).factory, c.cfg.shape):,} params, "
                      f"{c.cfg.budget.steps} steps of batch {c.cfg.budget.batch_size}): auto pack "
                      f"{pack_size_for(c.cfg)}" for c in all_cases)
    return f"""Command: `.venv/bin/python bench/packs.py{' --quick' if quick else ''}{'' if device == 'cpu' else ' --device ' + device}` ({wall / 60:.1f} min wall, {time.strftime('%Y-%m-%d')}).
Device: {device}, one torch thread per measurement process at normal priority, one at a time, on a machine with
2 CPU cores that other jobs may share (load average 1/5/15 min at the end: {load[0]:.2f}, {load[1]:.2f},
{load[2]:.2f}; the bench itself keeps about one core busy), so absolute rates carry the machine's load; {rounds_text}.

Protocol (fixed before the run): per case {n} trials with learning rates spread over two octaves and seeds
0..{n - 1} (each member its own data order), run unpacked (`run_trial` one after another) and in packs of
{', '.join(map(str, sizes))} (`run_pack`, {n}/K packs); each round runs all arms of a case in one fresh spawned
process after a 2-step warm-up, alternating their order between rounds. Rates count build and evaluation.
CPU-hour rates use the process's CPU time, wall rates its wall time (which other jobs inflate). Peak memory:
the process's resident set sampled every 5 ms during the arm, above its level at the arm's start (after
`malloc_trim`), i.e. what the arm's models, optimizer state and activations add; on CUDA, peak allocated.

{table}

Sizes and `auto`: {auto_sizes}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; prints, leaves docs untouched")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all arms (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--last", action="store_true", help="the last member: in the stack or on the plain loop")
    opts = parser.parse_args()
    if opts.last:
        run_last(opts)
        return
    n = 8 if opts.quick else TRIALS
    sizes = tuple(k for k in PACK_SIZES if k <= n)
    all_cases = cases(opts.quick, opts.device)
    started = time.perf_counter()
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    context = multiprocessing.get_context("spawn")
    for r in range(opts.rounds):
        for case in all_cases:
            arms = [UNPACKED, *sizes]
            with context.Pool(1) as pool:
                outcome = pool.apply(measure_round, (case.cfg, arms if r % 2 == 0 else arms[::-1], n))
            for pack, measured in outcome.items():
                results.setdefault((case.name, pack), []).append(measured)
                print(f"round {r + 1} {case.name} pack {pack or 'unpacked'}: {measured}", flush=True)
    body = report(results, all_cases, sizes, opts.rounds, n, time.perf_counter() - started, opts.device,
                  os.getloadavg(), opts.quick)
    print(body)
    if not opts.quick:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
