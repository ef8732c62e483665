"""A stand-in for a user's training script under `scaletune agent`: reports a made-up curve, then tells its value.

The loss depends on the trial's lr only, so tests can tell trials apart; TRAINER_STEP_S slows each step, and
TRAINER_MARK_DIR gets a file per started trial (tests wait on it to act mid-trial). TRAINER_EXIT makes it crash.
TRAINER_AFTER_S: seconds of work after telling (saving a checkpoint, say), then a "saved-N" file in the mark dir.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import scaletune

STEPS = 6


def main() -> None:
    trial = scaletune.current_trial()
    assert trial is not None, "run me under `scaletune agent`"
    mark_dir = os.environ.get("TRAINER_MARK_DIR")
    if mark_dir:
        (Path(mark_dir) / f"trial-{trial.number}").write_text(f"{os.getpid()}")
    if os.environ.get("TRAINER_EXIT"):
        print("simulated crash: CUDA out of memory", file=sys.stderr)
        sys.exit(int(os.environ["TRAINER_EXIT"]))
    with trial:
        final = (math.log10(trial.params["lr"]) + 2.0) ** 2
        for step in range(1, STEPS + 1):
            time.sleep(float(os.environ.get("TRAINER_STEP_S", "0")))
            if trial.report(step, final + 1.0 / step):
                trial.prune()
                return
        trial.tell(final)
    if os.environ.get("TRAINER_AFTER_S"):
        time.sleep(float(os.environ["TRAINER_AFTER_S"]))
        (Path(os.environ["TRAINER_MARK_DIR"]) / f"saved-{trial.number}").write_text("saved")


if __name__ == "__main__":
    main()
