"""Does the optimal learning rate (or another tuned value) hold as models grow? Sweeps over width/depth ladders.

``--study lr`` (default): for ``mlp`` (teacher data) and ``gpt`` (pytext), sweep log2 LR at every size of a
width ladder (16x, sp and mup, two seeds) and a depth ladder from base depth 2 (8x, mup, depth_mup and
completep, three seeds); the optimum per size is the transfer check's parabola. The LR grid is adaptive to
save compute: 1-octave steps around a start point, extended while the minimum sits at an edge, then refined
with the half-octave neighbours of the minimum.

``--study hparams``: the same question for every value a transfer check can vary (lr, output_mult, init_std,
weight_decay, warmup_frac, attn_mult), one row each, on smaller budgets: mup along width, completep along
depth, three seeds, 1-octave grids extended at edges; the same run sweeps the width ladders' LR again with the
relative clipping rule, for a second section (with the global gradient norm at init per size: why a fixed
clipping norm confounds a transfer).

``--study hparams-long``: the rows of ``--study hparams`` that drifted at its 40-80 steps, again at the LR
study's budgets (its steps per family and axis), to see whether TP5's claim fails or the budget was too short.
Protocol fixed 2026-12-03 before the run: the ``hparams`` ladders (sizes, seeds, parametrizations, held LR,
starts) with only the steps changed (mlp width 300, mlp depth 600, gpt width 150, gpt depth 300) and up to
three edge extensions instead of two; rows, in the order they are kept if the CPU does not allow all:
mlp width lr and output_mult, gpt width output_mult, gpt depth attn_mult, mlp depth weight_decay.

``--study hparams-readout``: does the ``output_mult`` drift along width that ``hparams-long`` measured come from
the normally initialised readout (its 1/m multiplier shrinks the logits at init like m^-1/2, so a finite run may
prefer a larger multiplier at larger width)? Protocol fixed 2026-12-03 before the run: the ``hparams-long``
width rows exactly (same ladders, steps, seeds, held LR, starts, grid rule with up to three edge extensions), with
only ``zero_init_readout`` True (the product's default for the muP family; ``zero_init_query`` stays False);
rows, in the order they are kept if the CPU does not allow all: gpt width output_mult, mlp width output_mult,
and the LR rows of the same two ladders (gpt width, mlp width; the held LR was tuned with a normal readout).

Each study writes its own sections of docs/benchmarks.md and its plots into docs/img/.

    .venv/bin/python bench/transfer_landscape.py [--study lr|hparams|hparams-long|hparams-readout] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import IMG, PARAM_OPTIONS, Outcome, make_pool, markdown_table, run_config, write_section

from scaletune.hparams import HParams
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import Budget
from scaletune.transfer_check import SizeResult, TransferCheckResult, analyse, draw

SECTION = "Transfer landscape: does the optimal LR hold across width and depth?"
WARMUP_FRAC = 0.05
MAX_EXTENSIONS = 4  # octaves an LR sweep may walk beyond its start window
WIDTH_TARGETS = {"mup": "drift <= 0.5", "sp": "drift >= 1.5"}
DEPTH_TARGETS = {"depth_mup": "drift <= 0.5", "completep": "drift <= 0.5"}


@dataclass(frozen=True)
class Ladder:
    """Sizes along one axis for one family; the first shape is the base (proxy) shape.

    ``hparam`` is the value swept (log2 grid starting at ``start_log2``); ``fixed`` holds the other values in
    base units; ``tag`` tells apart ladders that differ only in options (e.g. clipping).
    """

    family: str
    args: dict[str, Any]
    dataset: str
    dataset_args: dict[str, Any]
    axis: str
    shapes: tuple[Shape, ...]
    parametrizations: tuple[str, ...]
    budget: Budget
    seeds: tuple[int, ...]
    start_log2: float
    start_halfwidth: int
    hparam: str = "lr"
    fixed: tuple[tuple[str, float], ...] = ()
    optimizer: str = "adamw"
    options: tuple[tuple[str, Any], ...] = tuple(PARAM_OPTIONS.items())
    tag: str = ""

    @property
    def name(self) -> str:
        parts = [self.family, self.axis, "" if self.hparam == "lr" else self.hparam,
                 "" if self.optimizer == "adamw" else self.optimizer, self.tag]
        return "-".join(p for p in parts if p)

    def label(self, shape: Shape) -> str:
        return f"w{shape.width}" if self.axis == "width" else f"d{shape.depth}"

    def config(self, parametrization: str, shape: Shape, log2_value: float, seed: int) -> TrialConfig:
        values = {"warmup_frac": WARMUP_FRAC, **dict(self.fixed), self.hparam: 2.0 ** log2_value}
        return TrialConfig(
            family=self.family, args=self.args, base=self.shapes[0], shape=shape, parametrization=parametrization,
            optimizer=self.optimizer, dataset=self.dataset, dataset_args=self.dataset_args, budget=self.budget,
            hparams=HParams(**values), seed=seed, device="cpu", options=dict(self.options),
        )


def ladders(quick: bool) -> list[Ladder]:
    """Width ladders keep depth fixed (r = 1, where depth_mup and completep equal mup, so they are not run).

    Depth ladders start at depth 2 (depth-muP and CompleteP are infinite-depth limits; from depth 1 the first
    step is far from the limit) and keep width fixed at the base, where mup with these options *is* SP, so SP is
    not run twice. Their tasks are ones where depth lowers the loss (100-class teacher for mlp; pytext for gpt)
    and their budgets are long enough that depth pays (pilots in docs/benchmarks.md).
    """
    widths = (16, 64) if quick else (16, 64, 256)
    depths = (2, 4) if quick else (2, 4, 8, 16)
    width_seeds, depth_seeds = ((0, 1), (0, 1)) if quick else ((0, 1), (0, 1, 2))
    halfwidth = 1 if quick else 2
    gpt_data = dict(family="gpt", args={"head_dim": 8}, dataset="pytext",
                    dataset_args={"seq_len": 32, "max_bytes": 2_000_000, "eval_windows": 256})
    depth_parametrizations = ("mup", "depth_mup", "completep")
    return [
        Ladder(family="mlp", args={}, dataset="teacher", dataset_args={}, axis="width",
               shapes=tuple(Shape(w, 2) for w in widths), parametrizations=("sp", "mup"),
               budget=Budget(steps=40 if quick else 300, batch_size=32, eval_every=10_000), seeds=width_seeds,
               start_log2=-5.0, start_halfwidth=halfwidth),
        Ladder(family="mlp", args={}, dataset="teacher", dataset_args={"classes": 100, "teacher_width": 256},
               axis="depth", shapes=tuple(Shape(64, d) for d in depths), parametrizations=depth_parametrizations,
               budget=Budget(steps=40 if quick else 600, batch_size=32, eval_every=10_000), seeds=depth_seeds,
               start_log2=-5.0, start_halfwidth=1),
        Ladder(**gpt_data, axis="width", shapes=tuple(Shape(w, 2) for w in widths), parametrizations=("sp", "mup"),
               budget=Budget(steps=30 if quick else 150, batch_size=8, eval_every=10_000), seeds=width_seeds,
               start_log2=-5.0, start_halfwidth=halfwidth),
        Ladder(**gpt_data, axis="depth", shapes=tuple(Shape(32, d) for d in depths),
               parametrizations=depth_parametrizations,
               budget=Budget(steps=30 if quick else 300, batch_size=8, eval_every=10_000), seeds=depth_seeds,
               start_log2=-6.0, start_halfwidth=1),
    ]


GPT_DATA: dict[str, Any] = dict(family="gpt", args={"head_dim": 8}, dataset="pytext",
                                dataset_args={"seq_len": 32, "max_bytes": 2_000_000, "eval_windows": 256})
# The swept values' starting points (log2, base units): the library defaults, weight decay at 0.125 and warmup
# at 1/16 (the defaults 0 have no log2 grid). The LR each ladder holds while another value is swept is the
# base size's optimum of the LR study above, rounded to a half octave.
HPARAM_STARTS = {"output_mult": 0.0, "init_std": 0.0, "attn_mult": 0.0, "weight_decay": -3.0, "warmup_frac": -4.0}
HPARAM_EXTENSIONS = 2


def hparam_base_ladders(quick: bool) -> list[tuple[Ladder, float]]:
    """(LR ladder, the LR it holds for other sweeps): mup along 16x width, completep along 8x depth, 3 seeds.

    Budgets are shorter than the LR study's (2 shared CPU cores; ~800 runs): the question is whether each
    value's optimum moves with size at a fixed budget, not the best loss. Reduced again before the first full
    results (two starts were stopped unfinished when the shared 2-core machine's load rose to ~12): the mlp
    ladders train 80 steps (was 150), gpt-depth 40 (was 60), and gpt-width 40 steps (was 80) on widths 8, 32, 128
    (still 16x; w256 runs were ~70% of the study's compute).
    """
    widths = (16, 64) if quick else (16, 64, 256)
    gpt_widths = (16, 64) if quick else (8, 32, 128)
    depths = (2, 4) if quick else (2, 4, 16)
    seeds = (0, 1, 2)

    def steps(n: int, mlp: bool = False) -> Budget:
        return Budget(steps=20 if quick else n, batch_size=32 if mlp else 8, eval_every=10_000)

    return [
        (Ladder(family="mlp", args={}, dataset="teacher", dataset_args={}, axis="width",
                shapes=tuple(Shape(w, 2) for w in widths), parametrizations=("mup",), budget=steps(80, mlp=True),
                seeds=seeds, start_log2=-4.0, start_halfwidth=1), -4.0),
        (Ladder(family="mlp", args={}, dataset="teacher", dataset_args={"classes": 100, "teacher_width": 256},
                axis="depth", shapes=tuple(Shape(32, d) for d in depths), parametrizations=("completep",),
                budget=steps(80, mlp=True), seeds=seeds, start_log2=-5.0, start_halfwidth=1), -5.0),
        (Ladder(**GPT_DATA, axis="width", shapes=tuple(Shape(w, 2) for w in gpt_widths), parametrizations=("mup",),
                budget=steps(40), seeds=seeds, start_log2=-4.5, start_halfwidth=1), -4.5),
        (Ladder(**GPT_DATA, axis="depth", shapes=tuple(Shape(32, d) for d in depths),
                parametrizations=("completep",), budget=steps(40), seeds=seeds, start_log2=-6.0,
                start_halfwidth=1), -6.0),
    ]


def hparam_ladders(quick: bool) -> list[Ladder]:
    """One ladder per (family, axis, value): the LR ladder, each other value swept with the LR held, and the
    width LR ladders again with the relative clipping rule."""
    relative = tuple({**PARAM_OPTIONS, "grad_clip": "relative"}.items())
    out = []
    for lr_ladder, log2_lr in hparam_base_ladders(quick):
        out.append(lr_ladder)
        if lr_ladder.axis == "width":
            out.append(replace(lr_ladder, options=relative, tag="clip"))
        for hparam, start in HPARAM_STARTS.items():
            if hparam == "attn_mult" and lr_ladder.family != "gpt":
                continue  # no attention in the mlp
            out.append(replace(lr_ladder, hparam=hparam, start_log2=start, fixed=(("lr", 2.0 ** log2_lr),)))
    return out


# --study hparams-long: the drifting rows, in the order they are kept, at the LR study's steps per ladder
LONG_ROWS = (("mlp", "width", "lr"), ("mlp", "width", "output_mult"), ("gpt", "width", "output_mult"),
             ("gpt", "depth", "attn_mult"), ("mlp", "depth", "weight_decay"))
LONG_STEPS = {("mlp", "width"): 300, ("mlp", "depth"): 600, ("gpt", "width"): 150, ("gpt", "depth"): 300}
LONG_EXTENSIONS = 3


def long_hparam_ladders(quick: bool, rows: tuple[tuple[str, str, str], ...] = LONG_ROWS) -> list[Ladder]:
    """The ``hparams`` ladders of ``rows`` with the LR study's steps (20 when quick, as there)."""
    by_row = {(ld.family, ld.axis, ld.hparam): ld for ld in hparam_ladders(quick) if not ld.tag}
    return [by_row[row] if quick else replace(by_row[row], budget=replace(by_row[row].budget,
                                                                          steps=LONG_STEPS[row[:2]]))
            for row in rows]


# --study hparams-readout: the width rows of hparams-long with the readout zero-initialised, in the order kept
READOUT_ROWS = (("gpt", "width", "output_mult"), ("mlp", "width", "output_mult"), ("gpt", "width", "lr"),
                ("mlp", "width", "lr"))
ZERO_READOUT = tuple({**PARAM_OPTIONS, "zero_init_readout": True}.items())


def readout_hparam_ladders(quick: bool) -> list[Ladder]:
    """The ``hparams-long`` ladders of READOUT_ROWS with only ``zero_init_readout`` switched on."""
    return [replace(ld, options=ZERO_READOUT) for ld in long_hparam_ladders(quick, READOUT_ROWS)]


Key = tuple[str, str, str]  # (ladder name, parametrization, size label)


class AdaptiveSweep:
    """Per (ladder, parametrization, size): the log2 values tried and every seed's outcome at each."""

    def __init__(self, all_ladders: list[Ladder], max_extensions: int = MAX_EXTENSIONS) -> None:
        self.max_extensions = max_extensions
        self.ladders = {ladder.name: ladder for ladder in all_ladders}
        self.shapes = {(ladder.name, ladder.label(s)): s for ladder in all_ladders for s in ladder.shapes}
        self.results: dict[Key, dict[float, list[Outcome]]] = {}
        self.extensions: dict[Key, int] = {}
        self.pending: dict[Key, set[float]] = {}
        for ladder in all_ladders:
            for p in ladder.parametrizations:
                for shape in ladder.shapes:
                    key = (ladder.name, p, ladder.label(shape))
                    h = ladder.start_halfwidth
                    self.pending[key] = {ladder.start_log2 + k for k in range(-h, h + 1)}
                    self.results[key], self.extensions[key] = {}, 0

    def run_pending(self, pool: Any) -> int:
        jobs = [(key, x, seed) for key, xs in self.pending.items() for x in sorted(xs)
                for seed in self.ladders[key[0]].seeds]
        jobs.sort(key=lambda job: -self.cost(job[0]))  # longest first, so both processes finish together
        configs = [self.ladders[k[0]].config(k[1], self.shapes[(k[0], k[2])], x, seed) for k, x, seed in jobs]
        for (key, x, _), outcome in zip(jobs, pool.map(run_config, configs, chunksize=1)):
            self.results[key].setdefault(x, []).append(outcome)
        self.pending = {}
        return len(jobs)

    def cost(self, key: Key) -> float:
        """Relative cost of one run: steps x batch x width^2 x depth (gpt sequences count 32x an mlp sample)."""
        ladder, shape = self.ladders[key[0]], self.shapes[(key[0], key[2])]
        per_sample = 32 if ladder.family == "gpt" else 1
        return ladder.budget.steps * ladder.budget.batch_size * per_sample * shape.width ** 2 * shape.depth

    def mean_loss(self, key: Key, x: float) -> float:
        losses = [o.loss for o in self.results[key][x]]
        return math.inf if any(v is None for v in losses) else sum(losses) / len(losses)

    def best(self, key: Key) -> tuple[float, list[float]]:
        xs = sorted(self.results[key])
        return min(xs, key=lambda x: self.mean_loss(key, x)), xs

    def extend_edges(self) -> bool:
        """Walk one octave further wherever the best LR is the lowest tried, or the highest and not diverged."""
        for key in self.results:
            x, xs = self.best(key)
            if self.extensions[key] >= self.max_extensions or math.isinf(self.mean_loss(key, x)):
                continue
            if x == xs[0] or x == xs[-1]:
                self.pending[key] = {x - 1.0 if x == xs[0] else x + 1.0}
                self.extensions[key] += 1
        return bool(self.pending)

    def refine(self) -> None:
        """Add the half-octave neighbours of each minimum, so the parabola is fitted at 0.5-octave spacing."""
        for key in self.results:
            x, xs = self.best(key)
            self.pending[key] = {x - 0.5, x + 0.5} - set(xs)

    def records(self, ladder: Ladder, parametrization: str) -> list[dict[str, Any]]:
        rows = []
        for shape in ladder.shapes:
            key = (ladder.name, parametrization, ladder.label(shape))
            for x, outcomes in self.results[key].items():
                for seed, o in zip(ladder.seeds, outcomes):
                    rows.append({"size": ladder.label(shape), "shape": shape.to_dict(), "log2_value": x, "seed": seed,
                                 "loss": o.loss})
        return rows


def target_met(ladder: Ladder, parametrization: str, result: TransferCheckResult) -> str:
    targets = WIDTH_TARGETS if ladder.axis == "width" else DEPTH_TARGETS
    if parametrization not in targets or result.max_drift is None:
        return "-"
    drift = abs(result.max_drift)
    ok = drift <= 0.5 if targets[parametrization].startswith("drift <=") else drift >= 1.5
    return f"{targets[parametrization]}: {'met' if ok else 'NOT met'}"


def figure(panels: list[tuple[str, TransferCheckResult]], out: Path) -> Path:
    """One loss-vs-log2-value panel per (title, result), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, result) in zip(axes[0], panels):
        drift = "-" if result.max_drift is None else f"{result.max_drift:+.2f}"
        draw(result, ax, title=f"{title}: drift {drift} oct, {result.verdict}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def fmt_interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def fmt_optimum(s: SizeResult) -> str:
    if s.optimum_log2 is None:
        return "all diverged"
    edge = " (edge)" if s.at_edge else ""
    interval = "" if s.interval is None else f" [{s.interval[0]:.2f}, {s.interval[1]:.2f}]"
    return f"{s.size}: {s.optimum_log2:.2f}{interval}{edge}"


def report(all_ladders: list[Ladder], sweep: AdaptiveSweep, img_dir: Path, runs: int, wall: float,
           cpu: float, quick: bool) -> str:
    rows, images = [], []
    for ladder in all_ladders:
        results = {p: analyse(sweep.records(ladder, p)) for p in ladder.parametrizations}
        images.append(figure([(f"{ladder.name} {p}", r) for p, r in results.items()],
                             img_dir / f"transfer_landscape_{ladder.name}.png"))
        for p, result in results.items():
            losses = ", ".join(f"{s.best_loss:.3f}" if s.best_loss is not None else "-" for s in result.sizes)
            rows.append([ladder.family, ladder.axis, p, "<br>".join(fmt_optimum(s) for s in result.sizes),
                         "-" if result.max_drift is None else f"{result.max_drift:+.2f}", losses,
                         "yes" if result.monotone else "no", result.verdict, target_met(ladder, p, result)])
    table = markdown_table(["family", "axis", "parametrization", "optimum log2 LR per size [bootstrap 95%]",
                            "drift (oct)", "best loss per size", "monotone", "verdict", "target"], rows)
    setup = "\n".join(
        f"- `{ld.name}`: {ld.dataset} {ld.dataset_args or ''}, args {ld.args or '{}'}, sizes "
        f"{', '.join(ld.label(s) for s in ld.shapes)} (base {ld.label(ld.shapes[0])}, "
        f"{'depth' if ld.axis == 'width' else 'width'} {ld.shapes[0].depth if ld.axis == 'width' else ld.shapes[0].width}), "
        f"AdamW, {ld.budget.steps} steps, batch {ld.budget.batch_size}, cosine, warmup {WARMUP_FRAC:.0%}, "
        f"{len(ld.seeds)} seeds, {', '.join(ld.parametrizations)}, LR start 2^{ld.start_log2:g} "
        f"+- {ld.start_halfwidth} oct"
        for ld in all_ladders)
    pictures = "\n".join(f"![{p.stem}](img/{p.name})" for p in images)
    return f"""Command: `.venv/bin/python bench/transfer_landscape.py{' --quick' if quick else ''}`
({runs} training runs, {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min, 2 processes on 2 CPU cores, load average
(1/5/15 min) {", ".join(f"{v:.2f}" for v in os.getloadavg())} at the end: above about 2, wall time is inflated by other work).

{setup}

LR sweep: log2 grid, 1-octave steps around the ladder's start (below) extended (up to {MAX_EXTENSIONS}
octaves) while the seed-mean minimum sits at an edge, then the half-octave neighbours of the minimum; the
optimum is the parabola through the grid minimum and its neighbours (`scaletune.transfer_check`), its interval
a bootstrap over seeds; drift is the largest move vs the smallest size, in octaves (negative = lower LR).
A point where any seed diverged counts as diverged. Options: {PARAM_OPTIONS} (readout and query initialised
normally, not zero). On the width ladders depth is fixed (r = 1), where depth_mup
and completep are identical to mup, so they are not re-run; on the depth ladders width is fixed at the base
(m = 1), where mup with these options is exactly SP, so the `mup` rows there are also SP. Targets: drift <= 0.5 octave along width for the
muP family and along depth for depth_mup/completep; SP drifts >= 1.5 along width.

{table}

{pictures}
"""


HPARAM_SECTION = "Transfer landscape per hyperparameter: does every tuned value hold across width and depth?"
HPARAM_LONG_SECTION = "Transfer landscape per hyperparameter at the LR study's budgets: the rows that drifted"
HPARAM_READOUT_SECTION = "Rerun of the width rows with the readout zero-initialised"  # a ### under the LONG section
CLIP_SECTION = "Transfer landscape with and without gradient clipping"


def analysed(sweep: AdaptiveSweep, ladder: Ladder) -> TransferCheckResult:
    (parametrization,) = ladder.parametrizations
    return analyse(sweep.records(ladder, parametrization), hparam=ladder.hparam)


def result_cells(result: TransferCheckResult) -> list[str]:
    """optima per size, drift with its interval, best loss per size, verdict, target."""
    losses = ", ".join(f"{s.best_loss:.3f}" if s.best_loss is not None else "-" for s in result.sizes)
    drift = "-" if result.max_drift is None else f"{result.max_drift:+.2f}{fmt_interval(result.max_drift_interval)}"
    met = "-" if result.max_drift is None else "met" if abs(result.max_drift) <= result.tolerance else "NOT met"
    if any(s.at_edge for s in result.sizes):
        met += " (an optimum at the edge: a bound)"
    return ["<br>".join(fmt_optimum(s) for s in result.sizes), drift, losses, result.verdict, met]


def hparam_report(all_ladders: list[Ladder], sweep: AdaptiveSweep, img_dir: Path, timing: str,
                  study: str = "hparams") -> str:
    rows, images = [], []
    groups: dict[str, list[tuple[str, TransferCheckResult]]] = {}
    for ladder in all_ladders:
        if ladder.tag:
            continue
        result = analysed(sweep, ladder)
        held = "-" if ladder.hparam == "lr" else f"2^{math.log2(dict(ladder.fixed)['lr']):g}"
        rows.append([ladder.family, ladder.axis, ladder.parametrizations[0], ladder.hparam, held,
                     *result_cells(result)])
        groups.setdefault(f"{ladder.family}-{ladder.axis}", []).append((ladder.hparam, result))
    for name, panels in groups.items():
        images.append(figure(panels, img_dir / f"transfer_landscape_{study.replace('-', '_')}_{name}.png"))
    table = markdown_table(["family", "axis", "parametrization", "value swept", "LR held", "optimum log2 value "
                            "per size [bootstrap 95%]", "drift (oct) [95%]", "best loss per size", "verdict",
                            "drift <= 0.5"], rows)
    pictures = "\n".join(f"![{p.stem}](img/{p.name})" for p in images)
    ladders_run = "\n".join(
        f"- `{ld.family}-{ld.axis}` {ld.hparam}: sizes {', '.join(ld.label(s) for s in ld.shapes)}, "
        f"{ld.parametrizations[0]}, {ld.budget.steps} steps, batch {ld.budget.batch_size}, {len(ld.seeds)} seeds"
        for ld in all_ladders)
    if study == "hparams-readout":
        return f"""{timing}.

Protocol, fixed before the run: the width rows of the section above exactly (same ladders, steps, seeds, held LR,
starts, grid rule with up to {LONG_EXTENSIONS} edge extensions, no half-octave refinement), with only the readout
zero-initialised: options {dict(ZERO_READOUT)} (`zero_init_readout` is the product's default for the muP family).
Rows: output_mult on both width ladders, and their LR rows (the held LR was tuned with a normal readout). The
verdict is the transfer check's (`holds` needs every drift's 95% interval within +-0.5 octave); the target, TP5's
claim, is |drift| <= 0.5 octave.

{ladders_run}

{table}

{pictures}
"""
    if study == "hparams-long":
        return f"""{timing}.

Protocol, fixed before the run: the rows of the per-hyperparameter section that drifted (or moved by more
than the tolerance) at its 40-80 steps, again with that section's ladders, seeds, held LR and starts, but at
the LR study's steps per family and axis, and with up to {LONG_EXTENSIONS} edge extensions (was {HPARAM_EXTENSIONS}).
Grid: log2 of the value, 1-octave steps, the start +- 1 octave; no half-octave refinement. The verdict is the
transfer check's (`holds` needs every drift's 95% interval within +-0.5 octave); the target, TP5's claim, is
|drift| <= 0.5 octave.

{ladders_run}

{table}

{pictures}
"""
    setup = "\n".join(
        f"- `{ld.family}-{ld.axis}`: {ld.dataset} {ld.dataset_args or ''}, args {ld.args or '{}'}, sizes "
        f"{', '.join(ld.label(s) for s in ld.shapes)}, {ld.parametrizations[0]}, AdamW, {ld.budget.steps} steps, "
        f"batch {ld.budget.batch_size}, cosine, {len(ld.seeds)} seeds"
        for ld in all_ladders if ld.hparam == "lr" and not ld.tag)
    return f"""{timing}.

Protocol, fixed before the run: every value a transfer check can vary, one row each, on each family's
width ladder (16x, mup) and depth ladder (8x from base depth 2, completep, the parametrization that held in
the LR study above). Grid: log2 of the value, 1-octave steps, the start +- 1 octave, extended by an octave
(up to {HPARAM_EXTENSIONS}) while a size's seed-mean minimum sits at an edge; no half-octave refinement.
Starts: LR per ladder (held at that value for the other rows), {HPARAM_STARTS} (log2; warmup {WARMUP_FRAC}
and weight decay 0 when not swept). Options {PARAM_OPTIONS}, no gradient clipping. The verdict is the
transfer check's (`holds` needs every drift's 95% interval within +-0.5 octave). The target, TP5's claim
that these values transfer, is the last column: |drift| <= 0.5 octave.

