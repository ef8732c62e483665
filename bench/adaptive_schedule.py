"""Does an adaptive (joint) shape schedule reach a fixed eval loss E* with fewer FLOPs than the best static shape?

Issue 14's protocol, fixed here before the first run of each case. Cases: (a) the generated `scales` images
(32x32, a coarse blob and a fine 5x5 glyph, 16 classes), ViT over the product patch size {16, 8} x width
{32, 64} (depth 2); (b) byte-level text (pytext, 128-byte windows), GPT over the product context {16, 128} x
depth {1, 2} (width 32); (c) the same text in 32-byte windows, GPT over width {32, 64} x depth {1, 2}; (d) the
`scales` images with fine='texture' (the 5x5 glyph replaced by a period-2 texture on a random 16x16 square, which a
patch-16 kernel PI-resized from the 8x8 base barely sees), ViT over patch size {16, 8} x width {32, 64}; all
muP, AdamW, constant LR after a 2 % warm-up. (1) Proxy runs: every shape, 2 seeds, to CAP_FLOPS, give
(FLOPs, eval loss) curves; scaletune.scaling fits one law per shape (with bootstrap) and the DP plans the
schedule to E* over moves surgery can make (one or two axes at once), predicting the saving. (2) Real runs,
3 seeds each, stop at the first eval where the mean of the last 3 eval losses is <= E* (FLOPs and wall
seconds there) or at CAP_FLOPS ("not reached"): the DP schedule with duplication + noise growth, the DP
schedule with the seed paper's growth rule (new units randomly initialised) when the schedule grows (when it
does not, a naive schedule from the cheapest to the reference shape at half the cheapest shape's predicted
FLOPs to E*, under both growth rules, so the two rules are still measured), and the static shapes the schedule uses plus
the predicted best static and the reference shape. (3) Saving =
1 - FLOPs(arm) / FLOPs(best static arm), with a seed-bootstrap 90 % interval; predicted vs realised; wall
seconds; the proxy sweep charged on its own line with its break-even. Writes its section of
docs/benchmarks.md (cases not rerun and earlier results of the previous protocol are kept).

    .venv/bin/python bench/adaptive_schedule.py [vit-scales] [gpt-text] [gpt-text-width-depth] [vit-texture]
        [vit-texture-rerun] [vit-texture-switch]   (default: all)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from common import BENCHMARKS_MD, make_pool, markdown_table, write_section

from scaletune.adaptive import Phase, phases_from_schedule, run_schedule
from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.runner import TrialConfig
from scaletune.scaling.fit import Run, fit_shapes
from scaletune.scaling.moves import product_shapes, surgery_moves
from scaletune.scaling.schedule import ScheduleConstraints, schedule_report
from scaletune.shapes import Shape
from scaletune.train import Budget, EvalPoint

HEADER = "Adaptive shape schedules"
EARLIER = "### Earlier results (previous protocol: digits and teacher, budget sweeps with cooldowns)"
SEEDS = (0, 1, 2)
PROXY_SEEDS = (100, 101)
SMOOTH = 3  # E* is crossed when the mean of the last SMOOTH eval losses is <= E*
GROWTH_NOISE = 0.5  # x the new plan's init std, for the duplicate rule (as in the previous protocol)
N_BOOT = 100
EVALS_PER_CAP = 30
PROXY_CACHE = Path(tempfile.gettempdir()) / "adaptive_schedule_proxies.json"  # a crash after the proxies loses no runs


@dataclass(frozen=True)
class Case:
    name: str
    dataset_args: dict[str, Any]
    args: dict[str, Any]
    shapes: dict[str, Shape]
    base: Shape
    hparams: HParams
    batch: int
    cap_flops: float
    target_loss: float | None  # E*, fixed before the proxy and real runs; None: by TARGET_RULE from the proxies
    start_loss: float
    e0: float
    pilot_best: str  # the reference static shape (the pilot's best, or the shape a user would train)
    pilot: str
    family: str = "vit"
    dataset: str = "scales"
    extra: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = SEEDS  # of every arm's real runs
    hand_arms: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # name: (shape, until FLOPs)...


CASE = Case(
    "patch {16, 8} x width {32, 64} (ViT, scales 32x32)",
    dataset_args={"eval_size": 1024, "glyph": 3.0, "noise": 0.3}, args={"base_patch": 8},
    shapes=product_shapes(Shape(32, 2), {"patch_size": [16, 8], "width": [32, 64]}), base=Shape(32, 2),
    hparams=HParams(lr=1e-2, warmup_frac=0.02), batch=64, cap_flops=5e10, target_loss=1.35,
    start_loss=2.5, e0=math.log(16), pilot_best="patch_size=16,width=32",
    pilot="a pilot before the first run (seed 0, one run per shape to 1e11 FLOPs, constant LR): every shape learns "
          "the blob by ~1.5e10 (loss ~1.45, near ln 4: quadrant known, glyph not); p16w32 then descends to 1.25 at "
          "4.4e10 and 1.1 at 7e10, p16w64 reaches 1.3 at ~8e10, p8w32 and p8w64 stay near 1.45 to 1e11. E* = 1.35 is "
          "the round level below the blob plateau that p16w32 reaches well inside the 5e10 cap")

TEXTURE_CASE = replace(
    CASE, name="patch {16, 8} x width {32, 64} (ViT, scales 32x32 with a period-2 texture as the fine cue)",
    dataset_args={"eval_size": 1024, "fine": "texture", "glyph": 1.0, "noise": 0.5, "texture": 16},
    cap_flops=1.5e11, target_loss=0.3, pilot_best="patch_size=8,width=32",
    pilot="pilots before the first run, each 1 seed (training seed 0, one run per shape or schedule, constant LR), "
          "that chose the task and E*: (1) the texture in the square's own phase (amplitude 1, noise 0.5) to 3e10 "
          "FLOPs: p16w32 1.39 and p8w32 1.45 at 3e10, both still on the blob plateau (ln 4), so the texture was "
          "put in the image grid's phase, which an 8x8 kernel can detect linearly; (2) that task to 1e11-1.2e11: "
          "p16w32 0.93 at 1.3e10, then a plateau near 0.65-0.69 to 1e11 (the ~3 % of the texture it sees); p16w64 "
          "0.89 at 3.5e10, 0.65-0.80 to 1.2e11; p8w32 1.45 at 1.3e10, 0.94 at 4e10, 0.56 at 7.1e10, 0.21 at 8.1e10, "
          "0.04 at 9.1e10; p8w64 1.10 at 5e10, 0.36 at 7.5e10, 0.10 at 1e11; a switch p16w32 -> p8w32 at 2e10 (duplicate "
          "rule, no width change) reached 0.13 at 3e10 and 0.02 at 4.1e10, one at 4e10 reached 0.36 at 4.7e10 (eval "
          "0.71 -> 1.29 at the switch). E* = 0.3 is the round level well below the patch-16 plateaus that the best "
          "static shape (p8w32) reached at ~8e10; the cap of 1.5e11 leaves it about 2x that. The reference shape is "
          "the pilot's best static shape, p8w32")


def text_case(name: str, seq_len: int, eval_windows: int, axes: dict[str, list[int]], reference: str) -> Case:
    """A GPT case on byte-level Python text (pytext); E* by TARGET_AT from the reference shape's proxies."""
    return Case(
        name, dataset_args={"max_bytes": 2_000_000, "seq_len": seq_len, "eval_windows": eval_windows},
        args={"head_dim": 8}, shapes=product_shapes(Shape(32, 1), axes), base=Shape(32, 2),
        hparams=HParams(lr=1e-2, warmup_frac=0.02), batch=16, cap_flops=1.2e11, target_loss=None, start_loss=4.0,
        e0=math.log(256), pilot_best=reference, family="gpt", dataset="pytext",
        pilot=f"no pilot (2 shared cores); the rule, fixed before the first run: E* = the mean over proxy seeds of "
              f"the reference shape {reference} (what a user would train) smoothed eval loss at the eval nearest "
              "60 % of the cap, so that shape reaches E* inside the cap")


