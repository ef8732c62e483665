"""scaletune: tune hyperparameters on small proxies, transfer them to the target."""

from scaletune.transfer import apply_transfer, transfer_plan

__all__ = ["apply_transfer", "transfer_plan"]
