"""What does tuning on a proxy and transferring save, and what does it cost in target loss?

For ``mlp`` (teacher data) and ``gpt`` (pytext): run N trials of Optuna TPE (fixed seed, in-process) on a
small proxy and transfer the best to a target 16x wider and 4x deeper; run the same N trials with the same
sampler and seeds directly at the target. Both searches live in the same base units (base shape = proxy),
so they explore the same space. Then both winners are trained at the target on fresh seeds. Case
``gpt-deep`` is a second experiment: a depth-2 gpt proxy (32x2 -> 256x8) whose trials average two seeds,
because the depth-1 proxy of the first case was too flat to separate settings. Each case writes its own
section of docs/benchmarks.md and its own plot into docs/img/.

    .venv/bin/python bench/tuning_cost.py [--case {proxy-16x1,gpt-deep,all}] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from common import IMG, PARAM_OPTIONS, make_pool, markdown_table, run_config, write_section

from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import count_params, family_factory
from scaletune.packs import pack_size_for, run_pack
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import Budget

SECTION = "Tuning cost: tune on a proxy and transfer vs tune at the target"
DEEP_SECTION = "Tuning cost, second experiment: a depth-2 gpt proxy with seed-averaged trials"
DEEP_PROXY_SEEDS = (0, 1)
DEEP_MOTIVATION = f"""A second experiment, motivated by the first one's gpt result (section above: +2.40% with a 16x1
proxy, whose winner and the target's winner scored within the seed spread at the proxy, i.e. the depth-1,
12k-parameter proxy was too flat to separate them). Changed, and fixed before this single run: the proxy is
32x2 (depth >= 2, so the depth transfer starts from a proxy that has residual depth to scale), the target
256x8, and each proxy trial's objective is the mean loss over seeds {list(DEEP_PROXY_SEEDS)}; the target search keeps one seed
per trial (two would double its cost, over this case's 20-minute budget). N, TPE settings, search space,
steps, batch and evaluation seeds are those of the first experiment. Budget: <= 20 min wall on 2 cores (when the
protocol was fixed, shared with one or two other engineers' jobs)."""
SAMPLER_SEED = 0
TRIAL_SEED = 0
EVAL_SEEDS = (1, 2, 3)  # fresh seeds for the final comparison, so neither winner is judged on the seed it was picked on
WARMUP_FRAC = 0.05
LOG2_LR_RANGE = (-10.0, -2.0)
LOG2_OUTPUT_MULT_RANGE = (-3.0, 3.0)
LOSS_TARGET = 0.01  # transferred target loss within 1% of the directly tuned one
COST_TARGET = 50.0
PACKED_CPU_GOAL = 0.3  # the CPU ratio with packs should reach this fraction of the FLOP ratio (issue 12)


@dataclass(frozen=True)
class Setup:
    family: str
    args: dict[str, Any]
    dataset: str
    dataset_args: dict[str, Any]
    parametrization: str
    proxy: Shape
    target: Shape
    budget: Budget
    trials: int
    startup_trials: int
    proxy_seeds: tuple[int, ...] = (TRIAL_SEED,)  # the proxy objective is the mean loss over these seeds

    def config(self, shape: Shape, hparams: HParams, seed: int) -> TrialConfig:
        return TrialConfig(family=self.family, args=self.args, base=self.proxy, shape=shape,
                           parametrization=self.parametrization, optimizer="adamw", dataset=self.dataset,
                           dataset_args=self.dataset_args, budget=self.budget, hparams=hparams, seed=seed,
                           device="cpu", options=PARAM_OPTIONS)

    def params(self, shape: Shape) -> int:
        spec = dataset_spec(self.dataset, self.dataset_args)
        return count_params(family_factory(get_family(self.family), shape, spec, self.args), shape)


@dataclass
class Search:
    """One TPE search: every trial's loss (None = diverged) and compute, and the best settings."""

    best: dict[str, float]
    best_loss: float
    losses: list[float | None] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    values: list[dict[str, float]] = field(default_factory=list)


def hparams_of(values: dict[str, float]) -> HParams:
    return HParams(lr=values["lr"], output_mult=values["output_mult"], warmup_frac=WARMUP_FRAC)


@dataclass(frozen=True)
class Case:
    """One experiment: its setups, its docs section and plot, and why it exists."""

    name: str
    section: str
    image: str
    setups: list[Setup]
    motivation: str = ""


def tune(setup: Setup, shape: Shape, seeds: tuple[int, ...]) -> Search:
    """TPE over (lr, output_mult) in base units at ``shape``, objective = mean loss over ``seeds``.

    A trial with any diverged seed is told as failed; its FLOPs and CPU time count every seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=SAMPLER_SEED, n_startup_trials=setup.startup_trials)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    losses, flops, cpu, values_tried = [], [], [], []
    for _ in range(setup.trials):
        trial = study.ask()
        values = {"lr": 2.0 ** trial.suggest_float("log2_lr", *LOG2_LR_RANGE),
                  "output_mult": 2.0 ** trial.suggest_float("log2_output_mult", *LOG2_OUTPUT_MULT_RANGE)}
        trial.set_user_attr("values", values)
        outcomes = [run_config(setup.config(shape, hparams_of(values), seed)) for seed in seeds]
        loss = mean_or_none([o.loss for o in outcomes])
        if loss is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, loss)
        values_tried.append(values)
        losses.append(loss)
        flops.append(sum(o.flops for o in outcomes))
        cpu.append(sum(o.cpu_seconds for o in outcomes))
    return Search(best=study.best_trial.user_attrs["values"], best_loss=study.best_value,
                  losses=losses, flops=flops, cpu_seconds=cpu, values=values_tried)


def packed_cpu_seconds(setup: Setup, shape: Shape, seeds: tuple[int, ...], tried: list[dict[str, float]]) -> float:
    """CPU seconds to train the search's trials (every seed) again in packs of the auto size, as a service
    study whose trials are all in flight would (``scaletune.packs``); the points are the sequential search's."""
    configs = [setup.config(shape, hparams_of(values), seed) for values in tried for seed in seeds]
    size = pack_size_for(configs[0])
    started = time.process_time()
    for i in range(0, len(configs), size):
        run_pack(configs[i : i + size])
    return time.process_time() - started


GPT_ARGS: dict[str, Any] = {"head_dim": 8}
PYTEXT_ARGS: dict[str, Any] = {"seq_len": 32, "max_bytes": 2_000_000, "eval_windows": 128}


def cases(quick: bool) -> dict[str, Case]:
    """proxy-16x1: targets 16x wider and 4x deeper (quick: 4x, 2x); gpt-deep: 32x2 -> 256x8 (quick: 64x4)."""
    trials, startup = (3, 2) if quick else (16, 6)
    target = Shape(64, 2) if quick else Shape(256, 4)
    gpt_budget = Budget(steps=20 if quick else 150, batch_size=8, eval_every=10_000)
    shallow = Case("proxy-16x1", SECTION, "tuning_cost.png", [
        Setup("mlp", {}, "teacher", {}, "depth_mup", Shape(16, 1), target,
              Budget(steps=30 if quick else 300, batch_size=32, eval_every=10_000), trials, startup),
        Setup("gpt", GPT_ARGS, "pytext", PYTEXT_ARGS, "completep", Shape(16, 1), target, gpt_budget, trials, startup),
    ])
    deep = Case("gpt-deep", DEEP_SECTION, "tuning_cost_gpt_deep.png", [
        Setup("gpt", GPT_ARGS, "pytext", PYTEXT_ARGS, "completep", Shape(32, 2),
              Shape(64, 4) if quick else Shape(256, 8), gpt_budget, trials, startup, DEEP_PROXY_SEEDS),
    ], motivation=DEEP_MOTIVATION)
    return {case.name: case for case in (shallow, deep)}


def mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def best_so_far(losses: list[float | None]) -> list[float]:
    out, best = [], math.inf
    for loss in losses:
        best = min(best, loss if loss is not None else math.inf)
        out.append(best)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(5.0 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        direct: Search = row["direct"]
        proxy: Search = row["proxy"]
        ax.step(np.cumsum(direct.flops), best_so_far(direct.losses), where="post", color="tab:red",
                label="tuned at target: best so far (seed 0)")
        ax.plot([sum(proxy.flops)], [row["transferred_loss"]], "o", color="tab:blue", ms=8,
                label="tuned at proxy, transferred (fresh seeds)")
        ax.axhline(row["direct_loss"], color="tab:red", ls=":", label="target-tuned best (fresh seeds)")
        ax.set_xscale("log")
        ax.set_xlabel("tuning compute (training FLOPs)")
        ax.set_ylabel("target eval loss")
        ax.set_title(f"{row['setup'].family}: proxy {row['setup'].proxy.width}x{row['setup'].proxy.depth} -> "
                     f"target {row['setup'].target.width}x{row['setup'].target.depth}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seeds_text(setup: Setup) -> str:
    if setup.proxy_seeds == (TRIAL_SEED,):
        return f"trial seed {TRIAL_SEED}"
    return (f"target trials on seed {TRIAL_SEED}, proxy trials scored by their mean loss over seeds "
            f"{list(setup.proxy_seeds)} (the proxy's FLOPs and CPU seconds count every seed)")


def report(case: Case, rows: list[dict[str, Any]], image: Path, wall: float, quick: bool) -> str:
    table_rows = []
    for row in rows:
        s, proxy, direct = row["setup"], row["proxy"], row["direct"]
        flop_ratio = sum(direct.flops) / sum(proxy.flops)
        cpu_ratio = sum(direct.cpu_seconds) / sum(proxy.cpu_seconds)
        packed_ratio = sum(direct.cpu_seconds) / row["packed_cpu"]
        t, d = row["transferred_loss"], row["direct_loss"]
        gap = None if t is None or d is None else (t - d) / d
        met = "-" if gap is None else \
            f"cost {'met' if flop_ratio >= COST_TARGET else 'NOT met'}, loss {'met' if gap <= LOSS_TARGET else 'NOT met'}"
        table_rows.append([
            s.family, s.parametrization,
            f"{s.proxy.width}x{s.proxy.depth} ({row['proxy_params']:,}) -> {s.target.width}x{s.target.depth} "
            f"({row['target_params']:,})",
            s.trials, f"{sum(proxy.flops):.3g} / {sum(direct.flops):.3g}", f"{flop_ratio:.0f}x",
            f"{sum(proxy.cpu_seconds):.1f} / {sum(direct.cpu_seconds):.1f}", f"{cpu_ratio:.1f}x",
            f"{packed_ratio:.1f}x ({row['packed_cpu']:.1f} s, pack {row['pack']}; goal "
            f"{PACKED_CPU_GOAL * flop_ratio:.0f}x {'met' if packed_ratio >= PACKED_CPU_GOAL * flop_ratio else 'NOT met'})",
            "-" if t is None else f"{t:.4f}", "-" if d is None else f"{d:.4f}",
            "-" if gap is None else f"{100 * gap:+.2f}%", met,
        ])
    table = markdown_table(
        ["family", "parametrization", "proxy -> target (params)", "trials N", "tuning FLOPs proxy / target",
         "FLOP ratio", "tuning CPU s proxy / target", "CPU ratio", "CPU ratio with packs", "target loss, transferred",
         "target loss, tuned at target", "gap", "targets"], table_rows)
    best = "\n".join(
        f"- `{row['setup'].family}`: proxy best lr {row['proxy'].best['lr']:.3g}, output_mult "
        f"{row['proxy'].best['output_mult']:.3g} (proxy loss {row['proxy'].best_loss:.4f}); target best lr "
        f"{row['direct'].best['lr']:.3g}, output_mult {row['direct'].best['output_mult']:.3g} "
        f"(search loss {row['direct'].best_loss:.4f}); {row['setup'].budget.steps} steps, batch "
        f"{row['setup'].budget.batch_size}" for row in rows)
    motivation = f"{case.motivation}\n\n" if case.motivation else ""
    return f"""{motivation}Command: `.venv/bin/python bench/tuning_cost.py --case {case.name}{' --quick' if quick else ''}` ({wall / 60:.1f} min wall,
2 processes on 2 CPU cores, load average (1/5/15 min) {", ".join(f"{v:.2f}" for v in os.getloadavg())} at the end:
above about 2, other work shared the cores and wall and CPU seconds are pessimistic).

Each search: N trials of Optuna TPE (seed {SAMPLER_SEED}, {rows[0]['setup'].startup_trials} random start-up trials)
over log2 LR in {list(LOG2_LR_RANGE)} and log2 output multiplier in {list(LOG2_OUTPUT_MULT_RANGE)}, in base units
(base shape = the proxy) for both searches, {seeds_text(rows[0]['setup'])}; a diverged trial is told to Optuna as failed.
Tuning compute counts the search only: the final training of the target is the same run either way. The
losses compared are the mean over fresh seeds {list(EVAL_SEEDS)} of training each winner at the target.
Parametrization options {PARAM_OPTIONS}, the same as the transfer landscape: readout and query start from
their normal init, not zero (at these budgets zero-init made the muP family's loss worse and noisier).
FLOPs are the trainer's analytic count; CPU seconds are per-process CPU time (one torch thread). Targets:
FLOP ratio >= {COST_TARGET:.0f}x, transferred loss within {100 * LOSS_TARGET:.0f}% of the target-tuned one.
"CPU ratio with packs": the target search's CPU seconds over those of training the proxy search's very points
(every seed) again in packs of the auto size (`scaletune.packs.run_pack`, what a service study with all its
trials in flight and `pack: auto` does; the sequential search is not re-run with batched asks). Goal: at least
{PACKED_CPU_GOAL} x the FLOP ratio.

{table}

{best}

![tuning cost](img/{image.name})
"""


def run_case(case: Case, quick: bool) -> None:
    """Both searches of every setup, then both winners at the target on the fresh seeds; writes the case's section."""
    started = time.perf_counter()
    jobs = [(i, shape, seeds) for i, s in enumerate(case.setups)
            for shape, seeds in ((s.target, (TRIAL_SEED,)), (s.proxy, s.proxy_seeds))]
    jobs.sort(key=lambda job: -case.setups[job[0]].params(job[1]))  # longest searches first: both processes end together
    with make_pool() as pool:
        searches = pool.starmap(tune, [(case.setups[i], shape, seeds) for i, shape, seeds in jobs], chunksize=1)
        results = {(i, shape): search for (i, shape, _), search in zip(jobs, searches)}
        finals = [(i, which, s.config(s.target, hparams_of(results[(i, shape)].best), seed))
                  for i, s in enumerate(case.setups) for which, shape in (("transferred", s.proxy), ("direct", s.target))
                  for seed in EVAL_SEEDS]
        outcomes = pool.map(run_config, [cfg for _, _, cfg in finals], chunksize=1)
        packed = pool.starmap(packed_cpu_seconds, [(s, s.proxy, s.proxy_seeds, results[(i, s.proxy)].values)
                                                   for i, s in enumerate(case.setups)], chunksize=1)
    wall = time.perf_counter() - started
    rows = []
    for i, s in enumerate(case.setups):
        final = {which: mean_or_none([o.loss for (j, w, _), o in zip(finals, outcomes) if j == i and w == which])
                 for which in ("transferred", "direct")}
        rows.append({"setup": s, "proxy": results[(i, s.proxy)], "direct": results[(i, s.target)],
                     "transferred_loss": final["transferred"], "direct_loss": final["direct"],
                     "proxy_params": s.params(s.proxy), "target_params": s.params(s.target),
                     "packed_cpu": packed[i], "pack": pack_size_for(s.config(s.proxy, HParams(), TRIAL_SEED))})
    img_dir = Path(tempfile.mkdtemp(prefix="tuning_cost_")) if quick else IMG
    image = plot(rows, img_dir / case.image)
    body = report(case, rows, image, wall, quick)
    print(body)
    if quick:
        print(f"(quick run: plot in {img_dir}; docs/benchmarks.md not touched)")
    else:
        write_section(case.section, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir")
    parser.add_argument("--case", choices=["proxy-16x1", "gpt-deep", "all"], default="all",
                        help="proxy-16x1: mlp and gpt, 16x1 proxies; gpt-deep: the 32x2 -> 256x8 second experiment")
    opts = parser.parse_args()
    for name, case in cases(opts.quick).items():
        if opts.case in (name, "all"):
            run_case(case, opts.quick)


if __name__ == "__main__":
    main()
