"""Bring your own model: does the optimal LR of a Hugging Face GPT-2 hold across width and depth with the preset?

The model is `transformers`' GPT2LMHeadModel built from a GPT2Config (no weights), 4 heads at every width
(so the head dimension grows 16 -> 128 and the preset's 1/d logit scale matters), on pytext. Every training run
is a trial of an external study served by a real `scaletune api` (its own process, a fresh PostgreSQL database),
run through the agent path as a user runs their own code: `scaletune agent STUDY_ID -- python
bench/own_model_trial.py ...` asks the trial and starts the trial script in a fresh process, which takes it with
`scaletune.current_trial()`, builds with `Trial.build` (the study's proxy shape, parametrization and the trial's
LR; scaletune finds the preset by the model's class), trains with scaletune's loop, reports its eval losses and
tells; the landscape is read back from the trials the service recorded. Width ladder 64 -> 512 at depth 2 (SP and
CompleteP, which at fixed depth is muP) and depth ladder 2 -> 8 at width 64 (CompleteP), all from base shape
64 x 2. Per (parametrization, size) an adaptive log2-LR sweep, each round one study whose grid sampler hands out
that round's LRs, served by one agent: 1-octave steps around a start, extended while the minimum sits at an
edge, then the half-octave neighbours of the minimum; the optimum is the transfer check's parabola. Two sweeps
run at a time. The agent path's overhead is measured from the agents' output: each trial's wall time from ask
to end against the build-and-train time its script prints. Then a width coordinate check of the same model
(CompleteP, widths 64..512), in-process as `scaletune coord-check --factory` runs it.
Writes its section of docs/benchmarks.md and plots to docs/img/; ``--quick`` checks the pipeline at small size;
``--seeds N`` runs every LR point with N seeds (init and data order; the seed is the studies' own hyperparameter).

    .venv/bin/python bench/own_model_transfer.py [--quick] [--seeds N]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from api_load import fresh_database, start_api  # also puts the checkout on sys.path
from common import IMG, PARAM_OPTIONS, PROCESSES, ROOT, markdown_table, single_thread, write_section
from own_model_trial import DATA_ARGS, HEADS, WARMUP_FRAC, gpt2

from scaletune.client import Client
from scaletune.coord_check import FLAT_SLOPE, coord_check_factory
from scaletune.shapes import Shape
from scaletune.train import Budget
from scaletune.transfer_check import TransferCheckResult, TrialRecord, analyse, draw
from service.db import upgrade_database
from tests.ports import free_port

SECTION = "Own model: Hugging Face GPT-2 through the preset"
TRIAL_SCRIPT = Path(__file__).resolve().with_name("own_model_trial.py")
START_LOG2_LR, START_HALFWIDTH, MAX_EXTENSIONS = -6.0, 1, 4
BASE = Shape(64, 2)
TARGETS = {("width", "sp"): "drift >= 1.5", ("width", "completep"): "drift <= 0.5",
           ("depth", "completep"): "drift <= 0.5"}
COORD_SEEDS, COORD_STEPS = 3, 4
LOAD_EVERY_S = 30.0
# What the agent prints when it hands a trial to the command and when the trial has ended (service/cli/agent.py),
# and the trial script's own line.
ASKED = re.compile(r"^trial (\d+): \{")
ENDED = re.compile(r"^trial (\d+) ended: (\w+)$")
TRAINED = re.compile(r"^trial (\d+): eval loss \S+; start-up ([\d.]+) CPU-s, setup ([\d.]+) s, build and train "
                     r"([\d.]+) s$")


@dataclass(frozen=True)
class Protocol:
    """What one run measures: the ladders, the training budget and the coordinate check's widths."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    budget: Budget

    def ladders(self) -> dict[str, dict[str, tuple[Shape, ...]]]:
        width = tuple(Shape(w, BASE.depth) for w in self.widths)
        return {"width": {"sp": width, "completep": width},
                "depth": {"completep": tuple(Shape(BASE.width, d) for d in self.depths)}}


FULL = Protocol((64, 256, 512), (2, 8), Budget(steps=40, batch_size=8, eval_every=10_000))
QUICK = Protocol((64, 128), (2, 4), Budget(steps=4, batch_size=8, eval_every=10_000))


