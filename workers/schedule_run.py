"""A worker's side of a schedule run: execute the planned phases with surgery, resuming from the run's checkpoint."""

from __future__ import annotations

import threading
from dataclasses import asdict

from scaletune.adaptive import run_schedule
from scaletune.data.registry import dataset_spec
from scaletune.train import EvalPoint, TrainResult
from service.db import SessionFactory
from service.kinds.schedule_run import checkpoint_dir, phase_at, phases_of, run_config, step_ends
from service.kinds.registry import spec_of
from service.models import Study, TrialAttempt, TrialState
from service.settings import Settings
from service.studies import study_is_cancelled
from service.trials import record_point


def run_planned_schedule(settings: Settings, session_factory: SessionFactory, attempt: TrialAttempt,
                         study: Study, lost: threading.Event) -> tuple[TrainResult, TrialState | None]:
    """Train the attempt's planned schedule; its result and why it stopped early (None when it did not).

    Every attempt of one run uses the same checkpoint directory, so a retry continues in the shape the
    killed attempt had reached. Each eval point is recorded with its phase and shape.
    """
    assert attempt.params is not None
    spec = spec_of(study)
    config, phases = run_config(spec, attempt.params), phases_of(attempt.params)
    data = dataset_spec(config.dataset, config.dataset_args, settings.DATA_ROOT)
    phase = phase_at(step_ends(config, phases, data))
    stop_reason: TrialState | None = None

    def record(point: EvalPoint) -> bool:
        nonlocal stop_reason
        index = phase(point.step)
        record_point(session_factory, attempt.id, {**asdict(point), "phase": index,
                                                   "shape": phases[index].shape.to_dict()})
        if study_is_cancelled(session_factory, study.id) or lost.is_set():
            stop_reason = TrialState.cancelled
        return stop_reason is not None

    assert settings.ARTIFACTS_DIR is not None
    result = run_schedule(config, phases, checkpoint_dir(settings.ARTIFACTS_DIR, study.id, attempt.params), record,
                          data_root=settings.DATA_ROOT)
    return result.train, stop_reason
