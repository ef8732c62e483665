"""The training loop for a pack: the core loop's schedule, loss, eval cadence and outcomes, K members per step.

A member whose loss turns non-finite, whose callback stops it (pruning), or whose budget ends leaves the stack at
once (its rows are dropped from parameters, optimizer state and settings), so the rest go on at the cost of the
members still training. Members may differ in length (steps, eval cadence; a shape-schedule grid's budgets): each
follows its own LR schedule and ends at its own last step. An eval evaluates the whole stack and records the
points of the members due one (a forward pass over the others is cheaper than splitting the stack).
The last member left finishes on the core training loop (``Loop``) with its state: a stack of one costs more per
step than the plain model (docs/benchmarks.md, "Proxy packs: the last member"; measured by bench/packs.py --last).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from scaletune.clipping import RelativeClipper
from scaletune.data.base import Dataset, Task
from scaletune.hparams import HParams
from scaletune.packs.optim import PackOptimizer, make_pack_optimizer, settings_by_name
from scaletune.packs.stack import PackedModel
from scaletune.parametrize import make_optimizer
from scaletune.train import (
    Budget, Callback, Loop, Progress, Status, TrainResult, _autocast, _to_device, lr_factor, resolve_device,
)

Batch = tuple[torch.Tensor, torch.Tensor]
FINISH_ALONE = True  # the last member finishes on the plain loop (False: in the stack; bench/packs.py --last)


@dataclass
class PackMember:
    """One trial inside a pack: its model as the parametrization built it, its values, seed and callback."""

    model: nn.Module
    param_groups: list[dict[str, Any]]
    hparams: HParams
    budget: Budget
    seed: int = 0
    callback: Callback | None = None
    clip: RelativeClipper | None = None  # the parametrization's clipping rule, on this member's own norm


class _Members:
    """The members still training, in stack order, with their progress and data streams."""

    def __init__(self, members: list[PackMember], dataset: Dataset, batch_size: int) -> None:
        self.members = members
        self.active = list(range(len(members)))
        self.progress = [Progress() for _ in members]
        self.status: list[Status | None] = [None] * len(members)
        self.seconds = [0.0] * len(members)
        self.shared_data = len({m.seed for m in members}) == 1
        streams = members[:1] if self.shared_data else members
        self.streams: list[Iterator[Batch]] = [dataset.train_batches(batch_size, m.seed) for m in streams]

    def next_batch(self) -> Batch:
        """One batch for everyone (members sharing a seed) or a (K, B, ...) stack of each member's own batch."""
        if self.shared_data:
            return next(self.streams[0])
        xs, ys = zip(*(next(self.streams[i]) for i in self.active))
        return torch.stack(xs), torch.stack(ys)

    def end(self, i: int, status: Status, seconds: float) -> None:
        self.status[i], self.seconds[i] = status, seconds

    def stream(self, i: int) -> Iterator[Batch]:
        """Member ``i``'s data stream where the pack left it (the shared one once ``i`` is the last member)."""
        return self.streams[0 if self.shared_data else i]


def member_loss(logits: torch.Tensor, targets: torch.Tensor, task: Task) -> torch.Tensor:
    """``loss_fn``'s cross-entropy as log_softmax and gather: under vmap F.cross_entropy runs nll_loss's Python
    decomposition, which made up a third of the mlp proxy's forward and backward."""
    logits = logits.float()
    if task == "lm":
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).mean()


def _pack_eval_losses(packed: PackedModel, dataset: Dataset, budget: Budget, device: torch.device) -> list[float]:
    """Each member's mean loss per target over the held-out split (``evaluate`` for K members at once)."""
    packed.train(False)
    total, count = torch.zeros(packed.size, dtype=torch.float64, device=device), 0
    loss = partial(member_loss, task=dataset.spec.task)
    with torch.no_grad():
        for batch in itertools.islice(dataset.eval_batches(budget.batch_size), budget.eval_batches):
            x, y = _to_device(batch, device)
            with _autocast(device):
                losses = packed.map(loss, x, y, per_member_data=False)
            total += losses.double() * y.numel()
            count += y.numel()
    packed.train(True)
    if count == 0:
        raise ValueError("the dataset's eval split yielded no batches")
    return (total / count).tolist()


