"""Depthwise transfer on the depth paper's own architecture: does the optimal LR of a ResNet hold across depth?

Bordelon et al. (arXiv 2309.16620) scale each residual branch by 1/sqrt(depth) on top of muP and report LR
transfer across depth for ResNets trained with SGD and Adam. This sweeps log2 LR at depths 2, 4, 16 (blocks per
stage, 8x) for the `resnet` family on digits under depth_mup (alpha = 1/2, the paper's rule) and completep
(alpha = 1), with SGD (momentum 0.9) and AdamW, three seeds; the optimum per depth is the transfer check's parabola
and its verdict. It answers the open question of the transfer landscape: depth-muP drifted upward on the mlp and
gpt (two-layer blocks); does alpha = 1/2 hold on the paper's architecture and optimizer?

Protocol reduced before the first full run, to fit about an hour on 2 CPU cores shared with four other jobs: depth 8
is left out (2, 4, 16 still span 8x, as in the per-hyperparameter study), and budgets are 40 steps (80 at first; that
start was stopped unfinished, no result seen, when the machine's load rose to ~12; --steps 80 runs it). The SGD grid
starts at 2^-2 rather than 2^-3 because the --quick smoke run (20 steps, depths 2 and 4) put the SGD optimum near
2^-1, at the far end of what three extensions from 2^-3 could reach; the extension rule would find it either way.

Third run (protocol fixed 2026-12-03 before it started): the 40- and 80-step runs disagree (SGD depth_mup -0.32 at
40 steps, -0.95 [-1.19, +0.05] at 80; completep -0.77 and -1.65), and with only d2, d4, d16 the d4 -> d16 step hides
where the optimum moves. So depth 8 goes back in: `--steps 80 --depths 2 4 8 16` (SGD and AdamW, 3 seeds, grid and
everything else as above), which shows the depth trend between 4 and 16. Then, CPU permitting, SGD alone at twice
the budget, `--steps 160 --depths 2 4 8 16 --optimizers sgd`: if the drift keeps growing with the budget
(-0.32 at 40, -0.95 at 80, ...), the optimum's move with depth is a horizon effect of these short runs, not a
property of the parametrization at a fixed horizon.

    .venv/bin/python bench/depth_transfer.py [--quick] [--steps N] [--depths D ...] [--optimizers sgd|adamw ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import IMG, PARAM_OPTIONS, markdown_table, write_section
from transfer_landscape import AdaptiveSweep, Ladder, figure, fmt_interval, fmt_optimum, run_sweep

from scaletune.shapes import Shape
from scaletune.train import Budget
from scaletune.transfer_check import analyse

SECTION = "Depthwise transfer on ResNets (Bordelon et al.): SGD and Adam, alpha = 1/2 vs CompleteP"
MAX_EXTENSIONS = 3
STARTS = {"sgd": -2.0, "adamw": -5.0}  # log2 LR; 1-octave grid +- 1 around it, extended at edges
PARAMETRIZATIONS = ("depth_mup", "completep")


DEPTHS = (2, 4, 16)  # the first two runs' depths (8 left out to fit the machine); --depths changes them
OPTIMIZERS = ("sgd", "adamw")


def ladders(quick: bool, steps: int, depths: tuple[int, ...] = DEPTHS,
            optimizers: tuple[str, ...] = OPTIMIZERS) -> list[Ladder]:
    depths = (2, 4) if quick else depths
    return [Ladder(family="resnet", args={"strides": [1, 2, 2]}, dataset="digits", dataset_args={}, axis="depth",
                   shapes=tuple(Shape(8, d) for d in depths), parametrizations=PARAMETRIZATIONS,
                   budget=Budget(steps=20 if quick else steps, batch_size=32, eval_every=10_000),
                   seeds=(0, 1, 2), start_log2=STARTS[optimizer], start_halfwidth=1, optimizer=optimizer)
            for optimizer in optimizers]


def run_tag(steps: int, depths: tuple[int, ...], optimizers: tuple[str, ...]) -> str:
    """Names this run's plot and per-seed losses, so a run with other flags does not overwrite them."""
    only = "" if optimizers == OPTIMIZERS else "_" + "-".join(optimizers)
    return f"{steps}steps_d{'-'.join(map(str, depths))}{only}"


def command(quick: bool, steps: int, depths: tuple[int, ...], optimizers: tuple[str, ...]) -> str:
    flags = [" --quick" if quick else "", "" if steps == 40 else f" --steps {steps}",
             "" if depths == DEPTHS else " --depths " + " ".join(map(str, depths)),
             "" if optimizers == OPTIMIZERS else " --optimizers " + " ".join(optimizers)]
    return ".venv/bin/python bench/depth_transfer.py" + "".join(flags)