@dataclass
class AgentTimes:
    """Where the agent path's time went, in seconds: per agent (one per round), its start-up (process start to
    its first trial handed out) and its whole life; per trial, ask to end as the agent saw it, and what the trial
    script measured of it: the CPU time of its start-up (interpreter and imports), setup (`current_trial()` and
    loading the data) and building and training the model (the work an in-process loop would do too)."""

    agent_walls: list[float] = field(default_factory=list)
    agent_startups: list[float] = field(default_factory=list)
    trial_walls: list[float] = field(default_factory=list)
    startup_cpus: list[float] = field(default_factory=list)
    setups: list[float] = field(default_factory=list)
    trainings: list[float] = field(default_factory=list)

    def add(self, other: AgentTimes) -> None:
        for name in vars(self):
            getattr(self, name).extend(getattr(other, name))

    def summary(self) -> str:
        n = len(self.trial_walls)
        if n == 0 or len(self.trainings) != n:
            return "Agent path overhead: not measured (the agents' output did not give every trial's times)."
        wall, train, setup = sum(self.trial_walls) / n, sum(self.trainings) / n, sum(self.setups) / n
        startup_cpu = sum(self.startup_cpus) / n
        overhead = sum(self.agent_walls) - sum(self.trainings)
        return (f"Agent path overhead, measured ({n} trials, {len(self.agent_walls)} agents, one per round): a trial "
                f"took {wall:.2f} s from ask to end on average, of which its script built and trained the model for "
                f"{train:.2f} s: {wall - train:.2f} s overhead per trial, {setup:.2f} s of it the script's "
                f"`current_trial()` and data loading and {wall - train - setup:.2f} s starting the interpreter, "
                f"importing (torch, transformers, scaletune: {startup_cpu:.2f} CPU-s of it), telling and exiting. "
                f"An agent took {sum(self.agent_startups) / len(self.agent_startups):.2f} s from its start to its "
                "first trial. "
                f"All told {overhead / n:.2f} s per trial, {100 * overhead / sum(self.agent_walls):.0f} % of the "
                "agents' wall time.")