{setup}

{table}

{pictures}
"""


def init_grad_norm(ladder: Ladder, shape: Shape, seed: int) -> float:
    """Global gradient norm on the first training batch, at init, in the ladder's parametrization."""
    import torch
    from torch import nn

    from scaletune.data.registry import dataset_spec, get_dataset
    from scaletune.models.registry import get_family
    from scaletune.parametrize import ParamOptions, build_model
    from scaletune.runner import family_factory
    from scaletune.train import loss_fn

    cfg = ladder.config(ladder.parametrizations[0], shape, ladder.start_log2, seed)
    spec = dataset_spec(cfg.dataset, cfg.dataset_args)
    torch.manual_seed(seed)
    built = build_model(family_factory(get_family(cfg.family), shape, spec, cfg.args), cfg.base, shape,
                        cfg.parametrization, cfg.hparams, cfg.optimizer, ParamOptions.from_dict(cfg.options))
    x, y = next(get_dataset(cfg.dataset, cfg.dataset_args).train_batches(cfg.budget.batch_size, seed))
    loss_fn(built.model(x), y, spec.task).backward()
    return float(nn.utils.get_total_norm([p.grad for p in built.model.parameters() if p.grad is not None]))


def clipping_report(all_ladders: list[Ladder], sweep: AdaptiveSweep, img_dir: Path, timing: str) -> str:
    lr_ladders = [ld for ld in all_ladders if ld.hparam == "lr"]
    norms = [[ld.family, ld.axis, ld.parametrizations[0],
              ", ".join(f"{ld.label(s)} {sum(init_grad_norm(ld, s, k) for k in ld.seeds) / len(ld.seeds):.2f}"
                        for s in ld.shapes)]
             for ld in lr_ladders if not ld.tag]
    rows, panels = [], []
    for ld in lr_ladders:
        if ld.axis != "width":
            continue
        result = analysed(sweep, ld)
        rule = "relative (factor 2)" if ld.tag else "off"
        rows.append([ld.family, ld.axis, ld.parametrizations[0], rule, *result_cells(result)])
        panels.append((f"{ld.family} clip {rule.split()[0]}", result))
    image = figure(panels, img_dir / "transfer_landscape_clipping.png")
    norm_table = markdown_table(["family", "axis", "parametrization", "global gradient norm at init per size "
                                 "(mean of 3 seeds)"], norms)
    table = markdown_table(["family", "axis", "parametrization", "clipping", "optimum log2 LR per size "
                            "[bootstrap 95%]", "drift (oct) [95%]", "best loss per size", "verdict",
                            "drift <= 0.5"], rows)
    return f"""{timing}; the same run as the per-hyperparameter section.

Protocol, fixed before the run: the width LR ladders of the per-hyperparameter section (mup, 16x width,
3 seeds, same grid rule) once without clipping (those rows) and once with the relative rule
(`parametrization_options.grad_clip: relative`, factor 2: a step is clipped to 2x the running global norm).
Clipping at a fixed global norm (1.0, every run before this commit) is no longer offered; the gradient norms
at init below show why it confounds a transfer check: a fixed threshold clips some sizes and not others.

{norm_table}

{table}

![{image.stem}](img/{image.name})
"""