TEXT_CASE = text_case("context {16, 128} x depth {1, 2} (GPT, byte-level Python text)", 128, 64,
                      {"context": [16, 128], "depth": [1, 2]}, "context=128,depth=2")
WIDTH_DEPTH_CASE = text_case("width {32, 64} x depth {1, 2} (GPT, byte-level Python text)", 32, 256,
                             {"width": [32, 64], "depth": [1, 2]}, "width=64,depth=2")
TEXTURE_RERUN = replace(
    TEXTURE_CASE, name=TEXTURE_CASE.name + ", rerun with seeds 0-7", seeds=tuple(range(8)),
    pilot="the first run's E* and protocol unchanged, on the first run's proxy runs (the same plan), with seeds "
          "0-7 per arm (0-2 repeat the first run), fixed after the first run because its DP switched after ~30 "
          "steps at patch 16, too early for the coarse phase to explain its saving; see its reading")
TEXTURE_SWITCH = replace(
    TEXTURE_RERUN, name=TEXTURE_CASE.name + ", diagnostic: a hand-placed switch at 2e10 FLOPs, seeds 0-7",
    hand_arms={"hand-placed patch_size=16,width=32 -> patch_size=8,width=32 at 2e10": (
        ("patch_size=16,width=32", 2e10), ("patch_size=8,width=32", TEXTURE_CASE.cap_flops))},
    pilot="the first run's E*, cap, proxies (so the same DP plan) and seeds 0-7 of the rerun, plus one arm the DP "
          "did not plan: patch 16 (width 32) to 2e10 FLOPs, where pilot 2 had left the coarse plateau (~0.9), then "
          "patch 8; fixed after the rerun, to tell whether a switch after the coarse cue is learnt (the crossing the "
          "task was built for) pays more than the DP's switch after ~34 steps")
