"""A pack of attempts end to end: one Optuna load, K asks, one batched training, each member recorded as its own trial.

Every database write is per pack, not per member: the K asks are sampled in memory and stored in one transaction
(``ask_together``), each eval's points and Optuna reports in one each, the K ends and the K tells in one each.

Members whose configs differ only in values, seed and length (every trial of a tune study; a transfer check's values
and seeds at one size; a shape-schedule grid's budgets and seeds of one shape and size) share one computation
(``scaletune.packs``); the others form groups trained one after another.
An exception fails every member; each is then retried on its own, with its own params, like any failed attempt.
Packs do not checkpoint: ``train_pack`` keeps no resumable state per member, and a pack's retries need not meet
again in one pack, so a lost pack's members start over (a study whose trials must resume sets ``pack: 1``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from functools import partial
from typing import Any

import optuna

from scaletune.packs import pack_key, run_pack
from scaletune.runner import TrialConfig
from scaletune.train import Callback, EvalPoint
from service.dispatch import send_all
from service.kinds.registry import kind_of, spec_of
from service.models import Study, TrialAttempt, TrialState
from service.optuna_study import ChangedTrialsStorage, get_storage
from service.studies import study_is_cancelled
from service.trials import Outcome, finish_attempts, record_all_asked, record_points
from workers.running import Heartbeat, WorkerContext, ask_attempts, failure, outcome_of, tell_all

log = logging.getLogger(__name__)


class PackProgress:
    """The members' training callbacks: each reports to its own Optuna trial and is pruned on its own; the eval
    points of one eval are written in one transaction, the Optuna reports in another (deferred by the storage),
    and the study's cancellation is read once per eval."""

    def __init__(self, ctx: WorkerContext, study_id: str, beat: Heartbeat, storage: ChangedTrialsStorage,
                 members: list[tuple[str, optuna.Trial]]) -> None:
        self.ctx, self.study_id, self.beat, self.storage, self.members = ctx, study_id, beat, storage, members
        self.stop_reasons: list[TrialState | None] = [None] * len(members)
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._pending_step: int | None = None
        self._cancelled: tuple[int, bool] | None = None  # (step, cancelled then)

    def callbacks(self) -> list[Callback | None]:
        return [partial(self._on_eval, i) for i in range(len(self.members))]

    def flush(self) -> None:
        """Write the buffered eval points (members call in stack order, so after the last one of an eval)."""
        if self._pending:
            record_points(self.ctx.session_factory, self._pending)
            self.storage.write_reports()
        self._pending, self._pending_step = [], None

    def _cancelled_at(self, step: int) -> bool:
        if self._cancelled is None or self._cancelled[0] != step:
            self._cancelled = (step, study_is_cancelled(self.ctx.session_factory, self.study_id))
        return self._cancelled[1]

    def _on_eval(self, i: int, point: EvalPoint) -> bool:
        if self._pending_step is not None and point.step != self._pending_step:
            self.flush()
        attempt_id, trial = self.members[i]
        self._pending.append((attempt_id, asdict(point)))
        self._pending_step = point.step
        if math.isfinite(point.eval_loss):
            trial.report(point.eval_loss, point.step)
        if self._cancelled_at(point.step) or attempt_id in self.beat.lost_ids:
            self.stop_reasons[i] = TrialState.cancelled
        elif trial.should_prune():
            self.stop_reasons[i] = TrialState.pruned
        if all(reason is not None for reason in self.stop_reasons[i + 1:]):  # no later member reports this eval
            self.flush()
        return self.stop_reasons[i] is not None


def _groups(configs: list[TrialConfig]) -> list[list[int]]:
    """The members' indices grouped by what a pack's members share (``pack_key``), in order of first appearance."""
    keys: list[TrialConfig] = []
    groups: list[list[int]] = []
    for i, config in enumerate(configs):
        key = pack_key(config)
        if key not in keys:
            keys.append(key)
            groups.append([])
        groups[keys.index(key)].append(i)
    return groups


def run_pack_attempts(ctx: WorkerContext, attempts: list[TrialAttempt], study_row: Study) -> list[TrialState | None]:
    """Train claimed attempts as one pack; each one's final state, None where it was not ours to finish."""
    log.info("pack of %d attempts started: %s", len(attempts), [a.id for a in attempts])
    kind, spec = kind_of(study_row), spec_of(study_row)
    asked: list[tuple[optuna.Study, optuna.Trial]] = []
    storage = get_storage(ctx.settings.DATABASE_URL)
    with Heartbeat(ctx.session_factory, [a.id for a in attempts], ctx.settings.HEARTBEAT_INTERVAL) as beat:
        try:
            asked = ask_attempts(kind, spec, storage, study_row.optuna_study_name, attempts)
            record_all_asked(ctx.session_factory, [(a.id, trial.number, trial.params)
                                                   for a, (_, trial) in zip(attempts, asked)])
            configs = [kind.trial_config(spec, trial.params) for _, trial in asked]
            ended: dict[int, Outcome] = {}
            for group in _groups(configs):  # members that differ only in values, seed and length train as one
                progress = PackProgress(ctx, study_row.id, beat, storage,
                                        [(attempts[i].id, asked[i][1]) for i in group])
                with storage.reports_deferred():
                    results = run_pack([configs[i] for i in group], progress.callbacks(),
                                       data_root=ctx.settings.DATA_ROOT, max_params=ctx.settings.MAX_PROXY_PARAMS)
                    progress.flush()
                for i, result, reason in zip(group, results, progress.stop_reasons):
                    ended[i] = outcome_of(result, reason)
            outcomes = [ended[i] for i in range(len(attempts))]
        except Exception as error:
            log.exception("pack of attempts %s failed", [a.id for a in attempts])
            outcomes = [failure(error)] * len(attempts)
        finished = finish_attempts(ctx.session_factory, [(a.id, outcome) for a, outcome in zip(attempts, outcomes)],
                                   ctx.settings.MAX_RETRIES)
    tell_all(storage, [(*asked[i], outcomes[i]) for i, done in enumerate(finished) if done is not None and asked],
             spec.objective.direction)
    retries = [done.retry.id for done in finished if done is not None and done.retry is not None]
    send_all(ctx.enqueue, retries, spec.queue)
    states = [None if done is None else outcome.state for outcome, done in zip(outcomes, finished)]
    log.info("pack of %d attempts ended: %s", len(attempts), states)
    return states
