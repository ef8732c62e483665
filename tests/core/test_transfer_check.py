"""Transfer-check analysis on synthetic sweeps whose true optimum is known."""

import math

import numpy as np
import pytest

from scaletune.shapes import Shape
from scaletune.transfer_check import TrialRecord, analyse, check_grid, log2_grid, parabola_optimum, plot

GRID = [k * 0.5 for k in range(-6, 7)]
WIDTHS = [16, 64, 256]


def sweep(optima: list[float], floors: list[float], seeds: int = 3, noise: float = 0.0,
          diverge_above: float | None = None, rng_seed: int = 0) -> list[dict]:
    """Loss = floor + 0.1 (x - optimum)^2 + noise per (lr, seed); runs above ``diverge_above`` diverge."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for width, optimum, floor in zip(WIDTHS, optima, floors):
        for x in GRID:
            for seed in range(seeds):
                loss = floor + 0.1 * (x - optimum) ** 2 + noise * rng.standard_normal()
                diverged = diverge_above is not None and x > diverge_above
                rows.append({"size": f"w{width}", "shape": {"width": width, "depth": 2}, "log2_value": x,
                             "seed": seed, "loss": "diverged" if diverged else loss})
    return rows


def test_the_default_grid_spans_three_octaves_each_way_in_half_octaves():
    grid = check_grid("lr", 1e-3, log2_grid())
    assert len(grid) == 13
    assert [math.log2(g / 1e-3) for g in grid] == pytest.approx(GRID)


@pytest.mark.parametrize(("hparam", "tuned", "says"), [
    ("weight_decay", 0.0, "give a positive tuned weight_decay"),
    ("warmup_frac", 0.2, "must stay below 1"),
    ("eps", 1e-8, "varies one of lr, output_mult, init_std, weight_decay, warmup_frac, attn_mult"),
])
def test_grids_that_cannot_be_trained_are_refused_with_a_reason(hparam, tuned, says):
    with pytest.raises(ValueError, match=says):
        check_grid(hparam, tuned, log2_grid())
    assert max(check_grid("warmup_frac", 0.05, log2_grid())) == pytest.approx(0.4)


def test_parabola_recovers_an_off_grid_optimum_and_flags_edges():
    x, edge = parabola_optimum(GRID, [(g - 0.3) ** 2 for g in GRID])
    assert x == pytest.approx(0.3) and not edge
    x, edge = parabola_optimum(GRID, [(g - 5.0) ** 2 for g in GRID])
    assert x == 3.0 and edge


def test_stable_optimum_with_improving_loss_holds():
    result = analyse(sweep(optima=[0.2, 0.2, 0.2], floors=[2.0, 1.8, 1.7]))
    assert [s.size for s in result.sizes] == ["w16", "w64", "w256"]
    assert [s.optimum_log2 for s in result.sizes] == pytest.approx([0.2] * 3)
    assert result.verdict == "holds" and result.monotone and result.direction is None
    assert result.max_drift == pytest.approx(0.0, abs=1e-9)


def test_optimum_moving_to_lower_lr_drifts_with_direction():
    result = analyse(sweep(optima=[0.0, -1.0, -2.1], floors=[2.0, 1.8, 1.7]))
    assert [s.drift for s in result.sizes] == pytest.approx([0.0, -1.0, -2.1])
    assert result.verdict == "drifts" and result.direction == "lower"
    assert result.max_drift == pytest.approx(-2.1)


def test_loss_rising_with_size_is_not_a_pass():
    result = analyse(sweep(optima=[0.0, 0.0, 0.0], floors=[2.0, 2.1, 1.9]))
    assert not result.monotone and result.verdict == "not_monotone"


def test_diverged_points_are_kept_and_never_chosen():
    result = analyse(sweep(optima=[1.5, 1.5, 1.5], floors=[2.0, 1.8, 1.7], diverge_above=1.0))
    small = result.sizes[0]
    assert small.diverged == [3 if x > 1.0 else 0 for x in GRID]
    assert [y is None for y in small.mean_loss] == [x > 1.0 for x in GRID]
    assert small.optimum_log2 == 1.0  # the best finite point, next to the diverged one


def test_records_accept_a_value_instead_of_its_log2():
    record = TrialRecord.from_dict({"size": "s", "shape": {"width": 8, "depth": 1}, "value": 0.25, "seed": 0,
                                    "loss": float("nan")})
    assert record.log2_value == -2.0 and record.loss is None and record.shape == Shape(8, 1)


def test_any_checked_hyperparameter_gets_the_same_analysis_and_names_itself():
    result = analyse(sweep(optima=[0.0, -1.0, -2.1], floors=[2.0, 1.8, 1.7]), hparam="init_std")
    assert result.hparam == "init_std" and result.verdict == "drifts" and result.direction == "lower"
    assert any("lower init_std" in r for r in result.reasons)


def test_bootstrap_interval_over_seeds_contains_the_true_optimum():
    result = analyse(sweep(optima=[0.3, 0.3, 0.3], floors=[2.0, 1.8, 1.7], seeds=6, noise=0.02, rng_seed=3))
    for s in result.sizes:
        low, high = s.interval
        assert low <= 0.3 <= high
        assert high - low < 1.0


def test_plot_is_written_with_diverged_points(tmp_path):
    result = analyse(sweep(optima=[0.0, 0.0, 0.0], floors=[2.0, 1.8, 1.7], diverge_above=2.0))
    out = plot(result, tmp_path / "plots" / "check.png", title="synthetic")
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"


def test_two_sizes_at_the_same_grid_edge_are_inconclusive_not_holds():
    result = analyse(sweep(optima=[5.0, 5.0, 5.0], floors=[2.0, 1.8, 1.7]))
    assert all(s.at_edge for s in result.sizes) and result.max_drift == pytest.approx(0.0)
    assert result.verdict == "inconclusive"
    assert any("grid edge" in r for r in result.reasons)


def test_two_seeds_are_inconclusive_and_say_how_many_seeds_are_needed():
    result = analyse(sweep(optima=[0.2, 0.2, 0.2], floors=[2.0, 1.8, 1.7], seeds=2))
    assert result.verdict == "inconclusive" and result.seeds_needed == 3
    assert any("at least 3" in r for r in result.reasons)


def test_holds_needs_the_drift_interval_inside_the_tolerance():
    """Same true optimum everywhere, but noise wide enough that the interval crosses +-0.5 octave."""
    noisy = analyse(sweep(optima=[0.0, 0.0, 0.0], floors=[2.0, 1.8, 1.7], seeds=3, noise=0.05, rng_seed=7))
    assert abs(noisy.max_drift) <= noisy.tolerance  # the point estimate alone would have said 'holds'
    low, high = noisy.max_drift_interval
    assert low < -noisy.tolerance or high > noisy.tolerance
    assert noisy.verdict == "inconclusive" and noisy.seeds_needed > 3
    assert any("about" in r and "seeds" in r for r in noisy.reasons)
    quiet = analyse(sweep(optima=[0.0, 0.0, 0.0], floors=[2.0, 1.8, 1.7], seeds=6, noise=0.01, rng_seed=1))
    assert quiet.verdict == "holds"
    assert all(-0.5 <= s.drift_interval[0] <= s.drift_interval[1] <= 0.5 for s in quiet.sizes[1:])


def test_with_few_seeds_the_interval_depends_neither_on_the_random_stream_nor_on_the_other_sizes():
    """3 seeds have 10 distinct resamples: the bootstrap is exact, so the verdict is the data's, not the draw's."""
    rows = sweep(optima=[0.0, 0.3, 0.6], floors=[2.0, 1.8, 1.7], seeds=3, noise=0.05, rng_seed=3)
    first = analyse(rows, seed=0)
    assert [s.drift_interval for s in first.sizes] == [s.drift_interval for s in analyse(rows, seed=7).sizes]
    without_middle = analyse([r for r in rows if r["size"] != "w64"], seed=0)
    assert without_middle.sizes[-1].drift_interval == first.sizes[-1].drift_interval
    assert without_middle.sizes[-1].interval == first.sizes[-1].interval


def test_drifts_needs_the_drift_interval_beyond_the_tolerance():
    result = analyse(sweep(optima=[0.0, 1.0, 2.0], floors=[2.0, 1.8, 1.7], seeds=4, noise=0.01, rng_seed=2))
    assert result.verdict == "drifts" and result.direction == "higher"
    assert result.max_drift_interval[0] > 0.5
    assert result.sizes[0].drift == 0.0 and result.sizes[0].drift_interval is None


def test_a_single_size_is_refused():
    with pytest.raises(ValueError, match="at least two sizes"):
        analyse(sweep(optima=[0.0], floors=[2.0]))