CASES = {"vit-scales": CASE, "gpt-text": TEXT_CASE, "gpt-text-width-depth": WIDTH_DEPTH_CASE,
         "vit-texture": TEXTURE_CASE, "vit-texture-rerun": TEXTURE_RERUN, "vit-texture-switch": TEXTURE_SWITCH}
TARGET_AT = 0.6  # TARGET_RULE: E* is the reference shape's smoothed proxy loss at this fraction of the cap


class StopAtTarget:
    """Callback: records (FLOPs, eval loss, wall seconds) and stops once the smoothed eval loss is <= E*."""

    def __init__(self, target: float) -> None:
        self.target, self.points, self.started = target, [], time.perf_counter()

    def __call__(self, point: EvalPoint) -> bool:
        self.points.append((point.flops, point.eval_loss, time.perf_counter() - self.started))
        recent = [loss for _, loss, _ in self.points[-SMOOTH:]]
        return len(recent) == SMOOTH and float(np.mean(recent)) <= self.target


def eval_every(case: Case, shape: Shape) -> int:
    """Steps between evals so that every shape is evaluated about every cap / EVALS_PER_CAP FLOPs."""
    per_step = case.batch * get_family(case.family).train_flops_per_sample(
        shape, dataset_spec(case.dataset, case.dataset_args), case.args)
    return max(1, round(case.cap_flops / EVALS_PER_CAP / per_step))


def config(case: Case, shape: Shape, seed: int, evals_at: Shape | None = None) -> TrialConfig:
    """``evals_at``: the shape whose step cost sets the eval cadence (a schedule's last shape, where E* is met)."""
    return TrialConfig(family=case.family, args=case.args, base=case.base, shape=shape, parametrization="mup",
                       optimizer="adamw", dataset=case.dataset, dataset_args=case.dataset_args, hparams=case.hparams,
                       seed=seed, budget=Budget(steps=1, batch_size=case.batch,
                                                eval_every=eval_every(case, evals_at or shape),
                                                schedule="wsd", decay_frac=0.0))


def execute(job: tuple[TrialConfig, list[Phase], float | None, str]) -> dict[str, Any]:
    """One constant-LR run through ``phases``; with a target it stops at the smoothed crossing of E*."""
    cfg, phases, target, growth = job
    stop = StopAtTarget(target if target is not None else -math.inf)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_schedule(cfg, phases, tmp, callback=stop, noise=GROWTH_NOISE, growth=growth)
    reached = out.train.status == "stopped"
    last = stop.points[-1]
    return {"curve": [(f, l) for f, l, _ in stop.points], "flops": last[0] if reached else math.inf,
            "seconds": last[2] if reached else math.inf, "total_flops": last[0],
            "switches": [(s.flops, s.eval_before, s.eval_after) for s in out.switches]}


