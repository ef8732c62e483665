"""Bring your own model: does the optimal LR of a Hugging Face GPT-2 hold across width and depth with the preset?

The model is `transformers`' GPT2LMHeadModel built from a GPT2Config (no weights), 4 heads at every width
(so the head dimension grows 16 -> 128 and the preset's 1/d logit scale matters), trained on pytext by
scaletune's own training loop; scaletune finds the preset by the model's class and parametrizes it through
``build_model``. Width ladder 64 -> 256 at depth 2 (SP and CompleteP, which at fixed depth is muP) and depth
ladder 2 -> 8 at width 64 (CompleteP), all from base shape 64 x 2. (Width 512 was the goal; its sweeps cost
~25 CPU-minutes, more than the shared 2-core machine gave this run.) Per (parametrization, size) an adaptive
log2-LR sweep: 1-octave steps around a common start, extended while the minimum sits at an edge, then the
half-octave neighbours of the minimum; the optimum is the transfer check's parabola. Then a width
coordinate check of the same model (CompleteP, widths 64..512). Trials run in-process (the `scaletune agent`
path had not landed when this was written). Writes its section of docs/benchmarks.md and plots to docs/img/.

    .venv/bin/python bench/own_model_transfer.py
"""

from __future__ import annotations

import functools
import math
import os
import time

from common import IMG, PARAM_OPTIONS, make_pool, markdown_table, single_thread, write_section

from scaletune.coord_check import FLAT_SLOPE, coord_check_factory
from scaletune.data.base import Dataset
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.parametrize import ParamOptions, build_model
from scaletune.shapes import Shape
from scaletune.train import Budget, train
from scaletune.transfer_check import TransferCheckResult, TrialRecord, analyse, draw

SECTION = "Own model: Hugging Face GPT-2 through the preset"
SEQ_LEN, HEADS = 32, 4
DATA_ARGS = {"seq_len": SEQ_LEN, "max_bytes": 2_000_000, "eval_windows": 256}
BUDGET = Budget(steps=60, batch_size=8, eval_every=10_000)
WARMUP_FRAC = 0.05
SEEDS = (0,)
START_LOG2_LR, START_HALFWIDTH, MAX_EXTENSIONS = -6.0, 1, 4
BASE = Shape(64, 2)
LADDERS: dict[str, dict[str, tuple[Shape, ...]]] = {
    "width": {"sp": (BASE, Shape(256, 2)), "completep": (BASE, Shape(256, 2))},
    "depth": {"completep": (BASE, Shape(64, 8))},
}
TARGETS = {("width", "sp"): "drift >= 1.5", ("width", "completep"): "drift <= 0.5",
           ("depth", "completep"): "drift <= 0.5"}
COORD_WIDTHS, COORD_SEEDS, COORD_STEPS = [64, 128, 256, 512], 3, 4


def gpt2(width: int, depth: int):  # noqa: ANN201 - transformers is a dev dependency, imported on use
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = dataset_spec("pytext", DATA_ARGS).num_outputs
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ_LEN, n_embd=width, n_layer=depth,
                                      n_head=HEADS, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False))


@functools.cache
def pytext() -> Dataset:
    return get_dataset("pytext", DATA_ARGS)


def run_trial(task: tuple[str, Shape, float, int]) -> float | None:
    """Final eval loss of one run, None when it diverged."""
    parametrization, shape, log2_lr, seed = task
    hp = HParams(lr=2.0 ** log2_lr, warmup_frac=WARMUP_FRAC)
    built = build_model(gpt2, BASE, shape, parametrization, hp, "adamw", ParamOptions.from_dict(PARAM_OPTIONS))
    result = train(built.model, built.param_groups, pytext(), BUDGET, hp, "adamw",
                   flops_per_sample=0.0, seed=seed)
    return result.final_eval_loss if result.status == "completed" else None


def sweep(key: tuple[str, Shape]) -> list[tuple[float, int, float | None]]:
    """Adaptive log2-LR sweep of one (parametrization, size): [(log2 lr, seed, loss)]."""
    parametrization, shape = key
    done: dict[float, list[float | None]] = {}

    def mean(x: float) -> float:
        losses = done[x]
        return math.inf if any(v is None for v in losses) else sum(losses) / len(losses)  # type: ignore[misc]

    def run(xs: list[float]) -> None:
        for x in xs:
            if x not in done:
                done[x] = [run_trial((parametrization, shape, x, s)) for s in SEEDS]

    run([START_LOG2_LR + k for k in range(-START_HALFWIDTH, START_HALFWIDTH + 1)])
    for _ in range(MAX_EXTENSIONS):
        grid = sorted(done)
        best = min(grid, key=mean)
        if best == grid[0]:
            run([grid[0] - 1.0])
        elif best == grid[-1]:
            run([grid[-1] + 1.0])
        else:
            break
    best = min(done, key=mean)
    run([best - 0.5, best + 0.5])
    return [(x, s, loss) for x, losses in sorted(done.items()) for s, loss in zip(SEEDS, losses)]


def label(axis: str, shape: Shape) -> str:
    return f"w{shape.width}" if axis == "width" else f"d{shape.depth}"


