"""Tests of the capacity experiments' support code: censored regression.

- experiments/scaling.py: the interval-censored fit recovers a known exponent from synthetic grid
  measurements, and cannot bound it (infinite interval) when every point is right-censored.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import scaling as sc

# ------------------------------------------------------------------------------------------------
# scaling.py: interval-censored regression
# ------------------------------------------------------------------------------------------------

STATES = np.repeat(2.0 ** np.arange(10, 18), 3)  # 8 state sizes (1K-128K elements) x 3 seeds, as a sweep
INTERCEPT = 2.0  # log2 tokens at N_S = 1 of the synthetic truth
NOISE = 0.3  # residual sd of log2 T_forget (log2 units) of the synthetic truth
# Tolerance on the slope: over seeds 0-9 the fit's error had sd 0.026 (b = 1) and 0.041 (b = 0.5), worst
# 0.107; 0.15 is about 4 sd, so the test fails on a broken fit, not on an unlucky draw.
SLOPE_TOL = 0.15


def grid_measurements(b: float, seed: int) -> tuple[np.ndarray, list, np.ndarray]:
    """Synthetic sweep: log2 T_forget = INTERCEPT + b log2 N_S + NOISE eps, seen on a doubling grid that
    leaves the smallest states left-censored and the largest right-censored."""
    rng = np.random.default_rng(seed)
    y = INTERCEPT + b * np.log2(STATES) + NOISE * rng.standard_normal(STATES.size)  # (n,) log2 tokens
    grid = 2.0 ** np.arange(math.floor(INTERCEPT + b * 10) + 1, math.ceil(INTERCEPT + b * 17))
    log_grid = np.log2(grid)
    first_seen = [float(grid[np.searchsorted(log_grid, v)]) if v <= log_grid[-1] else None for v in y]
    return y, first_seen, grid


@pytest.mark.parametrize("b", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_censored_fit_recovers_a_known_exponent(b, seed):
    y, first_seen, grid = grid_measurements(b, seed)
    fit = sc.fit_power_law(STATES, first_seen, grid)
    assert fit.n_left_censored > 0 and fit.n_right_censored > 0, "the synthetic sweep should censor both ends"
    assert abs(fit.slope - b) < SLOPE_TOL, f"slope {fit.slope:.3f} vs true {b} (tolerance {SLOPE_TOL})"
    lo, hi = fit.slope_ci
    assert fit.slope_bounded and lo < fit.slope < hi, f"interval {fit.slope_ci} around {fit.slope}"
    assert lo <= b <= hi, f"the 95% interval {fit.slope_ci} misses the true slope {b}"
    # every point's interval holds its true T_forget
    for (l_t, h_t), yi in zip(fit.intervals, y):
        assert l_t < 2.0 ** yi <= h_t


def test_every_point_right_censored_gives_an_unbounded_slope():
    fit = sc.fit_power_law([1e3, 1e4, 1e5] * 2, [None] * 6, grid=[8, 16, 32])
    assert fit.n_right_censored == 6 and fit.n_censored == 6
    assert fit.slope_ci[1] == math.inf and fit.slope_ci[0] == -math.inf and not fit.slope_bounded


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=2, max_size=8, unique=True), st.floats(0.5, 2.0e6))
def test_grid_interval_holds_the_value_it_censors(exponents, t):
    """Seeing T_forget = t on any grid (first grid point >= t, or never) gives an interval holding t."""
    grid = sorted(2.0 ** e for e in exponents)
    first = next((g for g in grid if g >= t), None)
    lo, hi = sc.grid_interval(first, grid)
    assert lo < t <= hi


def test_scaling_errors_and_paper_line():
    with pytest.raises(ValueError, match="not a point of the grid"):
        sc.grid_interval(12.0, [8, 16])
    with pytest.raises(ValueError, match="2 distinct state sizes"):
        sc.fit_power_law([1e3, 1e3], [8, 16], [8, 16])
    assert sc.paper_prediction(69_444) == pytest.approx(359.2, abs=0.1)  # proportional part, tokens
    assert sc.paper_prediction(2e6, with_intercept=True) == pytest.approx(5875.0)
    with pytest.raises(ValueError, match="with_intercept=False"):
        sc.paper_prediction(69_444, with_intercept=True)