def report(all_ladders: list[Ladder], sweep: AdaptiveSweep, img_dir: Path, timing: str, tag: str) -> str:
    rows, panels = [], []
    for ladder in all_ladders:
        for p in ladder.parametrizations:
            result = analyse(sweep.records(ladder, p))
            losses = ", ".join(f"{s.best_loss:.3f}" if s.best_loss is not None else "-" for s in result.sizes)
            drift = "-" if result.max_drift is None else f"{result.max_drift:+.2f}{fmt_interval(result.max_drift_interval)}"
            met = "-" if result.max_drift is None else "met" if abs(result.max_drift) <= 0.5 else "NOT met"
            if any(s.at_edge for s in result.sizes):
                met += " (an optimum at the edge: a bound)"
            rows.append([ladder.optimizer, p, "<br>".join(fmt_optimum(s) for s in result.sizes), drift, losses,
                         result.verdict, met])
            panels.append((f"{ladder.optimizer} {p}", result))
    image = figure(panels, img_dir / f"depth_transfer_resnet_{tag}.png")
    table = markdown_table(["optimizer", "parametrization", "optimum log2 LR per depth [bootstrap 95%]",
                            "drift (oct) [95%]", "best loss per depth", "verdict", "drift <= 0.5"], rows)
    ladder = all_ladders[0]
    depths = [s.depth for s in ladder.shapes]
    optimizers = " and ".join("SGD" if ld.optimizer == "sgd" else "AdamW" for ld in all_ladders)
    reduced = ("depth 8 left out, and the SGD grid starts" if 8 not in depths else "the SGD grid starts")
    return f"""{timing}.

Protocol, fixed before the run: `resnet` (pre-activation, three stages of widths 8/16/32, strides 1/2/2, BatchNorm)
on digits (8x8, 10 classes), depths {', '.join(map(str, depths))} blocks per stage (base {depths[0]}, \
{depths[-1] // depths[0]}x), width fixed at 8 (m = 1), {optimizers}, {ladder.budget.steps} steps, batch \
{ladder.budget.batch_size}, cosine, warmup 5%, 3 seeds. depth_mup multiplies each residual branch by (L/2)^-1/2
(Bordelon et al.'s 1/sqrt(L); residual constant beta_0 = 1) and completep by (L/2)^-1; SGD LR has depth factor
r^(2 alpha - 1) (1 for alpha = 1/2, the paper's constant SGD LR), Adam r^(alpha - 1).
SGD momentum 0.9. Options {PARAM_OPTIONS}; block readouts not zeroed; no gradient clipping.
Grid: log2 LR, 1-octave steps, start 2^{STARTS['sgd']:g} (SGD) / 2^{STARTS['adamw']:g} (Adam)
+- 1 octave, extended by an octave (up to {MAX_EXTENSIONS}) while the seed-mean minimum sits at an edge.
Target: |drift| <= 0.5 octave over {depths[-1] // depths[0]}x depth; the verdict is the transfer check's. Reduced \
before the first full run to fit the shared machine: {reduced} an octave higher than first written because
the --quick smoke run put its optimum near 2^-1 (the bench's docstring).

{table}

![{image.stem}](img/{image.name})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (the protocol's 40, or more)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="blocks per stage; the first "
                        "is the base")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    opts = parser.parse_args()
    depths, optimizers = tuple(opts.depths), tuple(opts.optimizers)
    all_ladders = ladders(opts.quick, opts.steps, depths, optimizers)
    tag = "quick" if opts.quick else run_tag(opts.steps, depths, optimizers)
    sweep = AdaptiveSweep(all_ladders, MAX_EXTENSIONS)
    started = time.perf_counter()
    runs = run_sweep(sweep, refine=False)
    wall = time.perf_counter() - started
    cpu = sum(o.cpu_seconds for per_x in sweep.results.values() for outs in per_x.values() for o in outs)
    img_dir = Path(tempfile.mkdtemp(prefix="depth_transfer_")) if opts.quick else IMG
    raw = {"|".join(key): {str(x): [o.loss for o in outs] for x, outs in per_x.items()}
           for key, per_x in sweep.results.items()}
    (img_dir / f"depth_transfer_losses_{tag}.json").write_text(json.dumps(raw, indent=1))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    timing = (f"Command: `{command(opts.quick, opts.steps, depths, optimizers)}` ({runs} training runs, "
              f"{wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min, 2 processes at nice {os.nice(0)} on 2 CPU cores, "
              f"load average (1/5/15 min) {load} at the end: above about 2, wall time is inflated by other work)")
    body = report(all_ladders, sweep, img_dir, timing, tag)
    if opts.quick:
        print(body)
        print(f"(quick run: plots in {img_dir}; docs/benchmarks.md not touched)")
    else:
        write_section(SECTION, body)
        print(body)


if __name__ == "__main__":
    main()
