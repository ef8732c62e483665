"""One trial attempt end to end: claim, heartbeat, ask Optuna, train, report/prune, tell, record, top up."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from scaletune.runner import TrialConfig, run_trial
from scaletune.train import Checkpointing, EvalPoint, TrainResult
from service.db import SessionFactory, create_db_engine, make_session_factory
from service.dispatch import dispatch, send_all
from service.kinds.registry import kind_of, spec_of
from service.logging import log_context
from service.models import Study, TrialAttempt, TrialState
from service.optuna_study import get_storage, tell_outcome
from service.queue import Enqueue
from service.settings import Settings
from service.studies import study_is_cancelled
from service.trials import Outcome, claim_attempt, finish_attempt, heartbeat, record_asked, record_point, \
    trial_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """What a task needs from its process: settings, database sessions and a way to send follow-up tasks."""

    settings: Settings
    session_factory: SessionFactory
    enqueue: Enqueue

    @classmethod
    def from_settings(cls, settings: Settings, enqueue: Enqueue) -> WorkerContext:
        return cls(settings, make_session_factory(create_db_engine(settings.DATABASE_URL)), enqueue)


class Heartbeat:
    """Refreshes the attempt's lease in a thread; notices when the reconciler has taken the attempt away."""

    def __init__(self, session_factory: SessionFactory, attempt_id: str, interval_s: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(session_factory, attempt_id, interval_s),
                                        name=f"heartbeat-{attempt_id}", daemon=True)

    def _run(self, session_factory: SessionFactory, attempt_id: str, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if not heartbeat(session_factory, attempt_id):
                    self.lost.set()
                    return
            except Exception:
                log.exception("heartbeat for attempt %s failed; will try again", attempt_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Progress:
    """The training callback: record each eval, report it to Optuna (if asked of it), and say when to stop (and why)."""

    def __init__(self, ctx: WorkerContext, attempt_id: str, study_id: str, beat: Heartbeat,
                 trial: optuna.Trial | None = None) -> None:
        self.ctx, self.attempt_id, self.study_id, self.beat, self.trial = ctx, attempt_id, study_id, beat, trial
        self.stop_reason: TrialState | None = None

    def record(self, point: dict[str, Any]) -> bool:
        """Record an eval point (an ``EvalPoint`` as a dict, plus what the kind adds); True: stop now."""
        record_point(self.ctx.session_factory, self.attempt_id, point)
        if self.trial is not None and math.isfinite(point["eval_loss"]):
            self.trial.report(point["eval_loss"], point["step"])
        if study_is_cancelled(self.ctx.session_factory, self.study_id) or self.beat.lost.is_set():
            self.stop_reason = TrialState.cancelled
        elif self.trial is not None and self.trial.should_prune():
            self.stop_reason = TrialState.pruned
        return self.stop_reason is not None

    def __call__(self, point: EvalPoint) -> bool:
        return self.record(asdict(point))


def outcome_of(result: TrainResult, stop_reason: TrialState | None) -> Outcome:
    common = {"flops": result.flops, "seconds": result.seconds}
    if result.status == "diverged" or (result.status == "completed" and result.final_eval_loss is None):
        return Outcome(TrialState.diverged, **common)
    if result.status == "stopped":
        return Outcome(stop_reason or TrialState.cancelled, **common)
    return Outcome(TrialState.complete, value=result.final_eval_loss, **common)


def _failure(error: Exception) -> Outcome:
    """ValueError means the config cannot work (never retried); anything else may be transient."""
    kind = "invalid" if isinstance(error, ValueError) else "error"
    return Outcome(TrialState.failed, failure_reason=f"{kind}: {type(error).__name__}: {error}")


def checkpointing(ctx: WorkerContext, attempt: TrialAttempt, config: TrialConfig) -> Checkpointing | None:
    """Long trials (more than CHECKPOINT_EVERY_EVALS evals) save every CHECKPOINT_EVERY_EVALS evals, in a file
    every attempt of the trial shares, so a retry after a lost worker resumes where the last save left it."""
    every = ctx.settings.CHECKPOINT_EVERY_EVALS
    if every == 0 or config.budget.steps // config.budget.eval_every <= every:
        return None
    assert ctx.settings.ARTIFACTS_DIR is not None
    return Checkpointing(trial_checkpoint(ctx.settings.ARTIFACTS_DIR, ctx.session_factory, attempt), every)


def run_attempt(ctx: WorkerContext, attempt_id: str, task_id: str | None = None) -> TrialState | None:
    """Run one attempt; returns its final state, or None if it was not ours to run (duplicate or cancelled)."""
    with log_context(trial_id=attempt_id):
        return _run_attempt(ctx, attempt_id, task_id)


def _run_attempt(ctx: WorkerContext, attempt_id: str, task_id: str | None) -> TrialState | None:
    worker = f"{socket.gethostname()}:{os.getpid()}"
    attempt = claim_attempt(ctx.session_factory, attempt_id, worker, task_id)
    if attempt is None:
        log.info("attempt %s is not queued any more (duplicate delivery or cancelled); skipping", attempt_id)
        return None
    with ctx.session_factory() as session:
        study_row = session.get_one(Study, attempt.study_id)
    with log_context(study_id=attempt.study_id):
        return _train_and_record(ctx, attempt_id, attempt, study_row)


def _train_and_record(ctx: WorkerContext, attempt_id: str, attempt: TrialAttempt,
                      study_row: Study) -> TrialState | None:
    log.info("attempt %s started (attempt number %d)", attempt_id, attempt.attempt)
    kind = kind_of(study_row)
    spec = spec_of(study_row)
    storage = get_storage(ctx.settings.DATABASE_URL)
    fixed = attempt.params if attempt.retry_of else None
    study: optuna.Study | None = None
    trial: optuna.Trial | None = None
    saves: Checkpointing | None = None
    with Heartbeat(ctx.session_factory, attempt_id, ctx.settings.HEARTBEAT_INTERVAL) as beat:
        try:
            progress = _Progress(ctx, attempt_id, attempt.study_id, beat)
            result = kind.run_planned(spec, attempt, ctx.settings, progress.record)
            if result is None:  # a trial: Optuna says what to train
                study = kind.load_optuna_study(storage, study_row.optuna_study_name, spec, retried_params=fixed)
                trial = study.ask(kind.distributions(spec))
                record_asked(ctx.session_factory, attempt_id, trial.number, trial.params)
                progress = _Progress(ctx, attempt_id, attempt.study_id, beat, trial)
                config = kind.trial_config(spec, trial.params)
                saves = checkpointing(ctx, attempt, config)
                result = run_trial(config, progress, data_root=ctx.settings.DATA_ROOT,
                                   max_params=ctx.settings.MAX_PROXY_PARAMS, checkpointing=saves)
            outcome = outcome_of(result, progress.stop_reason)
        except Exception as error:
            log.exception("attempt %s failed", attempt_id)
            outcome = _failure(error)
        finished = finish_attempt(ctx.session_factory, attempt_id, outcome, ctx.settings.MAX_RETRIES)
    if finished is not None:
        if study is not None and trial is not None:
            try:
                tell_outcome(study, trial, spec.objective.direction, outcome.state, outcome.value)
            except Exception:
                log.exception("could not tell Optuna how trial %s ended", trial.number)
        if finished.retry is not None:
            send_all(ctx.enqueue, [finished.retry.id], spec.queue)
        elif saves is not None:  # the trial is over: nothing will resume it
            saves.path.unlink(missing_ok=True)
    dispatch(ctx.session_factory, attempt.study_id, ctx.enqueue)
    log.info("attempt %s ended %s", attempt_id, outcome.state if finished is not None else "elsewhere (lost its lease)")
    return outcome.state if finished is not None else None