def cached(case: Case, compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The proxy runs of this exact case (name, pilot text, seeds and hand-placed arms of the real runs aside: a
    rerun plans on the same proxies) from PROXY_CACHE, else computed and stored there."""
    key = repr((replace(case, name="", pilot="", seeds=SEEDS, hand_arms={}), PROXY_SEEDS, SMOOTH, EVALS_PER_CAP))
    stored = json.loads(PROXY_CACHE.read_text()) if PROXY_CACHE.exists() else {}
    if key not in stored:
        stored[key] = compute()
        PROXY_CACHE.write_text(json.dumps(stored))
    return stored[key]


def schedule_phases(case: Case, schedule) -> list[Phase]:
    return phases_from_schedule(schedule, case.shapes, case.cap_flops)


def target_by_rule(case: Case, runs: dict[str, list[Run]]) -> float:
    """TARGET_RULE: the reference shape's smoothed eval loss at the eval nearest TARGET_AT x cap, mean over seeds."""
    levels = []
    for run in runs[case.pilot_best]:
        flops = [f for f, _ in run.points]
        i = int(np.argmin([abs(f - TARGET_AT * case.cap_flops) for f in flops]))
        levels.append(float(np.mean([loss for _, loss in run.points[max(0, i - SMOOTH + 1):i + 1]])))
    return round(float(np.mean(levels)), 3)


def grows(case: Case, names: list[str]) -> bool:
    """Whether a sequence of shapes ever changes width or depth (where the two growth rules differ)."""
    return any(case.shapes[a].width != case.shapes[b].width or case.shapes[a].depth != case.shapes[b].depth
               for a, b in zip(names, names[1:]))


def run_case(case: Case, pool) -> dict[str, Any]:
    started = time.perf_counter()
    names = list(case.shapes)
    proxy_jobs = [(config(case, case.shapes[n], s), [Phase(case.shapes[n], case.cap_flops)], None, "duplicate")
                  for n in names for s in PROXY_SEEDS]
    proxy = cached(case, lambda: pool.map(execute, proxy_jobs))
    k = len(PROXY_SEEDS)
    runs = {n: [Run(s, tuple(r["curve"])) for s, r in zip(PROXY_SEEDS, proxy[k * i:k * i + k])]
            for i, n in enumerate(names)}
    proxy_flops = sum(r["total_flops"] for r in proxy)
    proxy_seconds = time.perf_counter() - started
    case = replace(case, target_loss=case.target_loss or target_by_rule(case, runs))
    fits = fit_shapes(runs, e0=case.e0, n_bootstrap=N_BOOT)
    replicates = [{n: f.bootstrap[i] for n, f in fits.items()} for i in range(N_BOOT)]
    replicates = [r for r in replicates if all(law.flops_to_reach(case.target_loss) > 0 for law in r.values())]
    report = schedule_report({n: f.law for n, f in fits.items()}, replicates, case.start_loss, case.target_loss,
                             constraints=ScheduleConstraints(allowed=surgery_moves(case.shapes, max_axes=2)),
                             observed_max_flops={n: f.flops_range[1] for n, f in fits.items()})
    sched = report.schedule
    planned = schedule_phases(case, sched)
    used = [s.shape for s in sched.segments]
    arms: dict[str, tuple[list[Phase], str]] = {}
    if len(used) > 1:
        arms["DP schedule (duplicate + noise)"] = (planned, "duplicate")
        if grows(case, used):
            arms["DP schedule (paper rule: random init)"] = (planned, "random")
    if not grows(case, used):
        cheapest = min(names, key=lambda n: get_family(case.family).train_flops_per_sample(
            case.shapes[n], dataset_spec(case.dataset, case.dataset_args), case.args))
        half = fits[cheapest].law.flops_to_reach(case.target_loss) / 2  # grow before the cheapest reaches E*
        if cheapest != case.pilot_best and 0 < half < case.cap_flops:
            naive = [Phase(case.shapes[cheapest], half), Phase(case.shapes[case.pilot_best], case.cap_flops)]
            arms[f"naive {cheapest} -> {case.pilot_best} at half (duplicate + noise)"] = (naive, "duplicate")
            arms[f"naive {cheapest} -> {case.pilot_best} at half (paper rule: random init)"] = (naive, "random")
    for name, hand in case.hand_arms.items():
        arms[name] = ([Phase(case.shapes[shape], until) for shape, until in hand], "duplicate")
    for name in dict.fromkeys([*used, sched.static_shape, case.pilot_best]):
        arms[f"static {name}"] = ([Phase(case.shapes[name], case.cap_flops)], "duplicate")
    seeds = case.seeds
    keys = [(arm, s) for arm in arms for s in seeds]
    jobs = [(config(case, arms[arm][0][0].shape, s, arms[arm][0][-1].shape), arms[arm][0], case.target_loss,
             arms[arm][1]) for arm, s in keys]
    results = dict(zip(keys, pool.map(execute, jobs)))
    reach = {arm: [results[(arm, s)]["flops"] for s in seeds] for arm in arms}
    wall = {arm: [results[(arm, s)]["seconds"] for s in seeds] for arm in arms}
    statics = [a for a in arms if a.startswith("static")]
    best = min(statics, key=lambda a: np.mean(reach[a]))
    if len(used) == 1:  # the DP plans one shape: its arm is that static arm, run once
        arms = {"DP schedule (no switch planned)": arms[f"static {used[0]}"], **arms}
        reach["DP schedule (no switch planned)"] = reach[f"static {used[0]}"]
        wall["DP schedule (no switch planned)"] = wall[f"static {used[0]}"]
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(seeds), len(seeds)) for _ in range(2000)]

    def saving(values: dict[str, list[float]], arm: str, idx) -> float:
        ref = np.mean([values[best][i] for i in idx])
        return 1 - np.mean([values[arm][i] for i in idx]) / ref if math.isfinite(ref) else math.nan

    return dict(case=case, fits=fits, report=report, arms=list(arms), reach=reach, wall=wall, best=best,
                saving={a: saving(reach, a, range(len(seeds))) for a in arms},
                boots={a: [saving(reach, a, i) for i in draws] for a in arms},
                wall_saving={a: saving(wall, a, range(len(seeds))) for a in arms},
                switches={a: [results[(a, s)]["switches"] for s in seeds] for a in arms if (a, seeds[0]) in results},
                proxy_flops=proxy_flops, proxy_seconds=proxy_seconds, seconds=time.perf_counter() - started)


