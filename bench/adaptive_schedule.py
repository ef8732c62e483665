"""Does an adaptive shape schedule reach a fixed eval loss E* with fewer FLOPs than the best static shape?

Two cases on digits (8x8): ViT patch size 4 -> 2 (FlexiViT in-place switch) and ViT width 16 -> 32 -> 64
(function-preserving muP growth) at patch 4. For each case: (1) proxy runs per shape (constant LR, 2 seeds)
give (FLOPs, eval loss) curves; (2) scaletune.scaling fits one law per shape (with bootstrap) and the DP
plans the schedule to E*, predicting the saving; (3) real runs, >= 3 seeds, for the DP schedule, every
static shape and a naive progressive schedule (equal FLOP split), each run a complete WSD schedule with its
own cooldown at its budget, over a budget sweep; FLOPs-to-E* per arm and seed by log-log interpolation of
final loss vs budget; (4) realised saving of the DP arm vs the best static arm, with a bootstrap CI over
seeds. E* is fixed below, before running. Writes its section of docs/benchmarks.md and a plot.

    .venv/bin/python bench/adaptive_schedule.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
from common import IMG, make_pool, markdown_table, write_section

from scaletune.adaptive import Phase, phases_from_schedule, run_schedule
from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.runner import TrialConfig
from scaletune.scaling.fit import Run, fit_shapes
from scaletune.scaling.schedule import ScheduleConstraints, schedule_report
from scaletune.shapes import Shape
from scaletune.train import Budget

TARGET_LOSS = 0.5  # E*, fixed before any run (chance is ln 10 = 2.30)
START_LOSS = 2.2
E0 = math.log(10)
BATCH = 32
BUDGET_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)  # x the DP's predicted static FLOPs to E*
HP = HParams(lr=1e-2, warmup_frac=0.05)


@dataclass(frozen=True)
class Case:
    name: str
    shapes: dict[str, Shape]  # in schedule order; moves only go forward
    base: Shape
    proxy_flops: float


CASES = (
    Case("patch 4 -> 2", {"p4": Shape(32, 2, patch_size=4), "p2": Shape(32, 2, patch_size=2)}, Shape(32, 2), 2e10),
    Case("width 16 -> 32 -> 64", {"w16": Shape(16, 2, patch_size=4), "w32": Shape(32, 2, patch_size=4),
                                  "w64": Shape(64, 2, patch_size=4)}, Shape(32, 2), 2e10),
)


def config(case: Case, shape: Shape, seed: int) -> TrialConfig:
    return TrialConfig(family="vit", args={}, base=case.base, shape=shape, parametrization="mup", optimizer="adamw",
                       dataset="digits", dataset_args={}, hparams=HP, seed=seed,
                       budget=Budget(steps=1, batch_size=BATCH, eval_every=25, schedule="wsd", decay_frac=0.2))


def per_step(shape: Shape) -> float:
    return BATCH * get_family("vit").train_flops_per_sample(shape, dataset_spec("digits", {}), {})


def execute(job: tuple[TrialConfig, list[Phase], float]) -> tuple[float | None, list[tuple[float, float]], float]:
    """One real run (decay_frac given): (final eval loss or None, curve, seconds)."""
    cfg, phases, decay = job
    cfg = replace(cfg, budget=replace(cfg.budget, decay_frac=decay))
    with tempfile.TemporaryDirectory() as tmp:
        out = run_schedule(cfg, phases, tmp)
    final = out.train.final_eval_loss if out.train.status == "completed" else None
    return final, [(p.flops, p.eval_loss) for p in out.train.curve], out.train.seconds


def flops_to_target(budgets: list[float], losses: list[float | None]) -> float:
    """Log-log interpolation of the first crossing of E* by final loss vs budget; inf if never reached."""
    pts = [(b, l) for b, l in zip(budgets, losses) if l is not None]
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if l0 > TARGET_LOSS >= l1:
            t = (math.log(l0) - math.log(TARGET_LOSS)) / (math.log(l0) - math.log(l1))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return pts[0][0] if pts and pts[0][1] <= TARGET_LOSS else math.inf


def arm_phases(arm: str, case: Case, schedule_phases: list[Phase], budget: float) -> list[Phase]:
    names = list(case.shapes)
    if arm == "DP schedule":
        kept = [p for p in schedule_phases[:-1] if p.until_flops < budget]
        return [*kept, Phase(schedule_phases[len(kept)].shape, budget)]
    if arm == "naive (equal split)":
        return [Phase(case.shapes[n], budget * (i + 1) / len(names)) for i, n in enumerate(names)]
    return [Phase(case.shapes[arm.removeprefix("static ")], budget)]


def run_case(case: Case, seeds: int, pool, n_boot: int) -> dict:
    started = time.perf_counter()
    proxy_jobs = [(config(case, shape, seed), [Phase(shape, case.proxy_flops)], 0.0)
                  for shape in case.shapes.values() for seed in range(100, 102)]
    proxy = pool.map(execute, proxy_jobs)
    runs = {name: [Run(seed, tuple(curve)) for seed, (_, curve, _) in zip(range(2), proxy[2 * i:2 * i + 2])]
            for i, name in enumerate(case.shapes)}
    fits = fit_shapes(runs, e0=E0, n_bootstrap=n_boot)
    names = list(case.shapes)
    moves = {a: set(names[i + 1:i + 2]) for i, a in enumerate(names)}
    # Bootstrap refits that put E* at zero compute are degenerate (Schedule.saving would divide by 0): drop them.
    replicates = [{n: f.bootstrap[i] for n, f in fits.items()} for i in range(n_boot)]
    replicates = [r for r in replicates if all(law.flops_to_reach(TARGET_LOSS) > 0 for law in r.values())]
    report = schedule_report({n: f.law for n, f in fits.items()}, replicates, START_LOSS, TARGET_LOSS,
                             constraints=ScheduleConstraints(allowed=moves),
                             observed_max_flops={n: f.flops_range[1] for n, f in fits.items()})
    sched = report.schedule
    static_pred = sched.static_flops
    budgets = [f * static_pred for f in BUDGET_FACTORS]
    schedule_phases = phases_from_schedule(sched, case.shapes, budgets[-1])
    arms = ["DP schedule", "naive (equal split)", *[f"static {n}" for n in names]]
    jobs, keys = [], []
    for arm in arms:
        for seed in range(seeds):
            for b in budgets:
                phases = arm_phases(arm, case, schedule_phases, b)
                jobs.append((config(case, phases[0].shape, seed), phases, 0.2))
                keys.append((arm, seed, b))
    results = pool.map(execute, jobs)
    finals = {k: r[0] for k, r in zip(keys, results)}
    reach = {arm: [flops_to_target(budgets, [finals[(arm, s, b)] for b in budgets]) for s in range(seeds)]
             for arm in arms}
    statics = [a for a in arms if a.startswith("static")]
    best_static = min(statics, key=lambda a: np.mean(reach[a]) if all(map(math.isfinite, reach[a])) else math.inf)
    saving = lambda arm, idx: 1 - np.mean([reach[arm][i] for i in idx]) / np.mean([reach[best_static][i] for i in idx])
    rng = np.random.default_rng(0)
    boots = {arm: [saving(arm, rng.integers(0, seeds, seeds)) for _ in range(2000)] for arm in arms}
    return dict(case=case, fits=fits, report=report, budgets=budgets, reach=reach, best_static=best_static,
                saving={a: saving(a, range(seeds)) for a in arms}, boots=boots, finals=finals, proxy=proxy,
                seconds=time.perf_counter() - started, arms=arms)


def fmt_saving(x: float) -> str:
    return f"{100 * x:+.0f}%" if math.isfinite(x) else "n/a"


def summary(out: dict, seeds: int) -> str:
    case, rep = out["case"], out["report"]
    sched = rep.schedule
    segs = " -> ".join(f"{s.shape} (to E={s.e_exit:.2f} at {s.c_exit:.2g} FLOPs)" for s in sched.segments)
    fits = ", ".join(f"{n}: {f.law.form} e_inf={f.law.e_inf:.3f}, extrapolation err {f.extrapolation_error:.3f}"
                     for n, f in out["fits"].items())
    rows = []
    for arm in out["arms"]:
        reach = out["reach"][arm]
        finite = [r for r in reach if math.isfinite(r)]
        b = np.asarray([x for x in out["boots"][arm] if math.isfinite(x)])
        ci = f"[{fmt_saving(np.percentile(b, 5))}, {fmt_saving(np.percentile(b, 95))}]" if b.size else "n/a"
        rows.append([arm, f"{len(finite)}/{seeds}", f"{np.mean(finite):.3g}" if finite else "not reached",
                     fmt_saving(out["saving"][arm]) if arm != out["best_static"] else "(reference)",
                     ci if arm != out["best_static"] else ""])
    table = markdown_table(["arm", "seeds reaching E*", "mean FLOPs to E*", f"saving vs {out['best_static']}",
                            "90% CI (seed bootstrap)"], rows)
    pred = rep.saving
    return (f"### {case.name}\n\nFits: {fits}.\n\nDP schedule: {segs}; predicted static best "
            f"{sched.static_shape} at {sched.static_flops:.3g} FLOPs; **predicted saving "
            f"{fmt_saving(sched.saving)}** (bootstrap 90%: {fmt_saving(pred.lo)} to {fmt_saving(pred.hi)}; "
            f"low confidence: {rep.low_confidence}{' - ' + '; '.join(rep.reasons) if rep.reasons else ''}).\n\n"
            f"{table}\n\nBudgets: {', '.join(f'{b:.3g}' for b in out['budgets'])} FLOPs; {out['seconds']:.0f} s.\n")


def plot(outs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(outs), figsize=(6 * len(outs), 4.2))
    for ax, out in zip(np.atleast_1d(axes), outs):
        for arm in out["arms"]:
            means = [np.nanmean([out["finals"][(arm, s, b)] or np.nan for s in range(len(out["reach"][arm]))])
                     for b in out["budgets"]]
            ax.plot(out["budgets"], means, marker="o", label=arm)
        ax.axhline(TARGET_LOSS, color="k", ls=":", label="E*")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("training FLOPs (budget, each run with its own cooldown)"), ax.set_ylabel("final eval loss")
        ax.set_title(out["case"].name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: patch case only, 20 bootstrap refits")
    args = parser.parse_args()
    seeds, n_boot = 3, (20 if args.quick else 100)
    cases = CASES[:1] if args.quick else CASES
    started = time.perf_counter()
    with make_pool() as pool:
        outs = [run_case(case, seeds, pool, n_boot) for case in cases]
    total = time.perf_counter() - started
    body = "\n".join(summary(o, seeds) for o in outs)
    if args.quick:
        print(body)
        return
    plot(outs, IMG / "adaptive_schedule.png")
    intro = (f"`bench/adaptive_schedule.py`: ViT on digits (8x8), muP, AdamW lr {HP.lr}, batch {BATCH}, E* = "
             f"{TARGET_LOSS} fixed before running, {seeds} seeds per arm, every run a complete WSD schedule "
             f"(20% cooldown) at its own budget; FLOPs-to-E* by log-log interpolation of final loss over the "
             f"budget sweep. Saving = 1 - FLOPs(arm)/FLOPs(best static). FLOPs exclude the proxy runs. "
             f"Total {total / 60:.1f} min on 2 CPU processes.\n\n![adaptive](img/adaptive_schedule.png)\n")
    write_section("Adaptive shape schedules", intro + "\n" + body)
    print(body)


if __name__ == "__main__":
    main()