def agent_env(url: str) -> dict[str, str]:
    """The agent's (and so its commands') environment: this checkout's code, the API's URL, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALETUNE_")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "SCALETUNE_URL": url, "OMP_NUM_THREADS": "1"}


def run_agent(url: str, study_id: str, budget: Budget) -> AgentTimes:
    """`scaletune agent STUDY_ID -- python own_model_trial.py ...` until the study has nothing left to ask."""
    command = [sys.executable, "-m", "service.cli", "agent", study_id, "--", sys.executable, str(TRIAL_SCRIPT),
               "--steps", str(budget.steps), "--batch-size", str(budget.batch_size),
               "--eval-every", str(budget.eval_every)]
    times, asked = AgentTimes(), {}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=agent_env(url), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        now, line = time.perf_counter(), line.rstrip("\n")
        if match := TRAINED.match(line):
            times.startup_cpus.append(float(match[2]))
            times.setups.append(float(match[3]))
            times.trainings.append(float(match[4]))
            print(f"{study_id[:8]} {line}", flush=True)
        elif match := ASKED.match(line):
            if not times.agent_startups:
                times.agent_startups.append(now - started)
            asked[int(match[1])] = now
        elif match := ENDED.match(line):
            times.trial_walls.append(now - asked.pop(int(match[1])))
            if match[2] != "complete":
                raise RuntimeError(f"study {study_id}: trial {match[1]} ended {match[2]}")
    if code := process.wait():
        raise RuntimeError(f"the agent for study {study_id} exited with code {code}")
    times.agent_walls.append(time.perf_counter() - started)
    return times


def start_of(parametrization: str, shape: Shape) -> float:
    """Where a sweep starts: SP's Adam optimum is expected to fall as 1/width, so its sweeps start that far down
    (saves the extension rounds, not the outcome: a sweep still extends until its minimum is inside)."""
    return START_LOG2_LR - (math.log2(shape.width / BASE.width) if parametrization == "sp" else 0.0)


def run_round(client: Client, parametrization: str, shape: Shape, xs: list[float], seeds: list[int],
              budget: Budget, times: AgentTimes) -> dict[tuple[float, int], float | None]:
    """One study whose grid is these log2 LRs x seeds (the seed is the study's own hyperparameter), served by one
    agent; {(log2 lr, seed): loss recorded, None if diverged}."""
    spec = {"name": f"own-gpt2-{parametrization}-w{shape.width}-d{shape.depth}", "kind": "external",
            "search_space": {"lr": {"type": "categorical", "choices": [2.0 ** x for x in xs]},
                             "seed": {"type": "categorical", "choices": seeds}},
            "objective": {"direction": "minimize"}, "n_trials": len(xs) * len(seeds), "parallelism": 1,
            "sampler": {"name": "grid", "seed": 0}, "pruner": {"name": "none"},
            "parametrization": parametrization, "optimizer": "adamw", "parametrization_options": PARAM_OPTIONS,
            "model": {"base": BASE.to_dict(), "proxy": shape.to_dict()}}
    study_id = client.submit(spec).id
    times.add(run_agent(client.url, study_id, budget))
    trials = client.trials(study_id, limit=len(xs) * len(seeds) + 10).items
    if failed := [t for t in trials if t.state != "complete"]:
        raise RuntimeError(f"study {study_id}: trials not complete: {[(t.number, t.state) for t in failed]}")
    recorded = {(round(math.log2(t.params["lr"]), 6), int(t.params["seed"])): t.value
                for t in trials if t.params is not None}
    asked = sorted((x, seed) for x in xs for seed in seeds)
    if sorted(recorded) != asked or len(trials) != len(asked):  # each grid point handed out exactly once
        raise RuntimeError(f"study {study_id} recorded (log2 LR, seed) {sorted(recorded)}, asked for {asked}")
    return recorded


def sweep(task: tuple[str, str, Shape, list[int], Budget]) -> tuple[list[tuple[float, int, float | None]], AgentTimes]:
    """Adaptive log2-LR sweep of one (parametrization, size) through the service: [(log2 lr, seed, loss)] and the
    agents' times."""
    url, parametrization, shape, seeds, budget = task
    done: dict[float, list[float | None]] = {}
    times = AgentTimes()

    def loss(x: float) -> float:
        losses = done[x]
        return math.inf if any(v is None for v in losses) else sum(losses) / len(losses)  # type: ignore[misc]

    with Client(url, retries=8) as client:
        def run(xs: list[float]) -> None:
            if new := [x for x in xs if x not in done]:
                recorded = run_round(client, parametrization, shape, new, seeds, budget, times)
                done.update({x: [recorded[(x, seed)] for seed in seeds] for x in new})

        start = start_of(parametrization, shape)
        run([start + k for k in range(-START_HALFWIDTH, START_HALFWIDTH + 1)])
        for _ in range(MAX_EXTENSIONS):
            grid = sorted(done)
            best = min(grid, key=loss)
            if best == grid[0]:
                run([grid[0] - 1.0])
            elif best == grid[-1]:
                run([grid[-1] + 1.0])
            else:
                break
        best = min(done, key=loss)
        run([best - 0.5, best + 0.5])
    return [(x, seed, value) for x, losses in sorted(done.items()) for seed, value in zip(seeds, losses)], times


def label(axis: str, shape: Shape) -> str:
    return f"w{shape.width}" if axis == "width" else f"d{shape.depth}"


def target_met(target: str, result: TransferCheckResult) -> str:
    drift = result.max_drift
    if drift is None:
        return f"{target}: inconclusive"
    op, bound = target.split()[1], float(target.split()[2])
    met = abs(drift) <= bound if op == "<=" else abs(drift) >= bound
    return f"{target}: {'met' if met else 'NOT met'}"


def landscape(swept: dict[tuple[str, Shape], list[tuple[float, int, float | None]]],
              ladders: dict[str, dict[str, tuple[Shape, ...]]]) -> tuple[list[list[str]], object]:
    """The table rows (one per ladder and parametrization) and the figure with one landscape panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    panels = [(axis, pz) for axis, ladder in ladders.items() for pz in ladder]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for (axis, pz), ax in zip(panels, axes[0]):
        records = [TrialRecord(label(axis, shape), shape, x, seed, loss) for shape in ladders[axis][pz]
                   for x, seed, loss in swept[(pz, shape)]]
        result = analyse(records)
        draw(result, ax, f"HF GPT-2 {axis}, {pz}: {result.verdict}")
        optima = "<br>".join(f"{s.size}: {s.optimum_log2:+.2f}" if s.optimum_log2 is not None
                             else f"{s.size}: -" for s in result.sizes)
        rows.append([axis, pz, optima, f"{result.max_drift:+.2f}" if result.max_drift is not None else "-",
                     ", ".join(f"{s.best_loss:.3f}" for s in result.sizes if s.best_loss is not None),
                     ", ".join(s.size for s in result.sizes if s.at_edge) or "-",
                     target_met(TARGETS[(axis, pz)], result)])
    fig.tight_layout()
    return rows, fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="widths 64,128, depths 2,4, 4 steps; print, no docs")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per LR point (init and data order)")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    protocol = QUICK if args.quick else FULL
    ladders, budget = protocol.ladders(), protocol.budget
    started, loads = time.perf_counter(), [os.getloadavg()[0]]
    keys = sorted({(pz, shape) for ladder in ladders.values() for pz, shapes in ladder.items() for shape in shapes
                   if not (pz == "sp" and shape == BASE)}, key=lambda k: -k[1].width ** 2 * k[1].depth)
    with fresh_database() as (db_url, name):
        upgrade_database(db_url)
        port = free_port()
        api = start_api(db_url, port, home=f"/tmp/{name}")
        try:
            url = f"http://127.0.0.1:{port}"
            with ThreadPoolExecutor(PROCESSES) as pool:  # mup/completep at the base shape is SP exactly: run once
                futures = [pool.submit(sweep, (url, pz, shape, seeds, budget)) for pz, shape in keys]
                while wait(futures, timeout=LOAD_EVERY_S).not_done:
                    loads.append(os.getloadavg()[0])
                results = [f.result() for f in futures]
        finally:
            api.terminate()
            api.wait(timeout=30)
    sweep_wall = time.perf_counter() - started
    loads.append(os.getloadavg()[0])
    swept = {key: points for key, (points, _) in zip(keys, results)}
    times = AgentTimes()
    for _, each in results:
        times.add(each)
    swept[("sp", BASE)] = swept[("completep", BASE)]
    runs = sum(len(v) for k, v in swept.items() if k != ("sp", BASE))

    rows, fig = landscape(swept, ladders)
    figures = []
    if not args.quick:
        IMG.mkdir(parents=True, exist_ok=True)
        figures.append(IMG / "own_model_transfer_landscape.png")
        fig.savefig(figures[-1], dpi=100)

    coord_started = time.perf_counter()
    single_thread()
    coord = coord_check_factory(gpt2, "completep", list(protocol.widths), steps=COORD_STEPS, seeds=COORD_SEEDS,
                                name="GPT2LMHeadModel", base=BASE, dataset_args=DATA_ARGS,
                                batch_size=budget.batch_size)
    if not args.quick:
        figures.append(coord.plot(IMG / "own_model_transfer_coord.png"))
    worst = coord.worst()
    coord_wall = time.perf_counter() - coord_started

    body = "\n".join([
        f"Command: `nice -n {os.nice(0)} .venv/bin/python bench/own_model_transfer.py --seeds {args.seeds}`. "
        f"Protocol: `transformers` GPT2LMHeadModel from a GPT2Config (no weights; dropout 0; untied readout; {HEADS} "
        "heads at every width, so the head dimension grows with width), found by class by scaletune's preset "
        "(Conv1D read as (in, out); branches at `transformer.h.*.attn.c_proj` / `transformer.h.*.mlp.c_proj`; logit "
        f"scale via `attn.scaling`). pytext {DATA_ARGS}, AdamW, {budget.steps} steps, batch {budget.batch_size}, "
        f"cosine, warmup {WARMUP_FRAC:.0%}, seeds {seeds} (init and data order), parametrization options "
        f"{PARAM_OPTIONS}, base shape {BASE.width} x {BASE.depth}. **Through the agent path**: every run is a trial "
        "of an external study on a real `scaletune api` (own process, fresh PostgreSQL database), run by `scaletune "
        "agent STUDY_ID -- python bench/own_model_trial.py` (one agent per study, each trial a fresh process): the "
        "trial script takes its trial with `scaletune.current_trial()`, builds with `Trial.build` (the study's proxy "
        "shape and parametrization, the trial's LR), trains with scaletune's loop, reports its eval loss and tells; "
        "the landscape is read back from the trials the service recorded. Adaptive sweep, one study per round (grid "
        f"sampler over that round's LRs): start 2^{START_LOG2_LR:g} (SP: 2^{START_LOG2_LR:g} / (width/{BASE.width}), "
        f"its expected 1/width rule) +- {START_HALFWIDTH} octave in 1-octave steps, extended up to "
        f"{MAX_EXTENSIONS} times while the minimum is at an edge, then +-0.5 octave around the minimum; optimum = "
        "parabola through the minimum and its neighbours (scaletune.transfer_check). "
        f"{PROCESSES} sweeps at a time (so {PROCESSES} agents, each running one trial process with 1 torch thread), "
        f"on 2 cores (load average {loads[0]:.1f} at the start, {loads[-1]:.1f} at the end, "
        f"{min(loads):.1f}-{max(loads):.1f} sampled every {LOAD_EVERY_S:g} s).",
        "",
        markdown_table(["axis", "parametrization", "optimum log2 LR", "drift (octaves)", "best loss per size",
                        "at grid edge", "target"], rows),
        "",
        f"Coordinate check (CompleteP = muP at fixed depth, widths {list(protocol.widths)}, {COORD_SEEDS} seeds, "
        f"{COORD_STEPS} steps, AdamW lr {coord.lr:g}, one fixed batch of {budget.batch_size}): max |slope| for "
        f"t >= 2 = {coord.max_abs_slope:.3f} (worst: {worst.module}, t={worst.t}); target |slope| <= {FLAT_SLOPE}: "
        f"{'met' if coord.max_abs_slope <= FLAT_SLOPE else 'NOT met'}.",
        "",
        f"{runs} training runs in {sweep_wall / 60:.1f} min wall; coordinate check {coord_wall / 60:.1f} min.",
        "",
        times.summary(),
        "",
        *(f"![{p.stem}](img/{p.name})" for p in figures),
    ])
    if not args.quick:
        write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