def pct(x: float) -> str:
    return f"{100 * x:+.0f}%" if math.isfinite(x) else "n/a"


def mean_or_none(values: list[float], fmt: str) -> str:
    return format(np.mean(values), fmt) if all(map(math.isfinite, values)) else (
        f"{sum(map(math.isfinite, values))}/{len(values)} reached")


def summary(out: dict[str, Any]) -> str:
    case, rep = out["case"], out["report"]
    sched = rep.schedule
    segs = " -> ".join(f"{s.shape} (to E={s.e_exit:.2f} at {s.c_exit:.2g} FLOPs)" for s in sched.segments)
    fits = "; ".join(f"{n}: {f.law.form} e_inf={f.law.e_inf:.3f}, extrapolation err {f.extrapolation_error:.3f}"
                     for n, f in out["fits"].items())
    rows = []
    for arm in out["arms"]:
        b = np.asarray([x for x in out["boots"][arm] if math.isfinite(x)])
        is_ref = arm == out["best"]
        ci = "" if is_ref or not b.size or not all(map(math.isfinite, out["reach"][arm])) else (
            f"[{pct(np.percentile(b, 5))}, {pct(np.percentile(b, 95))}]")
        rows.append([arm, f"{sum(map(math.isfinite, out['reach'][arm]))}/{len(case.seeds)}",
                     mean_or_none(out["reach"][arm], ".3g"), mean_or_none(out["wall"][arm], ".0f"),
                     "(reference)" if is_ref else pct(out["saving"][arm]), ci,
                     "" if is_ref else pct(out["wall_saving"][arm])])
    table = markdown_table(["arm", "seeds reaching E*", "mean FLOPs to E*", "mean wall s to E*",
                            f"FLOPs saving vs {out['best']}", "90% CI (seed bootstrap)", "wall saving"], rows)
    switch_lines = [f"{arm}: " + "; ".join(
        ", ".join(f"at {f:.2g} FLOPs eval {a:.3f} -> {b:.3f}" for f, a, b in per_seed) or "no switch"
        for per_seed in sw) for arm, sw in out["switches"].items() if not arm.startswith("static")]
    dp_arms = [a for a in out["arms"] if a.startswith("DP")]
    dp = min(dp_arms, key=lambda a: np.mean(out["reach"][a]))
    gain = np.mean(out["reach"][out["best"]]) - np.mean(out["reach"][dp])
    break_even = (f"{math.ceil(out['proxy_flops'] / gain)} target runs" if math.isfinite(gain) and gain > 0
                  else "never (no realised gain)")
    with_proxy = (1 - (np.mean(out["reach"][dp]) + out["proxy_flops"]) / np.mean(out["reach"][out["best"]]))
    return (f"### {case.name}\n\n{case.family} on {case.dataset} "
            f"({', '.join(f'{k}={v}' for k, v in case.dataset_args.items())}), "
            f"muP, AdamW lr {case.hparams.lr} constant after {case.hparams.warmup_frac:.0%} warm-up, batch "
            f"{case.batch}, eval about every {case.cap_flops / EVALS_PER_CAP:.2g} FLOPs; **E* = {case.target_loss}** (chance {case.e0:.2f}); "
            f"cap {case.cap_flops:.2g} FLOPs per run; how E* was fixed: {case.pilot}.\n\n"
            f"Fits: {fits}.\n\nDP schedule (moves of one or two axes): {segs}; predicted best static "
            f"{sched.static_shape} at {sched.static_flops:.3g} FLOPs; **predicted saving {pct(sched.saving)}** "
            f"(bootstrap 90%: {pct(rep.saving.lo)} to {pct(rep.saving.hi)}; low confidence: {rep.low_confidence}"
            f"{' - ' + '; '.join(rep.reasons) if rep.reasons else ''}).\n\n{table}\n\n"
            + ("Switches per seed: " + " | ".join(switch_lines) + "\n\n" if switch_lines else "")
            + f"FLOPs to E* per seed ({', '.join(map(str, case.seeds))}): " + " | ".join(
                f"{arm}: " + ", ".join(format(f, ".3g") for f in out["reach"][arm]) for arm in out["arms"]) + "\n\n"
            + f"Proxy sweep: {out['proxy_flops']:.3g} FLOPs ({len(out['fits'])} shapes x {len(PROXY_SEEDS)} seeds, "
            f"{out['proxy_seconds']:.0f} s wall); best DP arm's saving with it charged: {pct(with_proxy)}; break-even: "
            f"{break_even}. Case total {out['seconds'] / 60:.1f} min.\n")