def train_pack(members: list[PackMember], dataset: Dataset, optimizer: str, *,
               flops_per_sample: float, device: str | torch.device | None = None) -> list[TrainResult]:
    """Train same-shape models as one computation; each gets the ``TrainResult`` it would get alone.

    The members' budgets may differ only in ``steps`` and ``eval_every`` (batch, schedule and eval size are shared).
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    for m in members:
        m.model.to(dev).train()
    settings = [settings_by_name(m.model, m.param_groups) for m in members]
    packed = PackedModel([m.model for m in members])
    opt = make_pack_optimizer(optimizer, packed, settings, [m.hparams for m in members])
    budget = members[0].budget  # what the members' budgets share
    state = _Members(members, dataset, budget.batch_size)
    loss = partial(member_loss, task=dataset.spec.task)
    flops_per_step = float(budget.batch_size * flops_per_sample)

    def drop(leaving: dict[int, Status]) -> None:
        """Members at these stack positions end with these statuses; the stack shrinks to the others."""
        if not leaving:
            return
        now = time.perf_counter() - started
        for pos, status in leaving.items():
            state.end(state.active[pos], status, now)
        keep = [pos for pos in range(len(state.active)) if pos not in leaving]
        index = torch.tensor(keep, dtype=torch.long, device=dev)
        packed.keep(index)
        opt.keep(index)
        state.active = [state.active[pos] for pos in keep]

    for step in range(max(m.budget.steps for m in members)):
        if not state.active:
            break
        if len(state.active) == 1 and FINISH_ALONE:
            status = _finish_alone(state, packed, opt, optimizer, dataset, dev, flops_per_step)
            state.end(state.active.pop(), status, time.perf_counter() - started)
            break
        factors = torch.tensor([lr_factor(step, members[i].budget, members[i].hparams.warmup_frac)
                                for i in state.active],
                               dtype=torch.float64)
        x, y = _to_device(state.next_batch(), dev)
        with _autocast(dev):
            losses = packed.map(loss, x, y, per_member_data=not state.shared_data)
        values = losses.tolist()
        diverged = {pos: "diverged" for pos, v in enumerate(values) if not math.isfinite(v)}
        for pos in diverged:
            state.progress[state.active[pos]].diverged_step = step + 1
        finite = [pos for pos in range(len(values)) if pos not in diverged]
        if not finite:
            drop(diverged)
            break
        losses[finite].sum().backward()
        grad = packed.take_grad()[finite] if diverged else packed.take_grad()
        drop(diverged)
        _clip_members(grad, [members[i].clip for i in state.active])
        opt.step(grad, factors[finite])
        for pos, i in enumerate(state.active):
            state.progress[i].advance(values[finite[pos]], flops_per_step)
        if not any(members[i].budget.evaluates_after(step + 1) for i in state.active):
            continue
        leaving: dict[int, Status] = {}
        for pos, eval_loss in enumerate(_pack_eval_losses(packed, dataset, budget, dev)):
            i = state.active[pos]
            if not members[i].budget.evaluates_after(step + 1):
                continue
            point = state.progress[i].record(eval_loss, budget.batch_size)
            if point is None:
                leaving[pos] = "diverged"
            elif members[i].callback is not None and members[i].callback(point):
                leaving[pos] = "stopped"
            elif step + 1 == members[i].budget.steps:
                leaving[pos] = "completed"
        drop(leaving)
    return [p.result(s, seconds, dev) for p, s, seconds in zip(state.progress, state.status, state.seconds)]


def _finish_alone(state: _Members, packed: PackedModel, opt: PackOptimizer, optimizer: str, dataset: Dataset,
                  device: torch.device, flops_per_step: float) -> Status:
    """Train the pack's only member on to its end as a plain model with a torch optimizer, from its state."""
    i = state.active[0]
    member = state.members[i]
    packed.unstack_into(0, member.model)
    alone = make_optimizer(member.param_groups, optimizer, member.hparams)
    opt.export(0, member.model, alone)
    loop = Loop(dataset, member.budget, member.hparams.warmup_frac, device, member.callback)
    return loop.run(member.model, alone, state.stream(i), state.progress[i], member.budget.steps,
                    flops_per_step=flops_per_step, clip=member.clip)


def _clip_members(grad: torch.Tensor, clips: list[RelativeClipper | None]) -> None:
    """Each member's clipping rule on its own gradient norm (the rows of ``grad``), as it would run alone."""
    if all(clip is None for clip in clips):
        return
    norms = torch.linalg.vector_norm(grad, 2, dim=1).tolist()
    scales = [1.0 if clip is None else clip.scale(norm) for clip, norm in zip(clips, norms)]
    grad.mul_(torch.tensor(scales, dtype=grad.dtype, device=grad.device)[:, None])
