"""The scaletune command line: help for every command, the checks it makes before starting anything."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from service.cli import app
from service.cli.server import parse_gpus
from service.db import database_is_current
from service.embedded import physical_gpu, worker_fleet
from service.settings import Settings

COMMANDS = ["up", "migrate", "api", "worker", "reconciler", "coord-check", "token create", "token revoke"]
runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("SCALETUNE_DATABASE_URL", "SCALETUNE_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SCALETUNE_HOME", str(tmp_path))
    return tmp_path


def test_every_command_is_registered() -> None:
    result = runner.invoke(app, ["--help"], prog_name="scaletune")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command.split()[0] in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"], prog_name="scaletune")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert re.search(rf"scaletune {command}\b", result.output.split("Example", 1)[1])


@pytest.mark.parametrize("group", [[], ["token"]])
def test_the_command_groups_help_shows_an_example_too(group: list[str]) -> None:
    result = runner.invoke(app, [*group, "--help"], prog_name="scaletune")
    assert result.exit_code == 0, result.output
    assert re.search(rf"Example: scaletune {' '.join(group)}\s*\w", " ".join(result.output.split()))


def test_the_command_line_starts_without_importing_torch() -> None:
    """submit, status, agent and the other client commands start in a fraction of a second; torch's import (seconds)
    is paid only by the commands that run the core: coord-check, transfer --factory, worker, api."""
    check = "import sys; from service.cli import main; import scaletune; print(sorted({'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("command", ["up", "api"])
def test_no_auth_is_refused_on_a_network_address(command: str) -> None:
    result = runner.invoke(app, [command, "--host", "0.0.0.0", "--no-auth"], prog_name="scaletune")
    assert result.exit_code == 2
    assert "--no-auth is allowed only on a loopback address" in " ".join(result.output.split())


def test_api_refuses_an_unmigrated_database(home: Path) -> None:
    result = runner.invoke(app, ["api"], prog_name="scaletune")
    assert result.exit_code == 1
    # rich wraps at 80 columns, and the database's path (longer under pytest -n) moves where the break falls
    assert "Run `scaletune migrate` first" in " ".join(result.output.split())


def test_migrate_brings_the_database_to_head(home: Path) -> None:
    result = runner.invoke(app, ["migrate"], prog_name="scaletune")
    assert result.exit_code == 0, result.output
    assert database_is_current(Settings().DATABASE_URL)
    assert (home / "scaletune.db").exists()


def test_parse_gpus() -> None:
    assert parse_gpus(None, 3) == [0, 1, 2]
    assert parse_gpus("all", 2) == [0, 1]
    assert parse_gpus("0,2", 4) == [0, 2]
    assert parse_gpus(None, 0) == []
    with pytest.raises(typer.BadParameter, match="not visible"):
        parse_gpus("0,2", 2)
    with pytest.raises(typer.BadParameter, match="comma-separated"):
        parse_gpus("first", 2)


def test_one_pinned_gpu_worker_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fleet = worker_fleet([0, 1], cpu_workers=1, queues=None)
    assert [spec.env["CUDA_VISIBLE_DEVICES"] for spec in fleet] == ["0", "1"]
    for spec in fleet:
        argv = " ".join(spec.argv)
        assert "--queues gpu" in argv and "--pool solo" in argv and "--concurrency 1" in argv
    assert len({spec.argv[spec.argv.index("--hostname") + 1] for spec in fleet}) == 2


def test_without_gpus_cpu_workers_on_queue_cpu() -> None:
    fleet = worker_fleet([], cpu_workers=2, queues=None)
    assert len(fleet) == 2
    for spec in fleet:
        assert spec.argv[spec.argv.index("--queues") + 1] == "cpu"
        assert "CUDA_VISIBLE_DEVICES" not in spec.env


def test_gpu_pinning_respects_the_parents_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [physical_gpu(0), physical_gpu(1)] == ["2", "3"]


def test_coord_check_runs_the_users_own_model_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # where own_models.py, the "user's" code, lives
    out = tmp_path / "coord.json"
    result = runner.invoke(app, ["coord-check", "--factory", "own_models:build", "--parametrization", "mup",
                                 "--widths", "32,128", "--steps", "3", "--seeds", "1", "--dataset", "digits",
                                 "--json", str(out)], prog_name="scaletune")
    assert result.exit_code in (0, 1), result.output  # 1 = not flat, still a finished check
    data = json.loads(out.read_text())
    assert data["family"] == "own_models:build" and data["sizes"] == [32, 128] and data["axis"] == "width"
    assert {"stem", "blocks.0.fc2", "out"} <= set(data["modules"])
    assert data["modules"]["out"]["values"][0] == [0.0, 0.0]  # muP zero-init readout, found in foreign code
    depth = runner.invoke(app, ["coord-check", "--factory", "own_models:build", "--parametrization", "completep",
                                "--widths", "32", "--depths", "2,4", "--steps", "2", "--seeds", "1", "--dataset",
                                "digits", "--branch-outputs", "blocks.*.fc2", "--json", str(out)],
                          prog_name="scaletune")
    assert depth.exit_code in (0, 1), depth.output
    assert list(json.loads(out.read_text())["modules"]) == ["residual_stream"]


def test_coord_check_needs_exactly_one_of_family_and_factory() -> None:
    for extra in ([], ["--family", "mlp", "--factory", "own_models:build"]):
        result = runner.invoke(app, ["coord-check", "--parametrization", "mup", *extra], prog_name="scaletune")
        assert result.exit_code == 2 and "exactly one of --family" in result.output
    refused = runner.invoke(app, ["coord-check", "--factory", "own_models:build", "--parametrization", "completep",
                                  "--widths", "32", "--depths", "2,4", "--dataset", "digits"], prog_name="scaletune")
    assert refused.exit_code == 2 and "branch_outputs" in refused.output
