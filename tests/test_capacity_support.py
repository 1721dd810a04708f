"""Tests of the capacity experiments' support code: censored regression, MQAR recall, convergence check.

- experiments/scaling.py: the interval-censored fit recovers a known exponent from synthetic grid
  measurements, and cannot bound it (infinite interval) when every point is right-censored.
- experiments/recall.py: the MQAR batch's structure; oracles with known capacity give known sweeps.
- experiments/convergence.py: an unconverged or never-learned curve is refused, a converged one accepted.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import convergence as cv
from experiments import recall as rc
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


# ------------------------------------------------------------------------------------------------
# recall.py: MQAR
# ------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 24), extra=st.integers(0, 40), seed=st.integers(0, 2**16), step=st.integers(0, 10**6))
def test_mqar_batch_structure(k, extra, seed, step):
    cfg = rc.MQARConfig(n_pairs=k, seq_len=4 * k - 1 + extra)
    tokens, mask = rc.mqar_batch(step, seed=seed, batch_size=3, cfg=cfg)
    assert tokens.shape == (3, cfg.seq_len + 1) and mask.shape == (3, cfg.seq_len)
    again, _ = rc.mqar_batch(step, seed=seed, batch_size=3, cfg=cfg)
    assert torch.equal(tokens, again), "a batch must be a pure function of (seed, step)"
    in_range = lambda x, r: bool(((x >= r[0]) & (x < r[1])).all())  # noqa: E731
    qs = cfg.query_start
    for row, m in zip(tokens, mask):
        keys, values = row[0:2 * k:2], row[1:2 * k:2]
        assert in_range(keys, rc.KEY_BYTES) and in_range(values, rc.VALUE_BYTES)
        assert len(set(keys.tolist())) == k, "keys must be distinct"
        assert in_range(row[2 * k:qs], rc.FILLER_BYTES) and qs - 2 * k == cfg.n_filler
        table = dict(zip(keys.tolist(), values.tolist()))
        q_keys, answers = row[qs::2], row[qs + 1::2]
        assert sorted(q_keys.tolist()) == sorted(table), "the queries are the k keys"
        assert answers.tolist() == [table[q] for q in q_keys.tolist()], "each query is followed by its value"
        # the mask: exactly the k targets that are answers (target t predicts row[t + 1])
        assert m.sum() == k and torch.equal(row[1:][m], answers)


def test_mqar_rows_slice_and_config_errors():
    cfg = rc.MQARConfig(n_pairs=4, seq_len=32)
    full, full_mask = rc.mqar_batch(5, seed=1, batch_size=6, cfg=cfg)
    part, part_mask = rc.mqar_batch(5, seed=1, batch_size=6, cfg=cfg, rows=slice(2, 4))
    assert torch.equal(full[2:4], part) and torch.equal(full_mask[2:4], part_mask)
    assert not torch.equal(full, rc.mqar_batch(6, seed=1, batch_size=6, cfg=cfg)[0])
    with pytest.raises(ValueError, match="use seq_len >= 31"):
        rc.MQARConfig(n_pairs=8, seq_len=16)
    with pytest.raises(ValueError, match="n_pairs"):
        rc.MQARConfig(n_pairs=rc.MAX_PAIRS + 1, seq_len=4096)


class RecallOracle(nn.Module):
    """Causal oracle: at a key seen before, put all mass on the byte that followed its first sighting.

    With `capacity` C it keeps only the last C keys it has stored (first sightings, FIFO), as a bounded
    state would, so it recalls every k <= C and a share C / k of the queries beyond. Its vocabulary is
    padded past the 256 bytes (as Mamba2LM's is) to check the readout cuts it.
    """

    def __init__(self, capacity: float = math.inf, vocab: int = rc.VOCAB_SIZE + 4):
        super().__init__()
        self.capacity, self.vocab = capacity, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, T = ids.shape
        logits = torch.zeros(b, T, self.vocab)  # (b, T, V')
        for r in range(b):
            row = ids[r].tolist()
            first: dict[int, int] = {}  # key byte -> position of its first sighting
            order: list[int] = []  # keys in the order they were stored
            for t, tok in enumerate(row):
                if not rc.KEY_BYTES[0] <= tok < rc.KEY_BYTES[1]:
                    continue
                if tok not in first:
                    first[tok] = t
                    order.append(tok)
                elif first[tok] + 1 < t and len(order) - order.index(tok) <= self.capacity:
                    logits[r, t, row[first[tok] + 1]] = 1.0
        return logits


class Uniform(nn.Module):
    """A model with no memory: equal logits everywhere (argmax = byte 0, never a value)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, rc.VOCAB_SIZE)


