"""scaletune: tune hyperparameters on small proxies, transfer them to the target."""

from scaletune.client import Client, current_trial
from scaletune.transfer import apply_transfer, transfer_plan
from scaletune.trial import Trial

__all__ = ["Client", "Trial", "apply_transfer", "current_trial", "transfer_plan"]