def target_met(target: str, result: TransferCheckResult) -> str:
    drift = result.max_drift
    if drift is None:
        return f"{target}: inconclusive"
    op, bound = target.split()[1], float(target.split()[2])
    met = abs(drift) <= bound if op == "<=" else abs(drift) >= bound
    return f"{target}: {'met' if met else 'NOT met'}"


def main() -> None:
    started, load = time.perf_counter(), os.getloadavg()[0]
    keys = sorted({(pz, shape) for ladder in LADDERS.values() for pz, shapes in ladder.items() for shape in shapes
                   if not (pz == "sp" and shape == BASE)}, key=lambda k: -k[1].width ** 2 * k[1].depth)
    with make_pool() as pool:  # mup/completep at the base shape is SP exactly (PARAM_OPTIONS), so it runs once
        swept = dict(zip(keys, pool.map(sweep, keys, chunksize=1)))
    sweep_wall = time.perf_counter() - started
    swept[("sp", BASE)] = swept[("completep", BASE)]
    runs = sum(len(v) for k, v in swept.items() if k != ("sp", BASE))

    rows, figures = [], []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(axis, pz) for axis, ladder in LADDERS.items() for pz in ladder]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for (axis, pz), ax in zip(panels, axes[0]):
        records = [TrialRecord(label(axis, shape), shape, x, s, loss) for shape in LADDERS[axis][pz]
                   for x, s, loss in swept[(pz, shape)]]
        result = analyse(records)
        draw(result, ax, f"HF GPT-2 {axis}, {pz}: {result.verdict}")
        optima = "<br>".join(f"{s.size}: {s.optimum_log2:+.2f}" if s.optimum_log2 is not None
                             else f"{s.size}: -" for s in result.sizes)
        rows.append([axis, pz, optima, f"{result.max_drift:+.2f}" if result.max_drift is not None else "-",
                     ", ".join(f"{s.best_loss:.3f}" for s in result.sizes if s.best_loss is not None),
                     ", ".join(s.size for s in result.sizes if s.at_edge) or "-",
                     target_met(TARGETS[(axis, pz)], result)])
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    landscape_png = IMG / "own_model_transfer_landscape.png"
    fig.savefig(landscape_png, dpi=100)
    plt.close(fig)
    figures.append(landscape_png)

    coord_started = time.perf_counter()
    single_thread()
    coord = coord_check_factory(gpt2, "completep", COORD_WIDTHS, steps=COORD_STEPS, seeds=COORD_SEEDS,
                                name="GPT2LMHeadModel", base=BASE, dataset_args=DATA_ARGS, batch_size=BUDGET.batch_size)
    coord_png = coord.plot(IMG / "own_model_transfer_coord.png")
    figures.append(coord_png)
    worst = coord.worst()
    coord_wall = time.perf_counter() - coord_started

    body = "\n".join([
        "Command: `.venv/bin/python bench/own_model_transfer.py`. Protocol fixed before the run: `transformers` "
        f"GPT2LMHeadModel from a GPT2Config (no weights; dropout 0; untied readout; {HEADS} heads at every width, so the head "
        f"dimension grows with width), found by class by scaletune's preset (Conv1D read as (in, out); branches at "
        "`transformer.h.*.attn.c_proj` / `transformer.h.*.mlp.c_proj`; logit scale via `attn.scaling`). pytext "
        f"{DATA_ARGS}, AdamW, {BUDGET.steps} steps, batch {BUDGET.batch_size}, cosine, warmup {WARMUP_FRAC:.0%}, "
        f"seeds {list(SEEDS)}, parametrization options {PARAM_OPTIONS}, base shape {BASE.width} x {BASE.depth}. "
        f"Adaptive sweep: start 2^{START_LOG2_LR:g} +- {START_HALFWIDTH} octave in 1-octave steps, extended up to "
        f"{MAX_EXTENSIONS} times while the minimum is at an edge, then +-0.5 octave around the minimum; optimum = "
        "parabola through the minimum and its neighbours (scaletune.transfer_check). Trials run in-process with "
        "scaletune's training loop, not through `scaletune agent` (not on main when this was written). "
        f"2 worker processes, 1 torch thread each, on 2 cores shared with other jobs (load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).",
        "",
        markdown_table(["axis", "parametrization", "optimum log2 LR", "drift (octaves)", "best loss per size",
                        "at grid edge", "target"], rows),
        "",
        f"Coordinate check (CompleteP = muP at fixed depth, widths {COORD_WIDTHS}, {COORD_SEEDS} seeds, "
        f"{COORD_STEPS} steps, AdamW lr {coord.lr:g}, one fixed batch of {BUDGET.batch_size}): max |slope| for "
        f"t >= 2 = {coord.max_abs_slope:.3f} (worst: {worst.module}, t={worst.t}); target |slope| <= {FLAT_SLOPE}: "
        f"{'met' if coord.max_abs_slope <= FLAT_SLOPE else 'NOT met'}.",
        "",
        f"{runs} training runs in {sweep_wall / 60:.1f} min wall; coordinate check {coord_wall / 60:.1f} min.",
        "",
        *(f"![{p.stem}](img/{p.name})" for p in figures),
    ])
    write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
