"""scaletune: tune hyperparameters on small proxies, transfer them to the target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scaletune.client import Client, current_trial
from scaletune.trial import Trial

if TYPE_CHECKING:
    from scaletune.transfer import apply_transfer, transfer_plan

__all__ = ["Client", "Trial", "apply_transfer", "current_trial", "transfer_plan"]


def __getattr__(name: str) -> Any:
    """The transfer functions import torch on first use, so the CLI's client commands (submit, status, agent) start
    in a fraction of a second instead of paying torch's import."""
    if name in ("apply_transfer", "transfer_plan"):
        from scaletune import transfer
        return getattr(transfer, name)
    raise AttributeError(f"module 'scaletune' has no attribute {name!r}")
