"""The processes ``scaletune up`` gave up restarting (crash loops), handed from the supervisor to the API's /readyz."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_given_up(path: Path, given_up: dict[str, str]) -> None:
    """Replace the file atomically, so /readyz never reads half of it."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"given_up": given_up}))
    os.replace(partial, path)


def read_given_up(path: Path) -> dict[str, str]:
    """Name -> why, for each child in a crash loop; empty when the file is missing (supervisor not started yet)."""
    try:
        return dict(json.loads(path.read_text())["given_up"])
    except FileNotFoundError:
        return {}