KS = [1, 2, 4, 8, 16, 32, 64]


def test_k_sweep_with_oracles():
    perfect = rc.accuracy_by_k(RecallOracle(), KS, seq_len=260, n_rows=8)
    assert perfect == {k: 1.0 for k in KS}
    assert rc.largest_k_recalled(perfect) == 64
    none = rc.accuracy_by_k(Uniform(), KS, seq_len=260, n_rows=8)
    assert none == {k: 0.0 for k in KS} and rc.largest_k_recalled(none) == 0
    bounded = rc.accuracy_by_k(RecallOracle(capacity=8), KS, seq_len=260, n_rows=8)
    assert all(bounded[k] == 1.0 for k in KS if k <= 8)
    assert all(bounded[k] == pytest.approx(8 / k) for k in KS if k > 8), bounded
    assert rc.largest_k_recalled(bounded) == 8


def test_largest_k_recalled_rules():
    assert rc.largest_k_recalled({1: 1.0, 2: 0.99, 4: 0.96, 8: 0.5, 16: 0.97}) == 4  # stops at the first miss
    assert rc.largest_k_recalled({4: 0.9, 8: 1.0}) == 0
    assert rc.largest_k_recalled({1: 0.9, 2: 0.8}, threshold=0.85) == 1
    with pytest.raises(ValueError, match="empty"):
        rc.largest_k_recalled({})


def test_mqar_loss_counts_only_values():
    cfg = rc.MQARConfig(n_pairs=4, seq_len=40)
    tokens, mask = rc.mqar_batch(0, seed=0, batch_size=2, cfg=cfg)
    logits = torch.zeros(2, 40, rc.VOCAB_SIZE)
    logits[..., 0] = 100.0  # confidently wrong everywhere...
    logits[mask] = 0.0
    logits[mask, tokens[:, 1:][mask]] = 100.0  # ...except on the values
    assert rc.mqar_loss(logits, tokens[:, 1:], mask).item() < 1e-6


# ------------------------------------------------------------------------------------------------
# convergence.py
# ------------------------------------------------------------------------------------------------

def curve(final: float, rate: float, steps: int = 400, start: float = 5.5) -> list[float]:
    """Exponential approach to `final` (nats) at `rate` per entry, with a little deterministic noise."""
    noise = 0.01 * np.sin(np.arange(steps) * 1.7)
    return (final + (start - final) * np.exp(-rate * np.arange(steps)) + noise).tolist()


def test_convergence_check_refuses_an_unconverged_run():
    refused = r"run tf-seed1 has not converged.*relative fall of 0\.\d+ > rel_tol 0\.01"
    with pytest.raises(cv.NotConverged, match=refused):
        cv.check_converged(curve(1.1, rate=0.002), run="tf-seed1")


def test_convergence_check_refuses_a_plateau_above_the_ceiling():
    with pytest.raises(cv.NotConverged, match=r"run tf-seed2 plateaued above the loss ceiling: .*2\.6\d+ > 1\.5"):
        cv.check_converged(curve(2.65, rate=0.05), run="tf-seed2")


def test_convergence_check_accepts_a_converged_run():
    report = cv.check_converged(curve(1.1, rate=0.05), run="tf-seed0")
    assert report.last_mean == pytest.approx(1.1, abs=0.01) and abs(report.rel_drop) <= cv.REL_TOL


def test_convergence_check_input_errors():
    with pytest.raises(ValueError, match="needs at least 2 windows of 50"):
        cv.check_converged([1.0] * 60, run="short")
    with pytest.raises(ValueError, match="diverged"):
        cv.check_converged([1.0] * 99 + [float("nan")], run="nan")
    with pytest.raises(ValueError, match="window"):
        cv.ConvergenceConfig(window=0)
