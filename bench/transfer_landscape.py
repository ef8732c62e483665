"""Does the optimal learning rate hold as models grow? LR sweeps over width and depth ladders.

For ``mlp`` (teacher data) and ``gpt`` (pytext), sweep log2 LR at every size of a width ladder (16x, sp and
mup, two seeds) and a depth ladder from base depth 2 (8x, mup, depth_mup and completep, three seeds); the
optimum per size is the transfer check's parabola. The LR grid is adaptive to save compute: 1-octave steps around a start
point, extended while the minimum sits at an edge, then refined with the half-octave neighbours of the
minimum. Writes its section of docs/benchmarks.md and the plots into docs/img/.

    .venv/bin/python bench/transfer_landscape.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
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
    """Sizes along one axis for one family; the first shape is the base (proxy) shape."""

    family: str
    args: dict[str, Any]
    dataset: str
    dataset_args: dict[str, Any]
    axis: str
    shapes: tuple[Shape, ...]
    parametrizations: tuple[str, ...]
    budget: Budget
    seeds: tuple[int, ...]
    start_log2_lr: float
    start_halfwidth: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.axis}"

    def label(self, shape: Shape) -> str:
        return f"w{shape.width}" if self.axis == "width" else f"d{shape.depth}"

    def config(self, parametrization: str, shape: Shape, log2_lr: float, seed: int) -> TrialConfig:
        return TrialConfig(
            family=self.family, args=self.args, base=self.shapes[0], shape=shape, parametrization=parametrization,
            optimizer="adamw", dataset=self.dataset, dataset_args=self.dataset_args, budget=self.budget,
            hparams=HParams(lr=2.0 ** log2_lr, warmup_frac=WARMUP_FRAC), seed=seed, device="cpu",
            options=PARAM_OPTIONS,
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
               start_log2_lr=-5.0, start_halfwidth=halfwidth),
        Ladder(family="mlp", args={}, dataset="teacher", dataset_args={"classes": 100, "teacher_width": 256},
               axis="depth", shapes=tuple(Shape(64, d) for d in depths), parametrizations=depth_parametrizations,
               budget=Budget(steps=40 if quick else 600, batch_size=32, eval_every=10_000), seeds=depth_seeds,
               start_log2_lr=-5.0, start_halfwidth=1),
        Ladder(**gpt_data, axis="width", shapes=tuple(Shape(w, 2) for w in widths), parametrizations=("sp", "mup"),
               budget=Budget(steps=30 if quick else 150, batch_size=8, eval_every=10_000), seeds=width_seeds,
               start_log2_lr=-5.0, start_halfwidth=halfwidth),
        Ladder(**gpt_data, axis="depth", shapes=tuple(Shape(32, d) for d in depths),
               parametrizations=depth_parametrizations,
               budget=Budget(steps=30 if quick else 300, batch_size=8, eval_every=10_000), seeds=depth_seeds,
               start_log2_lr=-6.0, start_halfwidth=1),
    ]


Key = tuple[str, str, str]  # (ladder name, parametrization, size label)


class AdaptiveSweep:
    """Per (ladder, parametrization, size): the log2 LRs tried and every seed's outcome at each."""

    def __init__(self, all_ladders: list[Ladder]) -> None:
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
                    self.pending[key] = {ladder.start_log2_lr + k for k in range(-h, h + 1)}
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
            if self.extensions[key] >= MAX_EXTENSIONS or math.isinf(self.mean_loss(key, x)):
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


def figure(ladder: Ladder, results: dict[str, TransferCheckResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (p, result) in zip(axes[0], results.items()):
        drift = "-" if result.max_drift is None else f"{result.max_drift:+.2f}"
        draw(result, ax, title=f"{ladder.name} {p}: drift {drift} oct, {result.verdict}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
        images.append(figure(ladder, results, img_dir / f"transfer_landscape_{ladder.name}.png"))
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
        f"{len(ld.seeds)} seeds, {', '.join(ld.parametrizations)}, LR start 2^{ld.start_log2_lr:g} "
        f"+- {ld.start_halfwidth} oct"
        for ld in all_ladders)
    pictures = "\n".join(f"![{p.stem}](img/{p.name})" for p in images)
    return f"""Command: `.venv/bin/python bench/transfer_landscape.py{' --quick' if quick else ''}`
({runs} training runs, {wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min, 2 processes on a machine shared with other
engineers' jobs, so wall time is pessimistic).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (~1-2 min); writes to a temp dir")
    opts = parser.parse_args()
    all_ladders = ladders(opts.quick)
    sweep = AdaptiveSweep(all_ladders)
    started = time.perf_counter()
    runs = 0
    with make_pool() as pool:
        runs += sweep.run_pending(pool)
        while sweep.extend_edges():
            runs += sweep.run_pending(pool)
        sweep.refine()
        runs += sweep.run_pending(pool)
    wall = time.perf_counter() - started
    cpu = sum(o.cpu_seconds for per_x in sweep.results.values() for outs in per_x.values() for o in outs)
    img_dir = Path(tempfile.mkdtemp(prefix="transfer_landscape_")) if opts.quick else IMG
    body = report(all_ladders, sweep, img_dir, runs, wall, cpu, opts.quick)
    raw = {"|".join(key): {str(x): [o.loss for o in outs] for x, outs in per_x.items()}
           for key, per_x in sweep.results.items()}
    (img_dir / "transfer_landscape_losses.json").write_text(json.dumps(raw, indent=1))
    if opts.quick:
        print(body)
        print(f"(quick run: plots in {img_dir}; docs/benchmarks.md not touched)")
    else:
        write_section(SECTION, body)
        print(body)


if __name__ == "__main__":
    main()
