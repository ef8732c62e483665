"""The ``scaletune coord-check`` command: run a coordinate check and summarise it as a table."""

from __future__ import annotations

import json as jsonlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.cli.factory import AttentionOption, BranchOption, FactoryOption, load_factory, patterns

if TYPE_CHECKING:
    from scaletune.coord_check import CoordCheckResult


def parse_sizes(text: str, what: str) -> list[int]:
    """'64,128,256' -> [64, 128, 256], or a BadParameter naming the option."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers like 64,128,256, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return sizes


def _slope_cell(slope: float | None) -> str:
    from scaletune.coord_check import FLAT_SLOPE
    if slope is None:
        return "[red]undefined[/red]"
    text = f"{slope:+.3f}"
    return text if abs(slope) <= FLAT_SLOPE else f"[red]{text}[/red]"


def summary_table(result: CoordCheckResult) -> Table:
    """One row per module, the slope at each step t; red where it is not flat."""
    table = Table(title=f"{result.family} {result.parametrization}: slope of log2 mean|output| vs log2 {result.axis} "
                        f"over {result.sizes}")
    table.add_column("module")
    for t in range(1, result.steps + 1):
        table.add_column(f"t={t}", justify="right")
    slopes: dict[str, list[float | None]] = {}
    for row in result.table:
        slopes.setdefault(row.module, []).append(row.slope)
    for module, values in slopes.items():
        table.add_row(module, *(_slope_cell(s) for s in values))
    return table


def coord_check_command(
    parametrization: Annotated[str, typer.Option(help="sp, mup, depth_mup or completep.")],
    family: Annotated[str | None, typer.Option(help="Model family: mlp, resnet, vit, gpt or an installed plugin.")] = None,
    factory: FactoryOption = None,
    branch_outputs: BranchOption = None,
    attention: AttentionOption = None,
    widths: Annotated[str, typer.Option(help="Comma-separated widths; with --depths give exactly one.")] = "64,128,256,512",
    depths: Annotated[str | None, typer.Option(help="Comma-separated depths for a depth sweep at one width.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps recorded (t = 1 is the init).")] = 4,
    seeds: Annotated[int, typer.Option(help="Seeds averaged per size.")] = 3,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Learning rate; default deliberately high (adamw 1e-2, sgd 0.1).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Dataset; default pytext for gpt and --factory, digits otherwise.")] = None,
    batch_size: Annotated[int, typer.Option(help="Size of the one fixed batch.")] = 32,
    json: Annotated[Path | None, typer.Option(help="Write the full result as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a log-log PNG (one panel per step) here.")] = None,
) -> None:
    """Check that activations keep their size as width (or depth) grows, in the chosen parametrization.

    Give a built-in --family, or --factory for your own model code (run here, on your machine; it must take
    the dataset's inputs and return logits or an object with .logits).

    Examples:

        scaletune coord-check --family gpt --parametrization completep --widths 64,128,256,512 --json out.json --plot out.png

        scaletune coord-check --factory mymodels.gpt:build --parametrization completep --widths 64 --depths 2,4,8

    Exits 1 when a module's |slope| exceeds 0.1 after the first update, 2 on bad input.
    """
    from scaletune.coord_check import FLAT_SLOPE, coord_check, coord_check_factory  # torch: only when checking

    console = Console()
    if (family is None) == (factory is None):
        raise typer.BadParameter("give exactly one of --family (a built-in or plugin family) and --factory")
    width_list = parse_sizes(widths, "--widths")
    depth_list = parse_sizes(depths, "--depths") if depths is not None else None
    try:
        if factory is not None:
            result = coord_check_factory(load_factory(factory), parametrization, width_list, depth_list, steps, seeds,
                                         name=factory, dataset=dataset or "pytext", lr=lr, optimizer=optimizer,
                                         batch_size=batch_size, branch_outputs=patterns(branch_outputs),
                                         attention=patterns(attention))
        else:
            result = coord_check(family, parametrization, width_list, depth_list, steps, seeds, dataset=dataset,
                                 lr=lr, optimizer=optimizer, batch_size=batch_size)
    except (ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(summary_table(result))
    if json is not None:
        json.write_text(jsonlib.dumps(result.to_json(), allow_nan=False, indent=2))
        console.print(f"wrote {json}")
    if plot is not None:
        console.print(f"wrote {result.plot(plot)}")
    worst = result.max_abs_slope
    if worst > FLAT_SLOPE:
        row = result.worst()
        shown = f"{worst:.3f}" if math.isfinite(worst) else "undefined (a value blew up or hit 0)"
        console.print(f"[red]not flat[/red]: max |slope| {shown} at {row.module}, t={row.t}")
        raise typer.Exit(code=1)
    console.print(f"[green]flat[/green]: max |slope| {worst:.3f} <= {FLAT_SLOPE} for t >= 2")
