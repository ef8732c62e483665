"""One trial attempt end to end: claim, heartbeat, ask Optuna, train, report/prune, tell, record, top up."""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import asdict
from functools import partial
from typing import Any

import optuna
from sqlalchemy import select

from scaletune.runner import TrialConfig, run_trial
from scaletune.train import Checkpointing, EvalPoint
from service.dispatch import Claimant, dispatch, dispatch_and_claim, send_all
from service.kinds.registry import kind_of, spec_of
from service.logging import log_context
from service.models import Study, TrialAttempt, TrialState
from service.optuna_study import get_storage
from service.studies import study_is_cancelled
from service.trials import claim_pack, finish_attempt, record_asked, record_point, trial_checkpoint
from workers.pack_task import run_pack_attempts
from workers.running import Heartbeat, WorkerContext, ask_attempts, failure, outcome_of, tell

__all__ = ["WorkerContext", "checkpointing", "run_attempt"]

log = logging.getLogger(__name__)


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


def checkpointing(ctx: WorkerContext, attempt: TrialAttempt, config: TrialConfig) -> Checkpointing | None:
    """Long trials (more than CHECKPOINT_EVERY_EVALS evals) save every CHECKPOINT_EVERY_EVALS evals, in a file
    every attempt of the trial shares, so a retry after a lost worker resumes where the last save left it."""
    every = ctx.settings.CHECKPOINT_EVERY_EVALS
    if every == 0 or config.budget.steps // config.budget.eval_every <= every:
        return None
    assert ctx.settings.ARTIFACTS_DIR is not None
    return Checkpointing(trial_checkpoint(ctx.settings.ARTIFACTS_DIR, ctx.session_factory, attempt), every)


def run_attempt(ctx: WorkerContext, attempt_id: str, task_id: str | None = None) -> TrialState | None:
    """Run one attempt (with the pack it heads); returns its final state, or None if it was not ours to run
    (duplicate or cancelled). Then, while ``ctx.carry_on()``, the study's next queued attempts in turn."""
    with log_context(trial_id=attempt_id):
        if ctx.pack_members.take(attempt_id):  # its own task, delivered after this worker ran it
            log.info("attempt %s was trained by this worker already; skipping its own task", attempt_id)
            return None
        first_pack = _claim(ctx, attempt_id, task_id)
        if first_pack is None:
            log.info("attempt %s is not queued any more (duplicate delivery or cancelled); skipping", attempt_id)
            return None
    study_row, claimed = first_pack
    ctx.pack_members.add(attempt.id for attempt in claimed[1:])
    state = _run(ctx, claimed, study_row)
    while (next_pack := _top_up_and_take_next(ctx, study_row.id, task_id)) is not None:
        study_row, claimed = next_pack
        ctx.pack_members.add(attempt.id for attempt in claimed)  # one queued before the top-up has a task coming
        _run(ctx, claimed, study_row)
    return state


def _claim(ctx: WorkerContext, attempt_id: str, task_id: str | None) -> tuple[Study, list[TrialAttempt]] | None:
    """The attempt's study, and the attempt with the rest of its pack, claimed; None if it was not queued (a pack
    took it, or a duplicate delivery)."""
    with ctx.session_factory() as session:
        found = session.execute(select(Study, TrialAttempt).join(TrialAttempt, TrialAttempt.study_id == Study.id)
                                .where(TrialAttempt.id == attempt_id)).one_or_none()
    if found is None or found[1].state != TrialState.queued:
        return None
    claimed = claim_pack(ctx.session_factory, attempt_id, _worker(), task_id, _pack_size(ctx, *found))
    return (found[0], claimed) if claimed else None


def _top_up_and_take_next(ctx: WorkerContext, study_id: str,
                          task_id: str | None) -> tuple[Study, list[TrialAttempt]] | None:
    """Top the study up after a run; while ``ctx.carry_on()``, also take its next pack in turn (in the same
    transaction, no task sent for it), which is returned. Otherwise the next attempts' tasks bring them: a task
    for an attempt of the pack just trained would reach this worker only after every one of them, each a broker
    round trip to skip."""
    if not ctx.carry_on():
        dispatch(ctx.session_factory, study_id, ctx.enqueue)
        return None
    study_row, claimed = dispatch_and_claim(ctx.session_factory, study_id, ctx.enqueue,
                                            Claimant(_worker(), task_id, partial(_pack_size, ctx)))
    return (study_row, claimed) if study_row is not None and claimed else None


def _run(ctx: WorkerContext, claimed: list[TrialAttempt], study_row: Study) -> TrialState | None:
    """Train claimed attempts (a pack, or one on its own): the first one's final state."""
    with log_context(trial_id=claimed[0].id, study_id=study_row.id):
        if len(claimed) > 1:
            return run_pack_attempts(ctx, claimed, study_row)[0]
        return _train_and_record(ctx, claimed[0], study_row)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pack_size(ctx: WorkerContext, study_row: Study, attempt: TrialAttempt) -> int:
    """The study's pack size on this worker; 1 for planned work, or when it cannot be worked out (the attempt then
    fails on its own)."""
    try:
        kind = kind_of(study_row)
        return 1 if kind.is_planned(attempt) else kind.pack_size(spec_of(study_row), ctx.settings.DATA_ROOT)
    except Exception:
        log.exception("could not size a pack for study %s; running one trial", study_row.id)
        return 1


def _train_and_record(ctx: WorkerContext, attempt: TrialAttempt, study_row: Study) -> TrialState | None:
    attempt_id = attempt.id
    log.info("attempt %s started (attempt number %d)", attempt_id, attempt.attempt)
    kind = kind_of(study_row)
    spec = spec_of(study_row)
    storage = get_storage(ctx.settings.DATABASE_URL)
    study: optuna.Study | None = None
    trial: optuna.Trial | None = None
    saves: Checkpointing | None = None
    with Heartbeat(ctx.session_factory, [attempt_id], ctx.settings.HEARTBEAT_INTERVAL) as beat:
        try:
            progress = _Progress(ctx, attempt_id, attempt.study_id, beat)
            result = kind.run_planned(spec, attempt, ctx.settings, progress.record)
            if result is None:  # a trial: Optuna says what to train
                [(study, trial)] = ask_attempts(kind, spec, storage, study_row.optuna_study_name, [attempt])
                record_asked(ctx.session_factory, attempt_id, trial.number, trial.params)
                progress = _Progress(ctx, attempt_id, attempt.study_id, beat, trial)
                config = kind.trial_config(spec, trial.params)
                saves = checkpointing(ctx, attempt, config)
                result = run_trial(config, progress, data_root=ctx.settings.DATA_ROOT,
                                   max_params=ctx.settings.MAX_PROXY_PARAMS, checkpointing=saves)
            outcome = outcome_of(result, progress.stop_reason)
        except Exception as error:
            log.exception("attempt %s failed", attempt_id)
            outcome = failure(error)
        finished = finish_attempt(ctx.session_factory, attempt_id, outcome, ctx.settings.MAX_RETRIES)
    if finished is not None:
        if study is not None and trial is not None:
            tell(study, trial, spec.objective.direction, outcome)
        if finished.retry is not None:
            send_all(ctx.enqueue, [finished.retry.id], spec.queue)
        elif saves is not None:  # the trial is over: nothing will resume it
            saves.path.unlink(missing_ok=True)
    log.info("attempt %s ended %s", attempt_id, outcome.state if finished is not None else "elsewhere (lost its lease)")
    return outcome.state if finished is not None else None
