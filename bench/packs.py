"""Trials per hour vs pack size: K same-shape proxy trials trained as one computation (scaletune.packs).

For each case (mlp 16x1 and 64x2 on teacher data, gpt 32x2 on pytext), T = 32 trials with distinct learning
rates and distinct seeds (so every member has its own data order, the general case) run unpacked (run_trial
one after another) and in packs of K = 1, 2, 4, 8, 16, 32 (T / K packs each). Every measurement runs in a
fresh spawned process with one torch thread, after a small warm-up there (imports, data, first kernels), so
its peak resident memory is its own; rounds alternate the arms so machine load falls on all of them alike,
and the table gives the median over rounds with the min-max range.

    .venv/bin/python bench/packs.py [--quick] [--rounds N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from common import markdown_table, single_thread, write_section

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


def peak_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(cfg: TrialConfig, pack: int, n: int) -> dict[str, float]:
    """Run n trials unpacked (pack 0) or in packs of ``pack``; wall and CPU seconds, peak memory above warm-up."""
    single_thread()
    device = cfg.device or "cpu"
    run_pack(trials(replace(cfg, budget=replace(cfg.budget, steps=2)), 2))  # warm-up: imports, data, kernels
    run_trial(replace(cfg, budget=replace(cfg.budget, steps=2)))
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    cfgs = trials(cfg, n)
    wall, cpu = time.perf_counter(), time.process_time()
    if pack == UNPACKED:
        statuses = [run_trial(c).status for c in cfgs]
    else:
        statuses = [r.status for i in range(0, n, pack) for r in run_pack(cfgs[i : i + pack])]
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "peak": peak_bytes(device), "extra": peak_bytes(device) - before,
            "completed": statuses.count("completed")}


def median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(results: dict[tuple[str, int], list[dict[str, float]]], all_cases: list[Case], sizes: tuple[int, ...],
           rounds: int, n: int, wall: float, device: str, load: tuple[float, float, float], quick: bool) -> str:
    rows = []
    for case in all_cases:
        base = statistics.median(r["wall"] for r in results[(case.name, UNPACKED)])
        for pack in (UNPACKED, *sizes):
            runs = results[(case.name, pack)]
            per_hour = [n / r["wall"] * 3600 for r in runs]
            rows.append([
                case.name if pack == UNPACKED else "", "unpacked" if pack == UNPACKED else pack,
                median_range(per_hour, ".0f"), f"{base / statistics.median(r['wall'] for r in runs):.2f}x",
                f"{statistics.median(r['cpu'] for r in runs) / n * 1000:.0f}",
                f"{statistics.median(r['peak'] for r in runs) / 2**20:.0f}",
                f"{statistics.median(r['extra'] for r in runs) / 2**20:.1f}",
                f"{min(int(r['completed']) for r in runs)}/{n}",
            ])
    table = markdown_table(["case", "pack size", "trials/hour, median (min-max)", "vs unpacked",
                            "CPU ms/trial", "peak RSS MiB" if device == "cpu" else "peak allocated MiB",
                            "peak above warm-up MiB", "completed"], rows)
    auto_sizes = "; ".join(f"{c.name} ({count_params(prepare_trial(c.cfg).factory, c.cfg.shape):,} params, "
                      f"{c.cfg.budget.steps} steps of batch {c.cfg.budget.batch_size}): auto pack "
                      f"{pack_size_for(c.cfg)}" for c in all_cases)
    return f"""Command: `.venv/bin/python bench/packs.py{' --quick' if quick else ''}{'' if device == 'cpu' else ' --device ' + device}` ({wall / 60:.1f} min wall, {time.strftime('%Y-%m-%d')}).
Device: {device}, one torch thread per measurement process, measurements one at a time on a machine with
2 CPU cores **busy with other engineers' jobs** throughout (load average 1/5/15 min at the end: {load[0]:.2f},
{load[1]:.2f}, {load[2]:.2f}), so absolute rates are pessimistic and carry that noise; the arms alternate in
{rounds} rounds so the load falls on all of them, and the ratio column compares medians.

Protocol (fixed before the run): per case {n} trials with learning rates spread over two octaves and seeds
0..{n - 1} (each member its own data order), run unpacked (`run_trial` one after another) and in packs of
{', '.join(map(str, sizes))} (`run_pack`, {n}/K packs), each arm in a fresh spawned process after a 2-step
warm-up there. Trials/hour = {n} / wall seconds x 3600, build and evaluation included. Peak memory: the
process's peak RSS (ru_maxrss; on CUDA, peak allocated) and its rise over the warm-up's peak.

{table}

Sizes and `auto`: {auto_sizes}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; prints, leaves docs untouched")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all arms (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = parser.parse_args()
    n = 8 if opts.quick else TRIALS
    sizes = tuple(k for k in PACK_SIZES if k <= n)
    all_cases = cases(opts.quick, opts.device)
    started = time.perf_counter()
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    context = multiprocessing.get_context("spawn")
    for r in range(opts.rounds):
        for case in all_cases:
            arms = (UNPACKED, *sizes)
            for pack in arms if r % 2 == 0 else reversed(arms):
                with context.Pool(1) as pool:
                    outcome = pool.apply(measure, (case.cfg, pack, n))
                results.setdefault((case.name, pack), []).append(outcome)
                print(f"round {r + 1} {case.name} pack {pack or 'unpacked'}: {outcome}", flush=True)
    body = report(results, all_cases, sizes, opts.rounds, n, time.perf_counter() - started, opts.device,
                  os.getloadavg(), opts.quick)
    print(body)
    if not opts.quick:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
