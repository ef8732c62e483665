"""README's test command, `make test`, brings what the suite needs by itself; `.ci/run` is only a wrapper of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREREQUISITES = ROOT / "scripts" / "test-prerequisites.sh"
# What the script may call on a machine where PostgreSQL and Redis already run.
TOOLS = ("bash", "env", "id", "ls", "seq", "sleep", "pg_isready", "redis-cli")


def test_readme_and_ci_both_run_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"whole test suite.*?\n\n    make test\n", readme, re.S), "README's test command is make test"
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"], ".ci/run adds nothing the README's command lacks"


def test_make_test_prepares_the_machine_before_running_the_suite() -> None:
    planned = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = planned.splitlines()
    prepare = next(i for i, line in enumerate(lines) if "scripts/test-prerequisites.sh" in line)
    suite = next(i for i, line in enumerate(lines) if "/pytest -q" in line)
    assert prepare < suite


def run_prerequisites(tmp_path: Path, present: tuple[str, ...]) -> list[str]:
    """Run the script with only ``TOOLS`` + ``present`` on PATH and an apt-get that records what it is asked
    (nothing is installed for real: the machine already has Chromium)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-get.calls"
    bin_dir.mkdir()
    for tool in (*TOOLS, *present):
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run this test"
        (bin_dir / tool).symlink_to(found)
    for name, body in (("apt-get", f'echo "$*" >> {calls}'), ("sudo", 'exec "$@"')):  # sudo: when not root
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    subprocess.run([str(bin_dir / "bash"), str(PREREQUISITES)], env={**os.environ, "PATH": str(bin_dir)},
                   check=True, timeout=120)
    return calls.read_text().splitlines() if calls.exists() else []


def test_missing_chromium_is_installed_with_apt_get(tmp_path: Path) -> None:
    assert run_prerequisites(tmp_path, present=()) == ["update -qq", "install -y -qq chromium chromium-driver"]


def test_nothing_is_installed_or_started_when_everything_is_there(tmp_path: Path) -> None:
    assert run_prerequisites(tmp_path, present=("chromium", "chromedriver")) == []
