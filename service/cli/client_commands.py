"""Commands that talk to a running server: submit, studies, status, watch, trials, cancel, transfer, check, schedule, plot.

They use ``scaletune.client`` (imported inside each command so ``--help`` stays instant) against
$SCALETUNE_URL with $SCALETUNE_TOKEN. Exit codes scripts can rely on: 0 done, 1 error, 2 bad usage,
3 study failed, 4 study cancelled.
"""

from __future__ import annotations

import json as jsonlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from scaletune.shapes import Shape
from service.cli.factory import AttentionOption, BranchOption, FactoryOption, load_factory, patterns

if TYPE_CHECKING:
    from scaletune.client import Client, Event, StudyDetail

EXIT_ERROR, EXIT_FAILED, EXIT_CANCELLED = 1, 3, 4
EXIT_CODES = "Exit codes: 0 done, 1 error, 2 bad usage, 3 study failed, 4 study cancelled."
DONE_STATES = ("complete", "pruned", "diverged", "failed")
POLL_S = 2.0

console = Console()
error_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a table.")]
StudyId = Annotated[str, typer.Argument(help="The study's id, or a unique prefix of it such as the short id `scaletune "
                                          "studies` shows.")]


def _client() -> Client:
    from scaletune.client import Client

    return Client()


@contextmanager
def server_errors() -> Iterator[None]:
    """Every client error becomes its message on stderr and exit code 1."""
    from scaletune.client import ScaletuneError

    try:
        yield
    except ScaletuneError as error:
        error_console.print(f"error: {error}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR) from None


def _print_json(data: Any) -> None:
    console.print_json(jsonlib.dumps(data, default=str))


def exit_code_of(study_status: str) -> int:
    return {"failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(study_status, 0)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _status_table(study: StudyDetail) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    counts = ", ".join(f"{state} {n}" for state, n in study.trial_counts.items() if n)
    for label, value in [("study", f"{study.name} ({study.id})"), ("kind", study.kind), ("status", study.status),
                         ("trials", f"{counts or 'none yet'} of {study.spec.get('n_trials', '?')}"),
                         ("best value", _fmt(study.best_value)),
                         ("best params", jsonlib.dumps(study.best_params) if study.best_params else "-"),
                         ("error", study.error or "-"), ("optuna study", study.optuna_study_name)]:
        table.add_row(label, Text(value))
    return table


@dataclass
class WatchState:
    """What `watch` shows: trials done of total, best so far, each running trial's current step."""

    total: int
    done: int = 0
    best_value: float | None = None
    status: str = "queued"
    running: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update_from(self, study: StudyDetail) -> None:
        self.done = min(self.total, sum(study.trial_counts.get(s, 0) for s in DONE_STATES))
        self.best_value, self.status = study.best_value, study.status

    def apply(self, event: Event) -> None:
        if event.type == "trial_started" and event.trial_id:
            self.running[event.trial_id] = {"step": 0}
        elif event.type == "trial_reported" and event.trial_id:
            self.running[event.trial_id] = dict(event.payload)
        elif event.type == "trial_finished" and event.trial_id:
            self.running.pop(event.trial_id, None)

    def render(self) -> Group:
        head = Text(f"{self.status}  {self.done}/{self.total} trials  best {_fmt(self.best_value)}")
        lines: list[Any] = [head, ProgressBar(total=max(self.total, 1), completed=self.done, width=50)]
        for trial_id, info in sorted(self.running.items()):
            # A worker's trial reports its eval loss; an external trial's own code reports a value.
            metric = "value" if "value" in info else "eval_loss"
            lines.append(Text(f"  running {trial_id[:8]}  step {info.get('step')}  {metric} {_fmt(info.get(metric))}"))
        return Group(*lines)


def _poll_running(client: Client, study_id: str, state: WatchState) -> None:
    """The polling fallback: running trials and their last reported step from the trials endpoint."""
    page = client.trials(study_id, state="running", limit=1000)
    state.running = {t.id: t.intermediate[-1].model_dump(exclude_none=True) if t.intermediate else {"step": 0}
                     for t in page.items}


def follow(client: Client, study_id: str, json_lines: bool) -> StudyDetail:
    """Live progress until the study finishes: SSE events, or polling when the stream is unavailable."""
    from scaletune.client import EndpointMissing, ServiceUnavailable

    study = client.study(study_id)
    state = WatchState(total=int(study.spec.get("n_trials", 0)))
    state.update_from(study)
    if study.finished:
        return study
    with Live(state.render(), console=console, transient=False, auto_refresh=False,
              redirect_stdout=False) as live:
        if not json_lines:
            _poll_running(client, study_id, state)
        try:
            for event in client.events(study_id):
                if json_lines:
                    print(event.model_dump_json(), flush=True)
                state.apply(event)
                if event.type in ("trial_finished", "study_finished"):
                    state.update_from(client.study(study_id))
                if not json_lines:
                    live.update(state.render(), refresh=True)
        except (EndpointMissing, ServiceUnavailable) as error:
            error_console.print(f"live events unavailable ({error}); polling every {POLL_S:.0f} s", markup=False)
            while not (study := client.study(study_id)).finished:
                state.update_from(study)
                _poll_running(client, study_id, state)
                live.update(state.render(), refresh=True)
                time.sleep(POLL_S)
        study = client.wait(study_id, timeout=60.0, poll_s=0.5)
        state.update_from(study)
        state.running.clear()
        if not json_lines:
            live.update(state.render(), refresh=True)
    return study


def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Study spec, YAML or JSON.")],
    watch: Annotated[bool, typer.Option("--watch", help="Follow the study live until it finishes.")] = False,
    json_: JsonOption = False,
) -> None:
    """Submit a study spec to the server ($SCALETUNE_URL) and print its id.

    With --watch, follow it and exit with its outcome. Exit codes: 0 done, 1 error, 2 bad usage,
    3 study failed, 4 study cancelled.

    Example: scaletune submit examples/mlp-digits.yaml --watch
    """
    with server_errors():
        client = _client()
        try:
            created = client.submit(spec)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="SPEC") from None
        if json_:
            _print_json(created.model_dump(mode="json"))
        else:
            console.print(f"Submitted study {created.id} ({created.status}). "
                          f"Follow it with: scaletune watch {created.id}", markup=False, soft_wrap=True)
        if watch:
            raise typer.Exit(exit_code_of(follow(client, created.id, json_lines=json_).status))


