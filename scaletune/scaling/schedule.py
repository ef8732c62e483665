"""Adaptive shape schedules: which shape to train in at each loss level, by dynamic programming.

Each shape s has a law with g_s(E) = compute to reach loss E. Switching at loss E keeps the loss
(assumption A2 of Anagnostidis et al.), so a segment in s from E_enter to E_exit costs
g_s(E_exit) - g_s(E_enter) of s's *own* compute, plus a measured switch overhead kappa(s' -> s).
On a loss grid e_0 = start > ... > e_K = target the DP minimises total compute over allowed moves;
with kappa = 0 and free moves it reduces to the greedy "follow the shape with the lowest rate r_s(E)".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import brentq

from scaletune.scaling.fit import FitResult, Interval
from scaletune.scaling.laws import ScalingLaw

AllowedMoves = Callable[[str, str], bool] | Mapping[str, Collection[str]]


@dataclass(frozen=True)
class ScheduleConstraints:
    """Which switches are possible and what they cost.

    ``allowed``: None (any shape may follow any other), a predicate ``allowed(src, dst)`` or a graph
    ``{src: {dst, ...}}`` (e.g. grow only, width <= 2x per step, patch size decreasing).
    ``switch_flops``: measured overhead kappa per move (missing moves cost 0).
    ``min_segment_flops``: every segment of a schedule that switches must use more than this much compute.
    ``no_switch_below``: no switch at losses below this level (the lowest loss the proxies observed).
    """

    allowed: AllowedMoves | None = None
    switch_flops: Mapping[tuple[str, str], float] = field(default_factory=dict)
    max_switches: int | None = None
    min_segment_flops: float = 0.0
    no_switch_below: float | None = None

    def scaled(self, kappa: float) -> ScheduleConstraints:
        """The same constraints with every FLOP figure multiplied by ``kappa``."""
        return replace(self, switch_flops={k: v * kappa for k, v in self.switch_flops.items()},
                       min_segment_flops=self.min_segment_flops * kappa)

    def move_costs(self, names: Sequence[str]) -> np.ndarray:
        """Matrix [src, dst] of switch costs; inf where a move is not allowed (and on the diagonal)."""
        costs = np.full((len(names), len(names)), np.inf)
        for i, src in enumerate(names):
            for j, dst in enumerate(names):
                if i != j and self._allows(src, dst):
                    costs[i, j] = float(self.switch_flops.get((src, dst), 0.0))
        return costs

    def _allows(self, src: str, dst: str) -> bool:
        if self.allowed is None:
            return True
        if callable(self.allowed):
            return bool(self.allowed(src, dst))
        return dst in self.allowed.get(src, ())


@dataclass(frozen=True)
class Segment:
    """Train ``shape`` from loss ``e_enter`` to ``e_exit``; ``c_*`` are cumulative FLOPs of the whole run."""

    shape: str
    e_enter: float
    e_exit: float
    c_enter: float
    c_exit: float
    extrapolated: bool

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "e_enter": self.e_enter, "e_exit": self.e_exit,
                "c_enter": self.c_enter, "c_exit": self.c_exit, "extrapolated": self.extrapolated}


@dataclass(frozen=True)
class Transition:
    from_shape: str
    to_shape: str
    loss: float
    flops: float


@dataclass(frozen=True)
class Schedule:
    """The optimal schedule to ``target_loss`` against the best single (static) shape."""

    segments: tuple[Segment, ...]
    start_loss: float
    target_loss: float
    adaptive_flops: float
    static_shape: str
    static_flops: float
    budget_flops: float | None = None
    static_loss_at_budget: float | None = None

    @property
    def saving(self) -> float:
        """Predicted fraction of compute saved: 1 - C_ad / C_static (0 when the target needs no compute at all)."""
        if self.static_flops <= 0.0:
            return 0.0
        return 1.0 - self.adaptive_flops / self.static_flops

    @property
    def transitions(self) -> tuple[Transition, ...]:
        return tuple(Transition(a.shape, b.shape, a.e_exit, a.c_exit)
                     for a, b in zip(self.segments, self.segments[1:]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "segments": [s.to_dict() for s in self.segments],
            "start_loss": self.start_loss,
            "target_loss": self.target_loss,
            "adaptive_flops": self.adaptive_flops,
            "static_shape": self.static_shape,
            "static_flops": self.static_flops,
            "saving": self.saving,
            "budget_flops": self.budget_flops,
            "static_loss_at_budget": self.static_loss_at_budget,
        }


def loss_grid(laws: Mapping[str, ScalingLaw], start_loss: float, target_loss: float, n_grid: int) -> np.ndarray:
    """Losses from start to target, evenly spaced in log(E - min_s E_inf,s)."""
    floor = min(law.e_inf for law in laws.values())
    if not start_loss > target_loss > floor:
        raise ValueError(f"need start_loss > target_loss > lowest asymptote {floor:.6g}; "
                         f"got start {start_loss:.6g}, target {target_loss:.6g}")
    return floor + np.exp(np.linspace(math.log(start_loss - floor), math.log(target_loss - floor), n_grid))


def plan_schedule(laws: Mapping[str, ScalingLaw], target_loss: float, start_loss: float,
                  constraints: ScheduleConstraints | None = None,
                  observed_max_flops: Mapping[str, float] | None = None, n_grid: int = 400) -> Schedule:
    """Cheapest schedule from ``start_loss`` down to ``target_loss``.

    A segment is ``extrapolated`` when it needs more of its shape's own compute than that shape's
    largest observed run (``observed_max_flops``).
    """
    cons = constraints or ScheduleConstraints()
    names = list(laws)
    grid = loss_grid(laws, start_loss, target_loss, n_grid)
    g = np.stack([laws[s].flops_to_reach(grid) for s in names], axis=1)
    path = _optimal_path(g, grid, cons.move_costs(names), cons)
    static = int(np.argmin(g[-1]))
    if not np.isfinite(g[-1, static]):
        raise ValueError(f"no shape reaches loss {target_loss:.6g}")
    segments, c = [], float(g[path[0][1], path[0][0]])
    for i, (s, j, k) in enumerate(path):
        if i:
            c += float(cons.switch_flops.get((names[path[i - 1][0]], names[s]), 0.0))
        c_exit = c + float(g[k, s] - g[j, s])
        limit = (observed_max_flops or {}).get(names[s], math.inf)
        segments.append(Segment(names[s], float(grid[j]), float(grid[k]), c, c_exit, bool(g[k, s] > limit)))
        c = c_exit
    return Schedule(tuple(segments), float(start_loss), float(target_loss), c, names[static], float(g[-1, static]))


def _optimal_path(g: np.ndarray, grid: np.ndarray, move_cost: np.ndarray,
                  cons: ScheduleConstraints) -> list[tuple[int, int, int]]:
    """Segments (shape index, grid start, grid end) of the cheapest path; g[k, s] = g_s(grid[k]).

    States are (grid point, shape, layer); layer counts switches (capped at 1 when unlimited, so
    single-shape paths stay exempt from ``min_segment_flops``). ``enter[k, l, s]`` is the cost on
    entering s at k, ``leave[k, l, s]`` the cost on reaching k at the end of a segment in s.
    """
    n, n_shapes = g.shape
    bounded = cons.max_switches is not None
    n_layers = (cons.max_switches + 1) if bounded else 2
    finite = np.isfinite(g)
    # Last grid start j < k such that a segment j -> k in s uses more than min_segment_flops: never none, since
    # a law reaches the losses above its value at zero compute for free, and a free phase would grow the
    # untrained model at step 0.
    last_start = np.stack([np.searchsorted(g[:, s], g[:, s] - cons.min_segment_flops, side="left") - 1
                           for s in range(n_shapes)], axis=1)
    last_start = np.minimum(last_start, np.arange(n)[:, None] - 1)
    enter = np.full((n, n_layers, n_shapes), np.inf)
    enter[0, 0] = g[0]
    came_from = np.zeros((n, n_layers, n_shapes, 2), dtype=int)  # (layer, shape) before the switch
    best_start = np.full((n, n_layers, n_shapes), np.inf)        # prefix min over j of enter - g
    best_start_at = np.zeros((n, n_layers, n_shapes), dtype=int)
    leave = np.full((n, n_layers, n_shapes), np.inf)
    leave_from = np.zeros((n, n_layers, n_shapes), dtype=int)
    shape_idx = np.arange(n_shapes)
    for k in range(n):
        if k:
            j = np.maximum(last_start[k], 0)
            ok = last_start[k] >= 0
            leave[k] = np.where(ok, g[k] + best_start[j, :, shape_idx].T, np.inf)
            leave_from[k] = best_start_at[j, :, shape_idx].T
            if k < n - 1 and (cons.no_switch_below is None or grid[k] >= cons.no_switch_below):
                _switch(enter[k], came_from[k], leave[k], move_cost, bounded)
        value = np.where(finite[k], enter[k] - np.where(finite[k], g[k], 0.0), np.inf)
        prev_best = best_start[k - 1] if k else np.full((n_layers, n_shapes), np.inf)
        better = value < prev_best
        best_start[k] = np.where(better, value, prev_best)
        best_start_at[k] = np.where(better, k, best_start_at[k - 1] if k else 0)
    # A single-shape path ignores min_segment_flops; paths with switches end in layer >= 1.
    switched = leave[-1, 1:]
    if switched.size and np.min(switched) < np.min(g[-1]):
        layer, s = np.unravel_index(int(np.argmin(switched)), switched.shape)
        layer += 1
    else:
        return [(int(np.argmin(g[-1])), 0, n - 1)]
    path, k = [], n - 1
    while True:
        j = int(leave_from[k, layer, s])
        path.append((int(s), j, k))
        if layer == 0:
            return path[::-1]
        layer, s = came_from[j, layer, s]
        k = j


def _switch(enter_k: np.ndarray, came_from_k: np.ndarray, leave_k: np.ndarray, move_cost: np.ndarray,
            bounded: bool) -> None:
    """Fill enter[k] from leave[k] via one allowed move (in place)."""
    cand = leave_k[:, :, None] + move_cost[None, :, :]  # [layer, src, dst]
    if bounded:
        for layer in range(1, enter_k.shape[0]):
            src = np.argmin(cand[layer - 1], axis=0)
            enter_k[layer] = cand[layer - 1][src, np.arange(cand.shape[2])]
            came_from_k[layer, :, 0] = layer - 1
            came_from_k[layer, :, 1] = src
    else:
        flat = cand.reshape(-1, cand.shape[2])  # both layers switch into layer 1
        best = np.argmin(flat, axis=0)
        enter_k[1] = flat[best, np.arange(flat.shape[1])]
        came_from_k[1, :, 0] = best // cand.shape[1]
        came_from_k[1, :, 1] = best % cand.shape[1]


def plan_for_budget(laws: Mapping[str, ScalingLaw], budget_flops: float, start_loss: float,
                    constraints: ScheduleConstraints | None = None,
                    observed_max_flops: Mapping[str, float] | None = None, n_grid: int = 400) -> Schedule:
    """Budget mode: the lowest target loss E* whose adaptive schedule costs ``budget_flops``."""
    floor = min(law.e_inf for law in laws.values())

    def plan(u: float) -> Schedule:
        return plan_schedule(laws, floor + math.exp(u), start_loss, constraints, observed_max_flops, n_grid)

    hi = math.log(start_loss - floor) - 1e-9
    lo = math.log(start_loss - floor) + math.log(1e-9)
    if plan(hi).adaptive_flops >= budget_flops:
        raise ValueError(f"budget {budget_flops:.4g} FLOPs does not get below the start loss {start_loss:.6g}")
    if plan(lo).adaptive_flops <= budget_flops:
        raise ValueError(f"budget {budget_flops:.4g} FLOPs reaches the asymptote; lower it or add shapes")
    def log_excess(v: float) -> float:
        # Clipped: g may be 0 near the start (d > 0) or overflow near the asymptote; only the sign matters there.
        return math.log(min(max(plan(v).adaptive_flops, 1e-300), 1e300) / budget_flops)

    u = brentq(log_excess, lo, hi, xtol=1e-10, rtol=1e-10)
    static_loss = min(float(law.loss(budget_flops)) for law in laws.values())
    return replace(plan(u), budget_flops=float(budget_flops), static_loss_at_budget=static_loss)


@dataclass(frozen=True)
class TransitionSummary:
    """A switch of the central schedule, with bootstrap spread over replicates that make it too."""

    from_shape: str
    to_shape: str
    loss: Interval
    flops: Interval
    support: float

    def to_dict(self) -> dict[str, Any]:
        return {"from_shape": self.from_shape, "to_shape": self.to_shape, "loss": self.loss.to_dict(),
                "flops": self.flops.to_dict(), "support": self.support}


@dataclass(frozen=True)
class ScheduleReport:
    """The central schedule, bootstrap intervals of its saving and switches, and a confidence flag."""

    schedule: Schedule
    saving: Interval
    adaptive_flops: Interval
    target_loss: Interval
    transitions: tuple[TransitionSummary, ...]
    n_replicates: int
    low_confidence: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "saving": self.saving.to_dict(),
                "adaptive_flops": self.adaptive_flops.to_dict(), "target_loss": self.target_loss.to_dict(),
                "transitions": [t.to_dict() for t in self.transitions], "n_replicates": self.n_replicates,
                "low_confidence": self.low_confidence, "reasons": list(self.reasons)}


def schedule_report(central: Mapping[str, ScalingLaw], replicates: Sequence[Mapping[str, ScalingLaw]],
                    start_loss: float, target_loss: float | None = None, budget_flops: float | None = None,
                    constraints: ScheduleConstraints | None = None,
                    observed_max_flops: Mapping[str, float] | None = None,
                    n_grid: int = 400, level: float = 0.9) -> ScheduleReport:
    """Plan with the central laws and with every bootstrap replicate; give exactly one of
    ``target_loss`` (target mode) or ``budget_flops`` (budget mode)."""
    if (target_loss is None) == (budget_flops is None):
        raise ValueError("give exactly one of target_loss or budget_flops")

    def plan(laws: Mapping[str, ScalingLaw]) -> Schedule:
        if budget_flops is not None:
            return plan_for_budget(laws, budget_flops, start_loss, constraints, observed_max_flops, n_grid)
        return plan_schedule(laws, target_loss, start_loss, constraints, observed_max_flops, n_grid)

    schedule = plan(central)
    plans: list[Schedule] = []
    for laws in replicates:
        try:
            plans.append(plan(laws))
        except ValueError:
            continue  # this replicate's laws cannot reach the target (or spend the budget): counted below
    reasons = [f"segment in {s.shape} needs more compute than its largest observed run"
               for s in schedule.segments if s.extrapolated]
    if len(plans) < len(replicates):
        reasons.append(f"{len(replicates) - len(plans)} of {len(replicates)} bootstrap replicates "
                       "give no feasible schedule")
    saving = Interval.from_samples((p.saving for p in plans), level)
    if not saving.lo > 0:
        reasons.append(f"the {level:.0%} interval of the saving includes 0")
    return ScheduleReport(
        schedule=schedule,
        saving=saving,
        adaptive_flops=Interval.from_samples((p.adaptive_flops for p in plans), level),
        target_loss=Interval.from_samples((p.target_loss for p in plans), level),
        transitions=tuple(_summarise(t, plans, level) for t in schedule.transitions),
        n_replicates=len(plans),
        low_confidence=bool(reasons),
        reasons=tuple(reasons),
    )


def _summarise(transition: Transition, plans: Sequence[Schedule], level: float) -> TransitionSummary:
    matches = [next((t for t in p.transitions
                     if (t.from_shape, t.to_shape) == (transition.from_shape, transition.to_shape)), None)
               for p in plans]
    found = [t for t in matches if t is not None]
    return TransitionSummary(transition.from_shape, transition.to_shape,
                             Interval.from_samples((t.loss for t in found), level),
                             Interval.from_samples((t.flops for t in found), level),
                             support=len(found) / len(plans) if plans else 0.0)


def schedule_from_fits(fits: Mapping[str, FitResult], start_loss: float, target_loss: float | None = None,
                       budget_flops: float | None = None, constraints: ScheduleConstraints | None = None,
                       n_grid: int = 400, level: float = 0.9) -> ScheduleReport:
    """``schedule_report`` on per-shape fits: replicate i pairs every shape's i-th bootstrap refit."""
    n_rep = min(len(f.bootstrap) for f in fits.values())
    replicates = [{s: f.bootstrap[i] for s, f in fits.items()} for i in range(n_rep)]
    return schedule_report({s: f.law for s, f in fits.items()}, replicates, start_loss, target_loss,
                           budget_flops, constraints, {s: f.flops_range[1] for s, f in fits.items()},
                           n_grid, level)
