"""``--factory pkg.module:function``: the user's own model code, imported by the local CLI on the user's machine.

Only the CLI does this (never the server): the import path comes from the person typing the command.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from scaletune.parametrize import Factory

FactoryOption = Annotated[str | None, typer.Option(
    help="Your model code as pkg.module:function, where function(width, depth) returns an nn.Module "
         "(imported from the current directory first).")]
BranchOption = Annotated[str | None, typer.Option(
    "--branch-outputs", help="Comma-separated fnmatch patterns of the modules whose output is one residual "
                             "branch, e.g. 'blocks.*.attn,blocks.*.mlp' (not needed for presets or branch_mult).")]
AttentionOption = Annotated[str | None, typer.Option(
    "--attention", help="Comma-separated fnmatch patterns of the attention modules whose logit scale to set.")]


def load_factory(spec: str) -> Factory:
    """``pkg.module:function`` -> the function, or a BadParameter saying what is wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise typer.BadParameter(f"--factory must look like pkg.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise typer.BadParameter(f"cannot import {module_name!r} for --factory: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise typer.BadParameter(f"{module_name!r} has no function {attribute!r} for --factory")
    return factory


def patterns(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())
