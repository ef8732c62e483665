"""The ``scaletune`` command line: one typer app, each command defined in the module for its area."""

from __future__ import annotations

import typer

from service.cli import client_commands, server, tokens
from service.cli.agent import agent
from service.cli.coord import coord_check_command

app = typer.Typer(
    name="scaletune",
    help="Tune hyperparameters on small proxy models and transfer them to the large target.\n\n"
         "Example: scaletune up   (then: scaletune submit examples/mlp-digits.yaml)",
    no_args_is_help=True,
    add_completion=False,
)
app.command("up")(server.up)
app.command("migrate")(server.migrate)
app.command("api")(server.api)
app.command("worker")(server.worker)
app.command("reconciler")(server.reconciler)
app.command("coord-check")(coord_check_command)
app.command("agent")(agent)
app.add_typer(tokens.app, name="token")
for _name in ("submit", "studies", "status", "watch", "trials", "cancel", "transfer", "check", "schedule", "plot"):
    app.command(_name)(getattr(client_commands, _name))


def main() -> None:
    app(prog_name="scaletune")
