"""Scaling-law fits, adaptive schedules and projections, checked against synthetic data from known laws."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scaletune.scaling.fit import FitResult, Run, fit_law, fit_shape
from scaletune.scaling.laws import M4Law, SaturatingPowerLaw, law_from_dict
from scaletune.scaling.moves import product_shapes, surgery_moves
from scaletune.scaling.project import (
    ChinchillaLaw,
    estimate_compute_factor,
    project_tier_a,
    project_tier_b,
)
from scaletune.scaling.schedule import (
    ScheduleConstraints,
    loss_grid,
    plan_for_budget,
    plan_schedule,
    schedule_from_fits,
)
from scaletune.shapes import Shape

E0 = math.log(10)  # loss at initialisation of a 10-class problem

# Two shapes with a crossing: "coarse" is cheaper per unit of loss above E_CROSS, "fine" below.
# g_coarse = (20 / w)^4 and g_fine = (2000 / w)^2 with w = E - 1, so r_coarse = r_fine at w^2 = 0.08.
COARSE = SaturatingPowerLaw(e_inf=1.0, a=20.0, b=0.25)
FINE = SaturatingPowerLaw(e_inf=1.0, a=2000.0, b=0.5)
E_CROSS = 1.0 + math.sqrt(0.08)


def synthetic_runs(law, seed: int, n_seeds: int = 3, n_points: int = 25, lo: float = 1e12, hi: float = 1e16,
                   noise: float = 0.004) -> list[Run]:
    rng = np.random.default_rng(seed)
    flops = np.logspace(math.log10(lo), math.log10(hi), n_points)
    return [Run(seed=s, points=tuple(zip(flops.tolist(),
                                         (law.loss(flops) * np.exp(noise * rng.standard_normal(n_points))).tolist())))
            for s in range(n_seeds)]


# ---------------------------------------------------------------- laws


@pytest.mark.parametrize("law", [
    SaturatingPowerLaw(e_inf=0.9, a=3e4, b=0.3, d=1e11),
    M4Law(e_inf=0.8, e0=E0, alpha=1.2, beta=3e4, c=0.35),
])
def test_compute_to_reach_inverts_the_law_and_rate_is_its_slope(law):
    flops = np.logspace(11, 17, 13)
    losses = law.loss(flops)
    np.testing.assert_allclose(law.flops_to_reach(losses), flops, rtol=1e-9)
    h = 1e-7
    slope = (law.flops_to_reach(losses - h) - law.flops_to_reach(losses + h)) / (2 * h)
    np.testing.assert_allclose(law.rate(losses), slope, rtol=1e-5)
    assert np.isinf(law.flops_to_reach(law.e_inf * 0.99))


def test_compute_factor_shifts_the_curve():
    law = M4Law(e_inf=0.8, e0=E0, alpha=1.0, beta=3e4, c=0.35)
    scaled = law.with_compute_factor(8.0)
    flops = np.logspace(12, 16, 5)
    np.testing.assert_allclose(scaled.loss(8.0 * flops), law.loss(flops), rtol=1e-12)


# ---------------------------------------------------------------- fitting


def test_f1_fit_recovers_exponent_and_asymptote():
    truth = SaturatingPowerLaw(e_inf=1.0, a=3e4, b=0.3)
    runs = synthetic_runs(truth, seed=1)
    flops = np.concatenate([r.usable_points()[0] for r in runs])
    losses = np.concatenate([r.usable_points()[1] for r in runs])
    law = fit_law("F1", flops, losses)
    assert law.b == pytest.approx(0.3, abs=0.02)
    assert law.e_inf == pytest.approx(1.0, abs=0.04)


def test_m4_fit_recovers_exponent_and_asymptote():
    truth = M4Law(e_inf=0.8, e0=E0, alpha=1.0, beta=3e4, c=0.35)
    runs = synthetic_runs(truth, seed=2, noise=0.002)
    flops = np.concatenate([r.usable_points()[0] for r in runs])
    losses = np.concatenate([r.usable_points()[1] for r in runs])
    law = fit_law("M4", flops, losses, e0=E0)
    assert law.c == pytest.approx(0.35, abs=0.05)
    assert law.e_inf == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("truth", [
    SaturatingPowerLaw(e_inf=0.6, a=1e13 ** 0.5, b=0.5, d=1e13),  # plateaus at 1.6, far below E0
    M4Law(e_inf=0.8, e0=E0, alpha=1.0, beta=3e4, c=0.35),
])
def test_model_selection_picks_the_true_form_by_extrapolation(truth):
    result = fit_shape(synthetic_runs(truth, seed=3), e0=E0, n_bootstrap=0)
    assert result.form == truth.form
    assert result.extrapolation_error == min(result.candidate_errors.values())
    assert result.extrapolation_error < 0.02


def test_without_initial_loss_only_f1_is_a_candidate():
    result = fit_shape(synthetic_runs(COARSE, seed=4, lo=1e3, hi=1e8), n_bootstrap=0)
    assert set(result.candidate_errors) == {"F1"}


def test_warmup_region_is_dropped():
    truth = SaturatingPowerLaw(e_inf=1.0, a=3e4, b=0.3)
    clean = synthetic_runs(truth, seed=5)
    # Points before 5x the warm-up FLOPs are garbage (LR still ramping); they must not bend the fit.
    spoiled = [Run(r.seed, tuple((c, e * 3.0 if c < 5e12 else e) for c, e in r.points), warmup_flops=1e12)
               for r in clean]
    result = fit_shape(spoiled, n_bootstrap=0)
    assert result.flops_range[0] >= 5e12
    assert result.law.b == pytest.approx(0.3, abs=0.02)


def test_bootstrap_intervals_contain_the_truth_and_have_width():
    truth = SaturatingPowerLaw(e_inf=1.0, a=3e4, b=0.3)
    result = fit_shape(synthetic_runs(truth, seed=6), n_bootstrap=30, seed=0)
    intervals = result.param_intervals()
    for name, value in (("b", 0.3), ("e_inf", 1.0)):
        assert intervals[name].lo < intervals[name].hi
        assert intervals[name].contains(value), (name, intervals[name])
    reach = result.interval_of(lambda law: float(law.flops_to_reach(1.3)))
    assert reach.contains(float(truth.flops_to_reach(1.3)))


def test_fit_result_round_trips_through_json():
    result = fit_shape(synthetic_runs(COARSE, seed=7, lo=1e3, hi=1e8), e0=E0, n_bootstrap=3)
    restored = FitResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    assert law_from_dict(result.law.to_dict()) == result.law


# ---------------------------------------------------------------- schedules


def test_dp_equals_greedy_argmin_rate_without_switch_costs_or_constraints():
    laws = {
        "p32": SaturatingPowerLaw(e_inf=1.6, a=5.0, b=0.4),
        "p16": SaturatingPowerLaw(e_inf=1.2, a=30.0, b=0.45),
        "p8": SaturatingPowerLaw(e_inf=1.0, a=300.0, b=0.5),
    }
    start, target = 3.5, 1.25
    schedule = plan_schedule(laws, target, start, n_grid=300)
    grid = loss_grid(laws, start, target, 300)
    g = np.stack([law.flops_to_reach(grid) for law in laws.values()], axis=1)
    step = np.where(np.isfinite(g[1:]), g[1:] - np.where(np.isfinite(g[:-1]), g[:-1], 0.0), np.inf)
    step[0] = g[1]  # the first interval also pays for reaching the start loss
    greedy_choice = [list(laws)[i] for i in np.argmin(step, axis=1)]
    dp_choice = [seg.shape for seg in schedule.segments for _ in range(
        int(np.searchsorted(-grid, -seg.e_exit)) - int(np.searchsorted(-grid, -seg.e_enter)))]
    assert dp_choice == greedy_choice
    assert schedule.adaptive_flops == pytest.approx(float(np.min(step, axis=1).sum()), rel=1e-12)
    assert [s.shape for s in schedule.segments] == ["p32", "p16", "p8"]


def test_crossing_gives_one_switch_at_the_crossing_loss_and_the_analytic_saving():
    target = 1.05
    schedule = plan_schedule({"coarse": COARSE, "fine": FINE}, target, start_loss=3.0)
    assert [s.shape for s in schedule.segments] == ["coarse", "fine"]
    assert schedule.transitions[0].loss == pytest.approx(E_CROSS, abs=0.005)
    c_adaptive = COARSE.flops_to_reach(E_CROSS) + FINE.flops_to_reach(target) - FINE.flops_to_reach(E_CROSS)
    assert schedule.static_shape == "fine"
    assert schedule.adaptive_flops == pytest.approx(float(c_adaptive), rel=1e-4)
    assert schedule.saving == pytest.approx(1 - float(c_adaptive / FINE.flops_to_reach(target)), abs=1e-4)
    first, second = schedule.segments
    assert second.c_enter == first.c_exit
    assert second.c_exit - second.c_enter == pytest.approx(
        float(FINE.flops_to_reach(target) - FINE.flops_to_reach(first.e_exit)), rel=1e-9)


def test_grow_only_moves_and_switch_costs_are_respected():
    laws = {"coarse": COARSE, "fine": FINE}
    backwards_only = plan_schedule(laws, 1.05, 3.0, ScheduleConstraints(allowed={"fine": {"coarse"}}))
    assert [s.shape for s in backwards_only.segments] == ["fine"]
    assert backwards_only.saving == 0.0
    costly = plan_schedule(laws, 1.05, 3.0, ScheduleConstraints(switch_flops={("coarse", "fine"): 1e8}))
    assert [s.shape for s in costly.segments] == ["fine"]
    cheap = plan_schedule(laws, 1.05, 3.0, ScheduleConstraints(switch_flops={("coarse", "fine"): 1e6}))
    assert [s.shape for s in cheap.segments] == ["coarse", "fine"]
    assert cheap.segments[1].c_enter == pytest.approx(cheap.segments[0].c_exit + 1e6)


def test_max_switches_and_minimum_segment_length_are_respected():
    laws = {
        "w64": SaturatingPowerLaw(e_inf=1.6, a=5.0, b=0.4),
        "w128": SaturatingPowerLaw(e_inf=1.2, a=30.0, b=0.45),
        "w256": SaturatingPowerLaw(e_inf=1.0, a=300.0, b=0.5),
    }
    grow = {"w64": {"w128"}, "w128": {"w256"}}  # at most 2x wider per step, never narrower
    free = plan_schedule(laws, 1.25, 3.5, ScheduleConstraints(allowed=grow))
    one = plan_schedule(laws, 1.25, 3.5, ScheduleConstraints(allowed=grow, max_switches=1))
    assert len(free.segments) == 3 and len(one.segments) == 2
    assert free.adaptive_flops <= one.adaptive_flops <= one.static_flops
    for sched in (free, one):
        for a, b in zip(sched.segments, sched.segments[1:]):
            assert b.shape in grow[a.shape]
    minimum = 0.3 * free.adaptive_flops
    long = plan_schedule(laws, 1.25, 3.5, ScheduleConstraints(allowed=grow, min_segment_flops=minimum))
    assert len(long.segments) >= 2
    assert all(s.c_exit - s.c_enter >= minimum for s in long.segments)


def test_no_phase_of_a_schedule_costs_no_compute():
    """A law whose value at zero compute lies below the start loss reaches the first losses 'for free'. A phase
    that ends there would grow the untrained small model at step 0 (a worse init for the large one), so a
    schedule that switches spends compute in every phase (before this rule, this plan began with a free phase)."""
    laws = {"small": SaturatingPowerLaw(e_inf=2.0, a=0.5, b=0.5, d=4.0),  # E(0) = 2.25, plateaus at 2.0
            "large": SaturatingPowerLaw(e_inf=0.5, a=1.0, b=0.5)}
    assert laws["small"].flops_to_reach(2.3) == 0.0
    schedule = plan_schedule(laws, 1.0, start_loss=2.5)
    assert all(s.c_exit > s.c_enter for s in schedule.segments), schedule.segments


def test_budget_mode_inverts_target_mode():
    laws = {"coarse": COARSE, "fine": FINE}
    by_target = plan_schedule(laws, 1.08, 3.0)
    by_budget = plan_for_budget(laws, by_target.adaptive_flops, 3.0)
    assert by_budget.target_loss == pytest.approx(1.08, rel=1e-6)
    assert [s.shape for s in by_budget.segments] == [s.shape for s in by_target.segments]
    assert by_budget.static_loss_at_budget == pytest.approx(min(float(COARSE.loss(by_target.adaptive_flops)),
                                                                float(FINE.loss(by_target.adaptive_flops))))
    assert by_budget.static_loss_at_budget > by_budget.target_loss


def test_target_below_every_asymptote_is_rejected():
    with pytest.raises(ValueError, match="asymptote"):
        plan_schedule({"coarse": COARSE, "fine": FINE}, 0.99, 3.0)


def test_report_from_noisy_fits_brackets_the_true_saving():
    fits = {name: fit_shape(synthetic_runs(law, seed=i, lo=1e5, hi=3e9, noise=0.002), n_bootstrap=12, seed=i)
            for i, (name, law) in enumerate((("coarse", COARSE), ("fine", FINE)))}
    true_saving = plan_schedule({"coarse": COARSE, "fine": FINE}, 1.1, 3.0).saving
    report = schedule_from_fits(fits, start_loss=3.0, target_loss=1.1, n_grid=200)
    assert [s.shape for s in report.schedule.segments] == ["coarse", "fine"]
    assert report.saving.lo <= true_saving <= report.saving.hi
    assert report.transitions[0].loss.contains(E_CROSS)
    assert not report.low_confidence, report.reasons
    json.dumps(report.to_dict())
    budget = plan_schedule({"coarse": COARSE, "fine": FINE}, 1.1, 3.0).adaptive_flops
    by_budget = schedule_from_fits(fits, start_loss=3.0, budget_flops=budget, n_grid=200)
    assert by_budget.target_loss.contains(1.1)
    assert by_budget.adaptive_flops.median == pytest.approx(budget, rel=1e-6)
    # Far below anything observed, the finishing segment is an extrapolation: flagged.
    deep = schedule_from_fits(fits, start_loss=3.0, target_loss=1.02, n_grid=200)
    assert deep.low_confidence
    assert any("largest observed run" in r for r in deep.reasons)


def test_report_without_a_real_saving_is_low_confidence():
    fits = {name: fit_shape(synthetic_runs(law, seed=i, lo=1e5, hi=3e9), n_bootstrap=8, seed=i)
            for i, (name, law) in enumerate((("coarse", COARSE), ("fine", FINE)))}
    report = schedule_from_fits(fits, 3.0, target_loss=1.1, n_grid=100,
                                constraints=ScheduleConstraints(allowed={"fine": {"coarse"}}))
    assert report.schedule.saving == 0.0
    assert report.low_confidence
    assert any("includes 0" in r for r in report.reasons)


# ---------------------------------------------------------------- projection


def test_tier_a_projection_recovers_the_target_curve():
    truths = {"coarse": ChinchillaLaw(e=1.25, a=100.0, alpha=0.34, b=50.0, beta=0.3),
              "fine": ChinchillaLaw(e=0.9, a=120.0, alpha=0.34, b=150.0, beta=0.36)}

    def flops_per_sample(shape: str, size: float) -> float:
        return (2.0 if shape == "coarse" else 8.0) * 6.0 * size

    rng = np.random.default_rng(0)
    runs = {}
    for shape, truth in truths.items():
        runs[shape] = {}
        for size in (1e6, 3e6, 1e7):
            samples = np.logspace(4, 8, 15)
            flops = samples * flops_per_sample(shape, size)
            runs[shape][size] = [Run(seed=s, points=tuple(zip(
                flops.tolist(), (truth.loss(size, samples) * np.exp(0.002 * rng.standard_normal(15))).tolist())))
                for s in range(2)]
    target_size = 1e8
    projection = project_tier_a(runs, flops_per_sample, target_size, start_loss=5.0, target_loss=1.45,
                                n_bootstrap=4, n_grid=150)
    assert projection.tier == "A" and not projection.heuristic
    true_target = {shape: truth.at_size(target_size, flops_per_sample(shape, target_size))
                   for shape, truth in truths.items()}
    flops = np.logspace(14, 18, 5)
    for shape, law in true_target.items():
        np.testing.assert_allclose(projection.target_laws[shape].loss(flops), law.loss(flops), rtol=0.01)
    expected = plan_schedule(true_target, 1.45, 5.0, n_grid=150)
    planned = projection.report.schedule
    assert [s.shape for s in planned.segments] == [s.shape for s in expected.segments] == ["coarse", "fine"]
    assert planned.transitions[0].loss == pytest.approx(expected.transitions[0].loss, abs=0.02)
    assert planned.saving == pytest.approx(expected.saving, abs=0.01)
    json.dumps(projection.to_dict())


def test_tier_a_needs_three_sizes():
    runs = {"coarse": {1e6: synthetic_runs(COARSE, 0), 2e6: synthetic_runs(COARSE, 1)}}
    with pytest.raises(ValueError, match="tier B"):
        project_tier_a(runs, lambda shape, size: 6 * size, 1e8, start_loss=3.0, target_loss=1.1)


def test_tier_b_keeps_transition_losses_and_scales_flops():
    fits = {name: fit_shape(synthetic_runs(law, seed=i, lo=1e5, hi=3e9, noise=0.002), n_bootstrap=4, seed=i)
            for i, (name, law) in enumerate((("coarse", COARSE), ("fine", FINE)))}
    proxy = schedule_from_fits(fits, start_loss=3.0, target_loss=1.1, n_grid=200).schedule
    projected = project_tier_b(fits, compute_factor=50.0, start_loss=3.0, target_loss=1.1, n_grid=200)
    assert projected.heuristic and projected.tier == "B"
    target = projected.report.schedule
    assert [t.loss for t in target.transitions] == pytest.approx([t.loss for t in proxy.transitions])
    assert target.adaptive_flops == pytest.approx(50.0 * proxy.adaptive_flops, rel=1e-9)


def test_tier_b_plans_no_switch_below_the_lowest_observed_loss():
    fits = {name: fit_shape(synthetic_runs(law, seed=i, lo=1e4, hi=2e7), n_bootstrap=2, seed=i)
            for i, (name, law) in enumerate((("coarse", COARSE), ("fine", FINE)))}
    lowest = min(f.loss_range[0] for f in fits.values())
    assert lowest > E_CROSS  # the proxies never saw the crossing
    projected = project_tier_b(fits, compute_factor=10.0, start_loss=3.0, target_loss=1.1, n_grid=200)
    assert all(t.loss >= lowest for t in projected.report.schedule.transitions)


def test_compute_factor_is_estimated_from_a_target_curve_prefix():
    target = FINE.with_compute_factor(37.0)
    prefix = synthetic_runs(target, seed=9, n_seeds=1, lo=1e7, hi=1e9, noise=0.002)
    assert estimate_compute_factor(FINE, prefix) == pytest.approx(37.0, rel=0.05)


def test_joint_schedule_takes_a_two_axis_move_that_single_axis_moves_cannot_make():
    """Over patch x width, the DP may go from the coarse-narrow shape straight to the fine-wide one."""
    shapes = product_shapes(Shape(32, 2), {"patch_size": [8, 4], "width": [32, 64]})
    assert list(shapes) == ["patch_size=8,width=32", "patch_size=8,width=64", "patch_size=4,width=32",
                            "patch_size=4,width=64"]
    poor = SaturatingPowerLaw(e_inf=1.5, a=20.0, b=0.2)  # the one-axis neighbours never reach the target
    laws = dict(zip(shapes, (COARSE, poor, poor, FINE)))
    joint = plan_schedule(laws, 1.05, 3.0, ScheduleConstraints(allowed=surgery_moves(shapes)))
    assert [s.shape for s in joint.segments] == ["patch_size=8,width=32", "patch_size=4,width=64"]
    assert joint.transitions[0].loss == pytest.approx(E_CROSS, abs=0.005)
    one_axis = plan_schedule(laws, 1.05, 3.0, ScheduleConstraints(allowed=surgery_moves(shapes, max_axes=1),
                                                                  min_segment_flops=1e6))
    assert ("patch_size=8,width=32", "patch_size=4,width=64") not in [
        (t.from_shape, t.to_shape) for t in one_axis.transitions]
    assert one_axis.adaptive_flops > joint.adaptive_flops


def test_surgery_moves_follow_what_surgery_can_do():
    shapes = product_shapes(Shape(16, 2), {"width": [16, 32, 48, 64], "depth": [2, 4]})
    allowed = surgery_moves(shapes, max_width_factor=2)
    assert allowed("width=16,depth=2", "width=32,depth=4")  # two axes at once
    assert not allowed("width=16,depth=2", "width=64,depth=2")  # 4x > max factor
    assert not allowed("width=32,depth=2", "width=48,depth=2")  # not a whole factor
    assert not allowed("width=32,depth=4", "width=32,depth=2")  # depth never shrinks
    assert not allowed("width=16,depth=2", "width=16,depth=2")
    assert not surgery_moves(shapes, max_axes=1)("width=16,depth=2", "width=32,depth=4")
    with pytest.raises(ValueError, match="axes must be some of"):
        product_shapes(Shape(16, 2), {"heads": [1, 2]})