def kept_results(rerun: list[Case]) -> str:
    """The section's results of cases not rerun now and its earlier results, kept verbatim."""
    text = BENCHMARKS_MD.read_text()
    match = re.search(rf"^## {re.escape(HEADER)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not match:
        return ""
    body = match.group(1)
    if EARLIER not in body:
        return EARLIER + "\n\n" + re.sub(r"^### ", "#### ", body.strip(), flags=re.M)
    current, earlier = body[:body.index(EARLIER)], body[body.index(EARLIER):].strip()
    blocks = re.findall(r"^### .*?(?=^### |\Z)", current, re.S | re.M)
    names = {f"### {case.name}" for case in rerun}
    return "\n".join(b.strip() + "\n" for b in blocks if b.splitlines()[0] not in names) + "\n" + earlier


def main() -> None:
    cases = [CASES[name] for name in sys.argv[1:]] or list(CASES.values())
    kept = kept_results(cases)
    with make_pool() as pool:
        bodies = [summary(run_case(case, pool)) for case in cases]
    body = "\n".join(bodies)
    intro = (f"`bench/adaptive_schedule.py` (issue 14 protocol, fixed in the file before the first run of each case): "
             f"{len(SEEDS)} seeds per arm (unless a case names more), {len(PROXY_SEEDS)} proxy seeds per shape, every run at constant LR and "
             f"stopped at the first eval where the mean of the last {SMOOTH} eval losses is <= E* (FLOPs-to-E* and "
             f"wall seconds there; 'not reached' by the cap). Saving = 1 - FLOPs(arm)/FLOPs(best static arm), proxy "
             f"FLOPs charged on their own line. Duplicate growth adds noise {GROWTH_NOISE} x init std. Each case "
             f"ran on 2 CPU processes of a 2-core machine, load average (1/5/15 min) "
             f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end (above about 2, other work shared the "
             f"cores: wall seconds are then pessimistic and noisy).\n")
    write_section(HEADER, intro + "\n" + body + ("\n" + kept if kept else ""))
    print(body)


if __name__ == "__main__":
    main()