def studies(
    status: Annotated[str | None, typer.Option(help="Only studies in this status (queued, running, completed, "
                                                    "failed, cancelled).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_: JsonOption = False,
) -> None:
    """List studies, newest first.

    Example: scaletune studies --status running
    """
    with server_errors():
        page = _client().studies(status=status, limit=limit, offset=offset)
    if json_:
        _print_json(page.model_dump(mode="json"))
        return
    table = Table(title=f"studies {offset + 1}-{offset + len(page.items)} of {page.total}")
    table.add_column("id", no_wrap=True, min_width=max((len(s.short_id) for s in page.items), default=2))
    for column in ("name", "kind", "status", "trials", "best", "created"):
        table.add_column(column)
    for s in page.items:  # the short id is unique: every command takes it in place of the full id
        table.add_row(s.short_id, s.name, s.kind, s.status, str(s.n_trials), _fmt(s.best_value),
                      s.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


def status(study_id: StudyId, json_: JsonOption = False) -> None:
    """Show a study: status, trial counts, best value and parameters.

    Exit codes: 0 done (or still running), 1 error, 2 bad usage, 3 study failed, 4 study cancelled.

    Example: scaletune status 3f2c9a7e-... --json
    """
    with server_errors():
        study = _client().study(study_id)
    if json_:
        _print_json(study.model_dump(mode="json"))
    else:
        console.print(_status_table(study))
    raise typer.Exit(exit_code_of(study.status))


def watch(study_id: StudyId,
          json_: Annotated[bool, typer.Option("--json", help="Print each event as a JSON line.")] = False) -> None:
    """Follow a study live: trials done/total, best so far, running trials and their step.

    Uses the server's event stream, polling when it is unavailable. Exit codes: 0 done, 1 error,
    2 bad usage, 3 study failed, 4 study cancelled.

    Example: scaletune watch 3f2c9a7e-...
    """
    with server_errors():
        study = follow(_client(), study_id, json_lines=json_)
    if not json_:
        console.print(_status_table(study))
    raise typer.Exit(exit_code_of(study.status))


def trials(
    study_id: StudyId,
    state: Annotated[str | None, typer.Option(help="Only attempts in this state (running, complete, ...).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_: JsonOption = False,
) -> None:
    """List a study's trial attempts in the order they were queued.

    Example: scaletune trials 3f2c9a7e-... --state complete
    """
    with server_errors():
        page = _client().trials(study_id, state=state, limit=limit, offset=offset)
    if json_:
        _print_json(page.model_dump(mode="json"))
        return
    table = Table(title=f"trials {offset + 1}-{offset + len(page.items)} of {page.total}")
    for column in ("number", "attempt", "state", "value", "params", "steps", "seconds", "reason"):
        table.add_column(column)
    for t in page.items:
        table.add_row("-" if t.number is None else str(t.number), str(t.attempt), t.state, _fmt(t.value),
                      Text(jsonlib.dumps(t.params) if t.params else "-"),
                      str(t.intermediate[-1].step) if t.intermediate else "-", _fmt(t.duration_s),
                      Text(t.failure_reason or ""))
    console.print(table)


def cancel(study_id: StudyId) -> None:
    """Cancel a study: nothing new starts; running trials stop at their next eval.

    Example: scaletune cancel 3f2c9a7e-...
    """
    with server_errors():
        created = _client().cancel(study_id)
    console.print(f"Study {created.id} is {created.status}.", markup=False)


def transfer(
    study_id: StudyId,
    width: Annotated[int, typer.Option(min=1, help="Target width.")],
    depth: Annotated[int, typer.Option(min=1, help="Target depth.")],
    patch_size: Annotated[int | None, typer.Option(min=1, help="Target patch size (ViT).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Optimizer at the target (adamw, sgd).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Target batch size.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Target training steps.")] = None,
    batch_rule: Annotated[str | None, typer.Option(help="Heuristic LR rescale for batch size: sqrt or linear.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the plan JSON here.")] = None,
    factory: FactoryOption = None,
    branch_outputs: BranchOption = None,
    attention: AttentionOption = None,
) -> None:
    """Project a tuned study's best values onto a target shape: per-group LR, init, multipliers (JSON plan).

    With --factory the plan is for your own model code and is computed here, on your machine, from the
    study's tuned values; then `scaletune.apply_transfer(model, plan)` initialises your model.

    Examples:

        scaletune transfer 3f2c9a7e-... --width 4096 --depth 48 -o plan.json

        scaletune transfer 3f2c9a7e-... --factory mymodels.gpt:build --width 1024 --depth 24 -o plan.json
    """
    if factory is not None:
        if patch_size is not None or batch_size is not None or steps is not None or batch_rule is not None:
            raise typer.BadParameter("--patch-size, --batch-size, --steps and --batch-rule apply to a built-in "
                                     "family's plan on the server, not to --factory")
        plan = _own_model_plan(study_id, factory, Shape(width, depth), optimizer, patterns(branch_outputs),
                               patterns(attention))
    else:
        target = {"width": width, "depth": depth, **({"patch_size": patch_size} if patch_size else {})}
        with server_errors():
            plan = _client().transfer(study_id, target, optimizer=optimizer, batch_size=batch_size, steps=steps,
                                      batch_rule=batch_rule)
    if output is None:
        _print_json(plan)
        return
    output.write_text(jsonlib.dumps(plan, indent=2))
    console.print(f"Wrote the transfer plan to {output}", markup=False)
    for warning in plan.get("warnings", []):
        error_console.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)


def _example_input(spec: dict[str, Any]) -> Any:
    """A batch of the study's dataset (if it names one), to show how raw nn.Parameter matrices are used."""
    from scaletune.data.registry import get_dataset

    dataset = spec.get("dataset")
    if not dataset:
        return None
    return next(get_dataset(dataset["name"], dataset.get("args") or {}).train_batches(8, seed=0))[0]


def _own_model_plan(study_id: str, factory: str, target: Shape, optimizer: str | None,
                    branch_outputs: tuple[str, ...], attention: tuple[str, ...]) -> dict[str, Any]:
    """The plan for the user's own model from the study's served tuned values, computed locally."""
    from scaletune.hparams import HParams
    from scaletune.parametrize import ParamOptions
    from scaletune.transfer import factory_transfer_plan

    with server_errors():
        study = _client().study(study_id)
    spec = study.spec
    base = (spec.get("model") or {}).get("base")
    tuned_optimizer = spec.get("optimizer", "adamw")
    problem = ("it has no completed trial yet" if not study.best_params else
               "its spec names no model base shape (model.base)" if base is None else
               f"it tuned {tuned_optimizer}, whose values do not transfer to {optimizer}"
               if optimizer not in (None, tuned_optimizer) else None)
    if problem:
        error_console.print(f"error: study {study.id} cannot be transferred: {problem}", style="red", markup=False)
        raise typer.Exit(code=1)
    try:
        plan = factory_transfer_plan(
            load_factory(factory), factory, Shape.from_dict(base), target, spec["parametrization"],
            HParams.builtin_of({**spec.get("hyperparameters", {}), **study.best_params}), tuned_optimizer,
            ParamOptions.from_dict(spec.get("parametrization_options")), branch_outputs=branch_outputs,
            attention=attention, example_input=_example_input(spec),
            provenance={"study_id": study.id, "best_value": study.best_value,
                        "computed": "locally, from the study's tuned values"})
    except ValueError as error:
        error_console.print(f"error: {error}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    return plan.to_dict()


def check(study_id: StudyId, json_: JsonOption = False) -> None:
    """Show a transfer_check study's verdict: the checked value's optimum per size, drift in octaves, verdict.

    Example: scaletune check 3f2c9a7e-...
    """
    with server_errors():
        result = _client().check(study_id)
    if json_:
        _print_json(result)
        return
    hparam = result.get("hparam", "lr")
    direction = f" (optimum moves to {result['direction']} {hparam})" if result.get("direction") else ""
    needed = f"  seeds needed: {result['seeds_needed']}" if result.get("seeds_needed") else ""
    console.print(f"{hparam}: verdict {result.get('verdict')}{direction}  max drift: {_fmt(result.get('max_drift'))} "
                  f"{_fmt_interval(result.get('max_drift_interval'))} octaves (tolerance {result.get('tolerance')})  "
                  f"monotone: {result.get('monotone')}{needed}", markup=False)
    table = Table()
    for column in ("size", "shape", f"optimum log2 {hparam}", "interval", "drift (octaves)", "drift interval",
                   "seeds", "best loss", "at grid edge"):
        table.add_column(column)
    for size in result.get("sizes", []):
        table.add_row(str(size.get("size")), Text(jsonlib.dumps(size.get("shape"))), _fmt(size.get("optimum_log2")),
                      _fmt_interval(size.get("interval")), _fmt(size.get("drift")),
                      _fmt_interval(size.get("drift_interval")), str(size.get("seeds")), _fmt(size.get("best_loss")),
                      str(size.get("at_edge")))
    console.print(table)
    for reason in result.get("reasons", []):
        console.print(f"- {reason}", markup=False, soft_wrap=True)


def _fmt_interval(interval: list[float] | None) -> str:
    return "-" if not interval else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def schedule(
    study_id: StudyId,
    target_loss: Annotated[float | None, typer.Option(help="Plan to reach this eval loss.")] = None,
    budget_flops: Annotated[float | None, typer.Option(help="Plan for this compute budget.")] = None,
    target_width: Annotated[int | None, typer.Option(min=1, help="Project to this width.")] = None,
    target_depth: Annotated[int | None, typer.Option(min=1, help="Project to this depth.")] = None,
    json_: JsonOption = False,
) -> None:
    """Show a shape_schedule study's fitted laws and the adaptive schedule derived from them.

    Example: scaletune schedule 3f2c9a7e-... --target-loss 0.35
    """
    with server_errors():
        result = _client().schedule(study_id, target_loss=target_loss, budget_flops=budget_flops,
                                    target_width=target_width, target_depth=target_depth)
    if json_:
        _print_json(result)
        return
    segments = result.get("segments") or []
    table = Table(title=f"schedule over {' x '.join(result.get('axes') or [str(result.get('axis'))])}")
    if segments:
        columns = [key for key in segments[0] if not isinstance(segments[0][key], list | dict)]
        for column in columns:
            table.add_column(column)
        for segment in segments:
            table.add_row(*(Text(str(segment.get(column))) for column in columns))
    console.print(table)
    for key in ("saving", "tier", "flags"):
        if key in result:
            console.print(f"{key}: {jsonlib.dumps(result[key], default=str)}", markup=False, soft_wrap=True)


def plot(
    study_id: StudyId,
    kind: Annotated[str, typer.Option(help="history, intermediate, importance, landscape, coord_check, "
                                           "scaling or schedule.")] = "history",
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write; .png or .json (the data).")] = Path(
        "plot.png"),
) -> None:
    """Save one of a study's plots as PNG (rendered by the server), or its data as JSON.

    Example: scaletune plot 3f2c9a7e-... --kind history -o history.png
    """
    with server_errors():
        client = _client()
        if output.suffix == ".json":
            output.write_text(jsonlib.dumps(client.plot_data(study_id, kind), indent=2))
        else:
            output.write_bytes(client.plot(study_id, kind))
    console.print(f"Wrote {output}", markup=False)