def run_sweep(sweep: AdaptiveSweep, refine: bool) -> int:
    runs = 0
    with make_pool() as pool:
        runs += sweep.run_pending(pool)
        while sweep.extend_edges():
            runs += sweep.run_pending(pool)
        if refine:
            sweep.refine()
            runs += sweep.run_pending(pool)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("lr", "hparams", "hparams-long", "hparams-readout"), default="lr")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (~1-2 min); writes to a temp dir")
    opts = parser.parse_args()
    hparams, long, readout = (opts.study == s for s in ("hparams", "hparams-long", "hparams-readout"))
    all_ladders = (hparam_ladders(opts.quick) if hparams else long_hparam_ladders(opts.quick) if long
                   else readout_hparam_ladders(opts.quick) if readout else ladders(opts.quick))
    sweep = AdaptiveSweep(all_ladders, HPARAM_EXTENSIONS if hparams else LONG_EXTENSIONS if long or readout
                          else MAX_EXTENSIONS)
    started = time.perf_counter()
    runs = run_sweep(sweep, refine=not (hparams or long or readout))
    wall = time.perf_counter() - started
    cpu = sum(o.cpu_seconds for per_x in sweep.results.values() for outs in per_x.values() for o in outs)
    img_dir = Path(tempfile.mkdtemp(prefix="transfer_landscape_")) if opts.quick else IMG
    raw = {"|".join(key): {str(x): [o.loss for o in outs] for x, outs in per_x.items()}
           for key, per_x in sweep.results.items()}
    (img_dir / f"transfer_landscape_{opts.study}_losses.json").write_text(json.dumps(raw, indent=1))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    timing = (f"Command: `.venv/bin/python bench/transfer_landscape.py --study {opts.study}"
              f"{' --quick' if opts.quick else ''}` ({runs} training runs, {wall / 60:.1f} min wall, "
              f"{cpu / 60:.1f} CPU-min, 2 processes at nice {os.nice(0)} on 2 CPU cores, load "
              f"average (1/5/15 min) {load} at the end: above about 2, wall time is inflated by other work)")
    levels = {HPARAM_READOUT_SECTION: 3}
    if long or readout:
        sections = {HPARAM_READOUT_SECTION if readout else HPARAM_LONG_SECTION:
                    hparam_report(all_ladders, sweep, img_dir, timing, study=opts.study)}
    elif hparams:
        sections = {HPARAM_SECTION: hparam_report(all_ladders, sweep, img_dir, timing),
                    CLIP_SECTION: clipping_report(all_ladders, sweep, img_dir, timing)}
    else:
        sections = {SECTION: report(all_ladders, sweep, img_dir, runs, wall, cpu, opts.quick)}
    for header, body in sections.items():
        if opts.quick:
            print(f"{'#' * levels.get(header, 2)} {header}\n\n{body}")
        else:
            write_section(header, body, level=levels.get(header, 2))
            print(body)
    if opts.quick:
        print(f"(quick run: plots in {img_dir}; docs/benchmarks.md not touched)")


if __name__ == "__main__":
    main()
