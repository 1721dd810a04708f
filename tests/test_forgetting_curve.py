"""Tests of forgetting_curve.py: oracle models with known memory, layouts, rules, JSON, chunking.

Oracles are causal functions that know the layout: at a position t inside the second x they find the
latest separator s (= L + 1, the copy distance) and may copy the token at t - s + 1. Their memory is
set by how far back they are allowed (or partly allowed) to copy, so the expected memory lengths are
known exactly.
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import forgetting_curve as fc

V = 64          # vocabulary of the oracle tests
BOS = 0         # the default separator with random tokens (smallest free id)


def amnesic_guess(ids: torch.Tensor, V: int) -> torch.Tensor:
    """A 'language model' with no memory: the next token is a fixed function of the current one."""
    return (ids * 5 + 1) % V


def copier_predictions(ids, *, K=math.inf, K2=math.inf, p=1.0, bos=BOS, V=V):
    """(b, l) predictions: copy when the copy distance d <= K, copy with probability p (a hash of the
    source token and position) when K < d <= K2, else the amnesic guess."""
    b, l = ids.shape
    t = torch.arange(l).expand(b, l)
    is_sep = ids == bos
    is_sep[:, 0] = False                                              # the first BOS is not a separator
    s = torch.cummax(torch.where(is_sep, t, torch.zeros_like(t)), dim=1).values   # latest separator
    src = (t - s + 1).clamp(max=l - 1)
    copied = torch.gather(ids, 1, src)
    keep = ((copied * 1_000_003 + t * 7919) % 1000) < p * 1000
    use = (s > 0) & ((s <= K) | ((s <= K2) & keep))
    return torch.where(use, copied, amnesic_guess(ids, V))


def one_hot_logits(pred, V=V):
    return torch.nn.functional.one_hot(pred, V).float()             # (b, l, V)


class Copier:
    """Stateless oracle: model(ids) -> logits."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, ids):
        return one_hot_logits(copier_predictions(ids, **self.kw), self.kw.get("V", V))


class StatefulCopier:
    """The same oracle streamed in chunks: the state is the history of tokens (so a chunking bug that
    drops or misplaces the state changes the answers). Records the longest chunk it was given."""

    def __init__(self, **kw):
        self.kw, self.max_chunk, self.calls = kw, 0, 0

    def __call__(self, ids, state=None):
        self.max_chunk, self.calls = max(self.max_chunk, ids.shape[1]), self.calls + 1
        history = ids if state is None else torch.cat([state, ids], dim=1)
        logits = one_hot_logits(copier_predictions(history, **self.kw), self.kw.get("V", V))
        return logits[:, -ids.shape[1]:], history


def run(model, lengths, **kw):
    kw.setdefault("vocab_size", V)
    kw.setdefault("n_samples", 10)
    return fc.forgetting_curve(model, lengths=lengths, **kw)


LENGTHS = [4, 8, 16, 32, 64, 128, 256]


# ---------------------------------------------------------------------------------------------
# Oracles with known memory
# ---------------------------------------------------------------------------------------------

def test_oracle_known_memory_lengths():
    # exact copy up to distance 40 (L + 1 <= 40: L <= 39 -> 32 on this grid), half-copy up to 150
    # (L <= 149 -> 128), nothing beyond
    curve = run(Copier(K=40, K2=150, p=0.5), LENGTHS)
    print(curve.table())
    assert curve.fine_grained_length() == 32
    assert curve.coarse_grained_length() == 128
    assert np.all(curve.copy_acc[:4] == 1.0)
    partial = curve.copy_mean[4:6]
    assert np.all((partial > 0.3) & (partial < 0.75)), partial
    np.testing.assert_array_equal(curve.copy_acc[6], curve.lm_acc[6])      # amnesia at 256


@pytest.mark.parametrize("K, expected", [(3, 0), (10, 8), (40, 32), (150, 128), (1000, 256)])
def test_oracle_with_window_K_reads_Ks_grid_point(K, expected):
    # copies exactly when the copy distance L + 1 <= K: perfect up to L = K - 1, amnesic beyond,
    # so both memory lengths are the largest grid point <= K - 1 (0 when even L = 4 is too far)
    curve = run(Copier(K=K, K2=K), LENGTHS)
    assert curve.fine_grained_length() == expected
    assert curve.coarse_grained_length() == expected
    assert curve.coarse_grained_length(significance="t-test") == expected
    far = curve.lengths > K - 1
    assert set(curve.fine_verdicts()[far]) <= {"fail"} and set(curve.coarse_verdicts()[far]) <= {"fail"}


def test_perfect_copier_scores_one_everywhere():
    curve = run(Copier(), LENGTHS + [700])
    assert np.all(curve.copy_acc == 1.0), curve.copy_acc.min()
    assert curve.fine_grained_length() == 700
    assert curve.coarse_grained_length() == 700
    assert curve.lm_mean.max() < 0.1                 # LM condition: u_j == x_j only by chance


def test_amnesic_model_copy_equals_lm_and_no_memory():
    curve = run(lambda ids: one_hot_logits(amnesic_guess(ids, V)), LENGTHS)
    np.testing.assert_array_equal(curve.copy_acc, curve.lm_acc)
    assert curve.fine_grained_length() == 0
    assert curve.coarse_grained_length() == 0
    assert curve.coarse_grained_length(significance="t-test") == 0
    assert np.all(curve.p_values() == 1.0) and np.all(curve.p_values("t-test") == 1.0)
    assert set(curve.coarse_verdicts()) == {"fail"}               # copy == LM: significantly no gap


def test_return_conventions_tuple_and_logits_attribute():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    base = run(Copier(K=40), [8, 64])
    as_tuple = run(lambda ids: (Copier(K=40)(ids), "anything"), [8, 64])
    as_obj = run(lambda ids: Out(Copier(K=40)(ids)), [8, 64])
    np.testing.assert_array_equal(base.copy_acc, as_tuple.copy_acc)
    np.testing.assert_array_equal(base.copy_acc, as_obj.copy_acc)
    with pytest.raises(ValueError, match=r"logits of shape"):
        run(lambda ids: ids.float(), [8])


# ---------------------------------------------------------------------------------------------
# Layouts and scored positions
# ---------------------------------------------------------------------------------------------

class PositionCheat:
    """A non-causal cheat: exact next token at logit positions in `good`, a wrong one elsewhere."""

    def __init__(self, good):
        self.good = good                                            # function (L, l) -> bool mask (l,)

    def __call__(self, ids):
        l = ids.shape[1]
        L = (l - 3) // 2
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)            # token at t + 1
        pred = torch.where(self.good(L, l), nxt, (nxt + 1) % V)
        return one_hot_logits(pred)


@pytest.mark.parametrize("L", [1, 2, 3, 7, 10, 33])
def test_scored_positions_are_last_half_of_second_copy(L):
    h = math.ceil(L / 2)
    t = torch.arange(2 * L + 3)
    # the logit predicting token i sits at i - 1: the last ceil(L/2) tokens of the second x are at
    # positions 2L+2-h .. 2L+1, predicted at 2L+1-h .. 2L
    scored = (t >= 2 * L + 1 - h) & (t <= 2 * L)
    only_scored = run(PositionCheat(lambda L_, l: scored), [L])
    all_but_scored = run(PositionCheat(lambda L_, l: ~scored), [L])
    all_but_last = run(PositionCheat(lambda L_, l: scored & (t != 2 * L)), [L])
    for curve in (only_scored, all_but_scored, all_but_last):
        np.testing.assert_array_equal(curve.copy_acc, curve.lm_acc)  # both conditions alike
    assert np.all(only_scored.copy_acc == 1.0)
    assert np.all(all_but_scored.copy_acc == 0.0)
    np.testing.assert_allclose(all_but_last.copy_acc, 1 - 1 / h)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 300), n=st.integers(1, 4), seed=st.integers(0, 2 ** 31))
def test_layouts_random_tokens(L, n, seed):
    lay = fc.make_layouts(L, n, np.random.default_rng(seed), bos_id=3, eos_id=5, vocab_size=V)
    ids = lay.ids
    assert ids.shape == (2 * n, 2 * L + 3)
    assert torch.all(ids[:, 0] == 3) and torch.all(ids[:, L + 1] == 3) and torch.all(ids[:, -1] == 5)
    body = torch.cat([ids[:, 1:L + 1], ids[:, L + 2:2 * L + 2]], dim=1)
    assert not torch.isin(body, torch.tensor([3, 5])).any()          # specials never drawn
    x = ids[:n, L + 2:2 * L + 2]
    assert torch.equal(ids[:n, 1:L + 1], x)                          # copy: [BOS] x [BOS] x [EOS]
    assert torch.equal(ids[n:, L + 2:2 * L + 2], x)                  # LM: same x after u (paired)
    h = math.ceil(L / 2)
    assert torch.equal(lay.targets, ids[:, 2 * L + 2 - h:2 * L + 2])
    assert lay.first == fc.scored_slice(L)[0] == 2 * L + 1 - h
    lay2 = fc.make_layouts(L, n, np.random.default_rng(seed), bos_id=3, eos_id=5, vocab_size=V)
    assert torch.equal(lay.ids, lay2.ids)                            # deterministic


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 200), seed=st.integers(0, 2 ** 31), extra=st.integers(0, 50))
def test_layouts_text_spans_are_disjoint_windows(L, seed, extra):
    N = 2 * L + extra
    stream = torch.arange(1, N + 1)                                  # every position distinct
    n = 4
    lay = fc.make_layouts(L, n, np.random.default_rng(seed), bos_id=0, eos_id=0, tokens=stream)
    for i in range(n):
        xs, us = int(lay.x_start[i]), int(lay.u_start[i])
        assert xs + L <= us or us + L <= xs                          # disjoint windows
        assert torch.equal(lay.ids[i, 1:L + 1], stream[xs:xs + L])
        assert torch.equal(lay.ids[n + i, 1:L + 1], stream[us:us + L])


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=4, unique=True).map(sorted),
       seed=st.integers(0, 10 ** 6))
def test_hypothesis_perfect_copier_and_determinism(lengths, seed):
    a = run(Copier(), lengths, seed=seed, n_samples=3)
    b = run(Copier(), lengths, seed=seed, n_samples=3)
    assert np.all(a.copy_acc == 1.0)
    np.testing.assert_array_equal(a.lm_acc, b.lm_acc)
    h = np.ceil(np.array(lengths) / 2)[:, None]
    assert np.allclose(a.lm_acc * h, np.round(a.lm_acc * h))         # multiples of 1/ceil(L/2)


def test_seed_determinism_and_independence_of_the_grid():
    model = Copier(K=20, K2=60, p=0.5)
    a = run(model, [8, 32, 64], seed=7)
    b = run(model, [8, 32, 64], seed=7)
    c = run(model, [32], seed=7)                                     # same length, other grid
    d = run(model, [8, 32, 64], seed=8)
    np.testing.assert_array_equal(a.copy_acc, b.copy_acc)
    np.testing.assert_array_equal(a.lm_acc, b.lm_acc)
    np.testing.assert_array_equal(a.copy_acc[1], c.copy_acc[0])
    assert not np.array_equal(a.copy_acc, d.copy_acc)


def test_natural_text_default_bos_is_smallest_absent_id():
    rng = np.random.default_rng(0)
    stream = torch.from_numpy(rng.integers(2, V, 5000))              # ids 0 and 1 never occur
    curve = run(Copier(bos=0), [16, 100], tokens=stream)
    assert curve.meta["bos_id"] == 0 and curve.meta["eos_id"] == 0
    assert np.all(curve.copy_acc == 1.0)
    with pytest.raises(ValueError, match="no id is free"):
        run(Copier(), [4], tokens=torch.arange(V), vocab_size=V)
    with pytest.raises(ValueError, match="needs 2L"):
        run(Copier(), [4000], tokens=stream)


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------

def make_curve(copy_means, lm_means, n=10, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    k = len(copy_means)
    lm = np.clip(np.array(lm_means)[:, None] + noise * rng.standard_normal((k, n)), 0, 1)
    copy = np.clip(np.array(copy_means)[:, None] + noise * rng.standard_normal((k, n)), 0, 1)
    return fc.ForgettingCurve(lengths=2 ** np.arange(3, 3 + k), copy_acc=copy, lm_acc=lm)


def test_memory_length_ends_at_the_first_failure():
    # copy acc: 1, 1, 0.5, 1 (a lone recovery after a failure is not memory)
    curve = fc.ForgettingCurve(lengths=[8, 16, 32, 64], copy_acc=np.repeat([[1.0], [1.0], [0.5], [1.0]], 4, 1),
                               lm_acc=np.zeros((4, 4)))
    assert curve.fine_grained_length() == 16
    assert curve.fine_mask().tolist() == [True, True, False, True]
    assert curve.fine_verdicts().tolist() == ["pass", "pass", "fail", "pass"]
    # a first length that FAILS (2 of 4 tokens in every sample) reads 0, whatever follows
    first_fails = fc.ForgettingCurve(lengths=[8, 16], copy_acc=[[0.5] * 3, [1.0] * 3],
                                     lm_acc=np.zeros((2, 3)))
    assert first_fails.fine_verdicts().tolist() == ["fail", "pass"]
    assert first_fails.fine_grained_length() == 0
    # inconclusive lengths neither end the run nor extend it
    assert fc.memory_length(["inconclusive", "pass", "inconclusive", "pass", "inconclusive", "fail", "pass"],
                            [2, 4, 8, 16, 32, 64, 128]) == 16
    assert fc.memory_length(["inconclusive"] * 3, [2, 4, 8]) == 0
    assert fc.memory_length(["fail", "pass"], [2, 4]) == 0
    with pytest.raises(ValueError, match="one verdict per length"):  # zip() silently read the shorter
        fc.memory_length(["pass"], [2, 4])


def test_coarse_rule_needs_effect_size_and_significance():
    # a small but consistent gap (2 points, significant) beyond 32 is NOT coarse memory
    curve = make_curve([1.0, 0.6, 0.3, 0.07, 0.07], [0.05, 0.05, 0.05, 0.05, 0.05], noise=0.002)
    assert curve.p_values()[3] < 0.01                                # significant ...
    assert curve.coarse_grained_length() == 32                       # ... but below min_effect
    assert curve.coarse_grained_length(min_effect=0.01) == 128
    # a large but inconsistent gap is not significant: diffs +0.5 x 5, -0.4 x 5 (mean 0.05)
    d = np.array([0.5] * 5 + [-0.4] * 5)
    noisy = fc.ForgettingCurve(lengths=[8], copy_acc=[0.5 + d / 2], lm_acc=[0.5 - d / 2])
    assert noisy.p_values()[0] > 0.3 and noisy.coarse_grained_length(min_effect=0.0) == 0
    with pytest.raises(ValueError, match="smallest attainable p-value"):
        fc.ForgettingCurve(lengths=[8], copy_acc=[[1, 1, 1]], lm_acc=[[0, 0, 0]]).coarse_grained_length()


# Official linear grid (draw.py: np.linspace(8, 16000, 32, dtype=int)), first 19 points: 8, 523, ...
LLAMA_LIKE_LENGTHS = np.linspace(8, 16000, 32, dtype=int)[:19]


def llama_like_curve():
    """A hand-made curve with the shape of the official Llama-3-8B release (not its numbers): L = 8
    scores 4 tokens per sample and two of ten samples got 3 of 4 (mean 0.95); L = 523 .. 4134 copy
    >= 0.99 with a few scattered misses; then copy collapses towards the LM curve."""
    k, n = len(LLAMA_LIKE_LENGTHS), 10
    m = (LLAMA_LIKE_LENGTHS + 1) // 2
    spread = np.linspace(-0.02, 0.02, n)                             # a deterministic per-sample spread
    copy_mean = np.array([0.95] + [1.0] * 8 + [0.85, 0.50, 0.23, 0.09, 0.08, 0.07, 0.08, 0.07, 0.07, 0.07])
    lm_mean = np.array([0.20] + [0.50] * 8 + [0.44, 0.28, 0.13, 0.065, 0.055, 0.05, 0.05, 0.05, 0.05, 0.05])
    copy = np.clip(copy_mean[:, None] + spread, 0, 1)
    copy[0] = [1, 0.75, 1, 1, 1, 1, 1, 1, 1, 0.75]
    for i in range(1, 9):                                            # the plateau: 0-2 misses a sample
        copy[i] = 1 - (np.arange(n) % 3) / m[i]
    lm = np.clip(lm_mean[:, None] - spread[::-1], 0, 1)
    return fc.ForgettingCurve(lengths=LLAMA_LIKE_LENGTHS, copy_acc=copy, lm_acc=lm)


def test_fine_rule_reads_the_plateau_end_after_a_noisy_first_point():
    curve = llama_like_curve()
    print(curve.table())
    assert curve.copy_mean[0] == pytest.approx(0.95) and curve.copy_mean[0] < 0.99   # the old rule: 0
    verdicts = curve.fine_verdicts().tolist()
    assert verdicts[0] == "inconclusive"            # 38 of 40 tokens: P[X <= 38 | 40, 0.99] = 0.061
    assert verdicts[1:9] == ["pass"] * 8 and verdicts[9:] == ["fail"] * 10
    assert curve.fine_grained_length() == 4134                      # the plateau's end
    assert curve.fine_grained_length(alpha=0.1) == 0                # at alpha 0.1 the first point fails
    # the coarse rule: copy - LM >= 0.05 up to 5682, 0.025 at 6198 (significantly below 0.05)
    for significance in ("sign-flip", "t-test"):
        assert curve.coarse_grained_length(significance=significance) == 5682
        assert curve.coarse_verdicts(significance=significance)[12] == "fail"


def test_fine_rule_on_one_token_samples():
    # L = 2 scores one token per sample: one miss in ten is inconclusive (P = 1 - 0.99^10 = 0.096),
    # two misses fail (P = 1 - 0.99^10 - 10 * 0.01 * 0.99^9 = 0.0043)
    one = fc.ForgettingCurve(lengths=[2, 4], copy_acc=[[0.0] + [1.0] * 9, [1.0] * 10], lm_acc=np.zeros((2, 10)))
    assert one.fine_verdicts().tolist() == ["inconclusive", "pass"] and one.fine_grained_length() == 4
    assert one.fine_pvalues()[0] == pytest.approx(1 - 0.99 ** 10, rel=1e-12)
    two = fc.ForgettingCurve(lengths=[2, 4], copy_acc=[[0.0] * 2 + [1.0] * 8, [1.0] * 10], lm_acc=np.zeros((2, 10)))
    assert two.fine_pvalues()[0] == pytest.approx(1 - 0.99 ** 10 - 10 * 0.01 * 0.99 ** 9, rel=1e-12)
    assert two.fine_verdicts().tolist() == ["fail", "pass"] and two.fine_grained_length() == 0
    assert one.dispersion()[0] == 1.0                                # m = 1: nothing to cluster


def test_fine_rule_on_curves_that_drop():
    # a gradual drop: 1.0, 0.999, 0.995, then 0.98 on 512 scored tokens per sample (fails), 1.0 again
    lengths = [128, 256, 512, 1024, 2048]
    copy = np.array([[1.0] * 10, [0.999] * 10, [0.995] * 10, [0.98] * 10, [1.0] * 10])
    curve = fc.ForgettingCurve(lengths=lengths, copy_acc=copy, lm_acc=np.zeros((5, 10)))
    assert curve.fine_verdicts().tolist() == ["pass", "pass", "pass", "fail", "pass"]
    assert curve.fine_grained_length() == 512
    # just below the threshold on few tokens is inconclusive and does not end the run
    copy[1] = 1 - 1 / 128                                           # 1 miss per sample of 128 tokens: 0.992
    copy[2] = 0.985                                                 # 0.985 on 2560 tokens: fails
    curve = fc.ForgettingCurve(lengths=lengths, copy_acc=copy, lm_acc=np.zeros((5, 10)))
    assert curve.fine_verdicts().tolist()[:3] == ["pass", "pass", "fail"]
    assert curve.fine_grained_length() == 256


def test_dispersion_discounts_samples_that_miss_together():
    # 480 of 500 tokens right (0.96) at L = 100 (m = 50), spread evenly: a clear failure ...
    even = fc.ForgettingCurve(lengths=[100], copy_acc=[[0.96] * 10], lm_acc=np.zeros((1, 10)))
    assert even.dispersion()[0] == 1.0 and even.fine_verdicts()[0] == "fail"
    # ... but the same 20 misses all in one sample (nine perfect, one at 30 / 50): the samples disagree
    # far beyond binomial noise, X^2 = (9 * 2^2 + 18^2) / (50 * 0.96 * 0.04) = 187.5, phi = X^2 / 9,
    # and 500 / phi = 24 effective tokens cannot tell 0.96 from 0.99
    lumped = fc.ForgettingCurve(lengths=[100], copy_acc=[[1.0] * 9 + [0.6]], lm_acc=np.zeros((1, 10)))
    assert lumped.dispersion()[0] == pytest.approx(187.5 / 9, rel=1e-12)
    assert lumped.fine_verdicts()[0] == "inconclusive"
    p, phi = fc.binomial_below_pvalue(np.array([50] * 9 + [30]), 50, 0.99)
    assert p == pytest.approx(fc.binomial_cdf(480 / phi, 500 / phi, 0.99)) and p > 0.05


def test_coarse_verdicts_pass_inconclusive_fail():
    n = 10
    d = np.linspace(-0.02, 0.02, n)
    lm = np.full((4, n), 0.3)
    copy = np.stack([0.3 + 0.2 + d,                                  # a 0.2 gap: pass
                     0.3 + 0.02 + d,                                 # a 0.02 gap, consistently: fail
                     0.3 + np.where(np.arange(n) % 2, 0.4, -0.3),    # mean gap 0.05, inconsistent
                     0.3 + d])                                       # no gap: fail
    curve = fc.ForgettingCurve(lengths=[8, 16, 32, 64], copy_acc=copy, lm_acc=lm)
    assert curve.coarse_verdicts().tolist() == ["pass", "fail", "inconclusive", "fail"]
    assert curve.coarse_verdicts(significance="t-test").tolist() == ["pass", "fail", "inconclusive", "fail"]
    assert curve.coarse_grained_length() == 8
    assert curve.coarse_mask().tolist() == [True, False, False, False]


def test_sign_flip_and_t_test_verdicts_differ_at_n6():
    # all six differences positive, one large: sign flip p = 1/64 (only the observed pattern is as
    # extreme), the t-test sees a large spread (t = 0.2 / (0.343 / sqrt 6) = 1.43, p = 0.21)
    lm = np.zeros((2, 6))
    skewed = np.array([0.06] * 5 + [0.9])
    # four gains of 0.8 and two losses of 0.1: sign flip p = 4/64 (flipping either loss is at least
    # as extreme), the t-test p = 0.041
    mixed = np.array([0.8] * 4 + [-0.1] * 2) + 0.1
    curve = fc.ForgettingCurve(lengths=[8, 16], copy_acc=[skewed, mixed], lm_acc=[lm[0], lm[1] + 0.1])
    assert curve.p_values()[0] == pytest.approx(1 / 64) and curve.p_values("t-test")[0] > 0.2
    assert curve.p_values()[1] == pytest.approx(4 / 64) and curve.p_values("t-test")[1] < 0.05
    assert curve.coarse_verdicts().tolist()[0] == "pass"
    assert curve.coarse_verdicts(significance="t-test").tolist()[0] == "inconclusive"
    assert curve.coarse_verdicts().tolist()[1] == "inconclusive"
    assert curve.coarse_verdicts(significance="t-test").tolist()[1] == "pass"


def test_summary_exposes_verdicts_for_sweep_scripts():
    curve = llama_like_curve()
    s = curve.summary()
    assert s["fine_grained_length"] == 4134 and s["coarse_grained_length"] == 5682
    assert s["lengths"] == LLAMA_LIKE_LENGTHS.tolist() and s["significance"] == "sign-flip"
    assert s["fine_verdicts"][:2] == ["inconclusive", "pass"] and len(s["coarse_verdicts"]) == 19
    assert curve.summary(significance="t-test")["significance"] == "t-test"
    few = fc.ForgettingCurve(lengths=[8], copy_acc=[[1, 1, 1]], lm_acc=[[0, 0, 0]])
    assert few.summary()["coarse_grained_length"] is None           # sign flips cannot reach 0.05
    assert few.summary(significance="t-test")["coarse_grained_length"] == 8
    with pytest.raises(ValueError, match="significance must be"):
        few.summary(significance="wilcoxon")


# ---------------------------------------------------------------------------------------------
# The statistics behind the rules (forgetting_curve.py's marked section), against closed forms and
# hand-computed values (no scipy)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x", [0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_incomplete_beta_closed_forms(x):
    I = fc.regularized_incomplete_beta
    assert I(3.0, 1.0, x) == pytest.approx(x ** 3, rel=1e-12, abs=1e-300)         # I_x(a, 1) = x^a
    assert I(1.0, 4.0, x) == pytest.approx(-math.expm1(4 * math.log1p(-x)) if x < 1 else 1.0, rel=1e-12)
    assert I(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-10, abs=1e-300)
    assert I(2.5, 7.0, x) + I(7.0, 2.5, 1 - x) == pytest.approx(1.0, rel=1e-12)   # symmetry


def test_binomial_cdf_against_exact_sums():
    def exact(k, M, p):                                              # sum of the pmf, in logs
        return sum(math.exp(math.lgamma(M + 1) - math.lgamma(j + 1) - math.lgamma(M - j + 1)
                            + j * math.log(p) + (M - j) * math.log1p(-p)) for j in range(k + 1))

    assert fc.binomial_cdf(38, 40, 0.99) == pytest.approx(1 - 0.99 ** 40 - 40 * 0.01 * 0.99 ** 39, rel=1e-12)
    for M, p, ks in [(10, 0.99, [0, 5, 8, 9]), (200, 0.95, [150, 185, 190, 199]),
                     (20670, 0.99, [20400, 20440, 20462, 20500])]:
        for k in ks:
            assert fc.binomial_cdf(k, M, p) == pytest.approx(exact(k, M, p), rel=1e-9), (k, M, p)
    assert fc.binomial_cdf(-1, 10, 0.5) == 0.0 and fc.binomial_cdf(10, 10, 0.5) == 1.0
    with pytest.raises(ValueError, match="a, b > 0"):
        fc.regularized_incomplete_beta(0.0, 1.0, 0.5)


def test_sign_flip_pvalue():
    assert fc.paired_sign_flip_pvalue(np.ones(10)) == pytest.approx(2 ** -10)
    assert fc.paired_sign_flip_pvalue(np.zeros(10)) == 1.0
    assert fc.paired_sign_flip_pvalue(-np.ones(10)) == 1.0
    # exact value for a small case: d = (3, 1, -1): sign patterns with mean >= 1: (+,+,-),(+,+,+),
    # (+,-,+) -> means 1, 5/3, 1 and (+,-,-) mean 1/3 -> 3 of 8
    assert fc.paired_sign_flip_pvalue(np.array([3.0, 1.0, -1.0])) == pytest.approx(3 / 8)
    # Monte Carlo branch (n > 16): all-positive diffs -> about 1 / (1 + R)
    p = fc.paired_sign_flip_pvalue(np.ones(30), n_resamples=999)
    assert p == pytest.approx(1 / 1000)
    d = np.random.default_rng(1).standard_normal(30) + 0.1
    assert 0 < fc.paired_sign_flip_pvalue(d) < 1


def test_paired_t_test_against_hand_computed_values():
    # d = (1, 2, 3): mean 2, sd 1, t = 2 sqrt(3), df = 2, where P[|T| >= t] = 1 - t / sqrt(2 + t^2)
    assert fc.paired_t_test_pvalue([1.0, 2.0, 3.0]) == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)
    assert fc.paired_t_test_pvalue([-1.0, -2.0, -3.0]) == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)
    # d = (1, 2): mean 1.5, sd sqrt(1/2), t = 3, df = 1 (Cauchy): P[|T| >= 3] = 1 - 2 atan(3) / pi
    assert fc.paired_t_test_pvalue([1.0, 2.0]) == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-12)
    assert fc.student_t_sf2(0.0, 7) == pytest.approx(1.0) and fc.student_t_sf2(math.inf, 7) == 0.0
    # zero spread: scipy gives NaN for all-zero differences (the official code maps it to 1.0) and
    # p = 0 for a constant non-zero difference
    assert fc.paired_t_test_pvalue(np.zeros(6)) == 1.0
    assert fc.paired_t_test_pvalue(np.full(6, 0.1)) == 0.0
    with pytest.raises(ValueError, match="n >= 2"):
        fc.paired_t_test_pvalue([1.0])
    for significance in fc.SIGNIFICANCE_TESTS:  # NaN compares False: the sign-flip test read p = 0
        with pytest.raises(ValueError, match="must be finite"):
            fc.paired_pvalue(np.array([0.5, math.nan, 0.5, 0.5, 0.5, 0.5]), significance)
    with pytest.raises(ValueError, match="significance must be"):
        fc.paired_pvalue(np.ones(3), "wilcoxon")


# ---------------------------------------------------------------------------------------------
# Chunked evaluation of stateful models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_stateful_equals_unchunked(chunk):
    lengths = [3, 16, 50, 100] if chunk > 1 else [3, 16, 50]   # the oracle is quadratic in chunks
    ref = run(Copier(K=40, K2=90, p=0.5), lengths, chunk_size=None)
    model = StatefulCopier(K=40, K2=90, p=0.5)
    got = run(model, lengths, chunk_size=chunk, batch_size=5)
    np.testing.assert_array_equal(ref.copy_acc, got.copy_acc)
    np.testing.assert_array_equal(ref.lm_acc, got.lm_acc)
    assert model.max_chunk <= chunk
    assert got.meta["chunk_size"] == chunk and ref.meta["chunk_size"] is None
    assert ref.fine_grained_length() == 16 and ref.coarse_grained_length() == 50


def test_chunk_size_auto_and_validation():
    model = StatefulCopier()
    curve = run(model, [8])
    assert curve.meta["chunk_size"] == fc.DEFAULT_CHUNK_SIZE      # auto: the model accepts state=
    assert run(Copier(), [8]).meta["chunk_size"] is None           # auto: a plain callable
    with pytest.raises(ValueError, match="accepts state"):
        run(Copier(), [8], chunk_size=16)
    with pytest.raises(ValueError, match="strictly increasing"):
        run(Copier(), [16, 8])


def test_tiny_random_mamba2lm_chunked_equals_unchunked():
    minimamba = pytest.importorskip("minimamba")
    torch.manual_seed(0)
    cfg = minimamba.Mamba2Config(d_model=32, n_layer=2, vocab_size=V, d_state=16, headdim=16,
                                 chunk_size=16)
    model = minimamba.Mamba2LM(cfg).eval()
    lengths = [5, 40, 90]
    one_pass = run(model, lengths, n_samples=4, chunk_size=None)
    chunked = run(model, lengths, n_samples=4, chunk_size=24, batch_size=3)
    diff = np.abs(one_pass.copy_acc - chunked.copy_acc).max()
    assert diff == 0.0, f"copy acc max diff {diff}"
    np.testing.assert_array_equal(one_pass.lm_acc, chunked.lm_acc)


# ---------------------------------------------------------------------------------------------
# Errors, JSON, plot
# ---------------------------------------------------------------------------------------------


class FailsBeyond:
    """The oracle, raising `exc` on sequences longer than max_len (an out-of-memory error, a bug)."""

    def __init__(self, max_len, exc):
        self.max_len, self.exc = max_len, exc

    def __call__(self, ids):
        if ids.shape[1] > self.max_len:
            raise self.exc
        return Copier(K=40)(ids)


def test_other_errors_propagate_after_saving(tmp_path):
    out = tmp_path / "curve.json"
    with pytest.raises(ValueError, match="a bug"):
        run(FailsBeyond(2 * 16 + 3, ValueError("a bug")), [8, 16, 32], out=out)
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 16]


def test_json_round_trip(tmp_path):
    curve = run(Copier(K=40, K2=150, p=0.5), LENGTHS, meta={"note": "test"})
    curve.errors[512] = "OutOfMemoryError: fake"
    path = tmp_path / "sub" / "c.json"
    curve.save(path)
    back = fc.ForgettingCurve.load(path)
    np.testing.assert_array_equal(back.lengths, curve.lengths)
    np.testing.assert_array_equal(back.copy_acc, curve.copy_acc)
    np.testing.assert_array_equal(back.lm_acc, curve.lm_acc)
    np.testing.assert_array_equal(back.seconds, curve.seconds)
    assert back.errors == curve.errors and back.meta == curve.meta
    assert back.summary() == curve.summary()
    assert not (tmp_path / "sub" / "c.json.tmp").exists()
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a forgetting-curve file"):
        fc.ForgettingCurve.load(tmp_path / "bad.json")


def test_plot_writes_png(tmp_path):
    curve = run(Copier(K=40, K2=150, p=0.5), LENGTHS)
    path = tmp_path / "c.png"
    curve.plot(path, train_length=64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_padded_vocabulary_rows_are_ignored_when_vocab_size_is_given():
    def padded(ids):                                                 # 16 extra rows that always win
        logits = Copier()(ids)
        return torch.cat([logits, torch.full((*logits.shape[:2], 16), 10.0)], dim=-1)

    assert np.all(run(padded, [8, 32]).copy_acc == 1.0)
    # without vocab_size the padded rows win the argmax: nothing is ever right
    assert np.all(run(padded, [8, 16], tokens=torch.arange(1, V), vocab_size=None).copy_acc == 0.0)


@pytest.mark.parametrize("chunk", [None, 5, 64])
def test_progress_counts_every_token_once(chunk):
    ids = torch.randint(1, V, (7, 2 * 20 + 3))
    seen = []
    model = StatefulCopier() if chunk else Copier()
    lo, hi = fc.scored_slice(20)
    fc.predict_scored(model, ids, lo, hi, chunk_size=chunk, batch_size=3, on_tokens=seen.append)
    assert sum(seen) == ids.numel() and all(n >= 0 for n in seen)
    if chunk:
        assert len(seen) > ids.shape[0] // 3 + 1                     # updates within a batch


# ---------------------------------------------------------------------------------------------
# Refusals: a sweep must not accept the wrong thing silently
# ---------------------------------------------------------------------------------------------


class NaNAt:
    """The perfect copier, with a NaN logit in one row at one position of the sequences of length L."""

    def __init__(self, L, row, position):
        self.L, self.row, self.position = L, row, position

    def __call__(self, ids):
        logits = Copier()(ids)
        if ids.shape[1] == 2 * self.L + 3 and ids.shape[0] > self.row:
            logits[self.row, self.position, 5] = math.nan
        return logits


def test_nan_logits_are_an_error_naming_length_and_sample(tmp_path):
    out = tmp_path / "c.json"
    # rows 0..9 copy condition, 10..19 LM condition (one batch of 20): row 13 = sample 3, LM
    lo, hi = fc.scored_slice(16)
    with pytest.raises(fc.NonFiniteLogitsError, match=r"L=16, sample 3 \(LM condition\), sequence position 30"):
        run(NaNAt(16, 13, 30), [8, 16, 32], out=out, batch_size=20)
    assert lo <= 30 < hi
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8]       # the length before is saved
    with pytest.raises(fc.NonFiniteLogitsError, match=r"sample 2 \(copy condition\)"):
        run(NaNAt(16, 2, lo), [16], batch_size=4)                     # row 2 of the first batch
    with pytest.raises(fc.NonFiniteLogitsError, match="inf"):        # inf too
        run(lambda ids: Copier()(ids) * math.inf, [8])
    # outside the scored positions nothing reads the logit: no error
    assert run(NaNAt(16, 2, 3), [16]).copy_acc.min() == 1.0


def test_argument_types_are_checked():
    with pytest.raises(TypeError, match="sequence of ints"):
        run(Copier(), "16")                                           # would measure L = 1 and L = 6
    with pytest.raises(TypeError, match="integers"):
        run(Copier(), [16.0, 32])                                     # would be truncated
    with pytest.raises(TypeError, match="integers"):
        run(Copier(), np.array([8.5, 16.0]))
    with pytest.raises(TypeError, match="integers"):
        run(Copier(), [True, 8])
    with pytest.raises(ValueError, match="strictly increasing"):
        run(Copier(), [8, 8])
    with pytest.raises(TypeError, match="integer tensor"):
        run(Copier(), [8], tokens=torch.rand(100) * 60)                # float ids would be truncated
    with pytest.raises(TypeError, match="integer tensor"):
        run(Copier(), [8], tokens=list(range(1, 100)))
    with pytest.raises(ValueError, match="1-D"):
        run(Copier(), [8], tokens=torch.arange(1, 61).reshape(2, 30))
    with pytest.raises(TypeError, match="n_samples must be an int"):
        run(Copier(), [8], n_samples=10.0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        run(StatefulCopier(), [8], chunk_size=16.5)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        run(Copier(), [8], batch_size=True)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        run(Copier(), [8], n_samples=0)
    # numpy integers are ints
    assert run(Copier(), np.array([8, 16]), n_samples=np.int64(3)).lengths.tolist() == [8, 16]
    assert run(Copier(), [8], tokens=np.arange(1, 60, dtype=np.int32)).copy_acc.min() == 1.0


def test_out_is_checked_before_any_work(tmp_path):
    calls = []

    def model(ids):
        calls.append(ids.shape)
        return Copier()(ids)

    with pytest.raises(ValueError, match="is a folder"):
        run(model, [8, 16], out=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create its folder"):
        run(model, [8, 16], out=tmp_path / "file" / "c.json")
    assert calls == []                                                # the model never ran


def test_corrupt_json_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "curve.json"
    for text in ("{not json", '{"format": "minimamba.forgetting_curve/2", "lengths": [8]}',
                 '{"format": "minimamba.forgetting_curve/2", "lengths": [8], "copy_acc": [[0.5, "x"]], '
                 '"lm_acc": [[0, 0]]}', "[1, 2]"):
        bad.write_text(text)
        with pytest.raises(ValueError, match=str(bad)):
            fc.ForgettingCurve.load(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=str(bad)):
        fc.ForgettingCurve.load(bad)


def test_official_result_file_loads(tmp_path):
    # draw.py writes a list of per-length records (hand-made numbers, the official field names)
    records = [{"length": 8, "lm_mean": 0.1, "copy_mean": 0.95, "p_value": 0.001,
                "copy_accs": [1.0, 0.75] + [1.0] * 8, "lm_accs": [0.0, 0.25] * 5},
               {"length": 523, "copy_accs": [1.0] * 10, "lm_accs": [0.5] * 10}]
    path = tmp_path / "Model.json"
    path.write_text(json.dumps(records))
    curve = fc.ForgettingCurve.load(path)
    assert curve.lengths.tolist() == [8, 523] and curve.copy_acc.shape == (2, 10)
    assert curve.fine_verdicts().tolist() == ["inconclusive", "pass"] and curve.fine_grained_length() == 523


# ---------------------------------------------------------------------------------------------
# Options that reproduce the official protocol
# ---------------------------------------------------------------------------------------------

def test_argmax_over_all_rows_reads_padded_rows():
    def padded(ids):                                                 # 16 extra rows that always win
        logits = Copier()(ids)
        return torch.cat([logits, torch.full((*logits.shape[:2], 16), 10.0)], dim=-1)

    assert np.all(run(padded, [8, 32]).copy_acc == 1.0)
    official = run(padded, [8, 32], argmax_over="all")
    assert np.all(official.copy_acc == 0.0) and official.meta["argmax_over"] == "all"
    with pytest.raises(ValueError, match="argmax_over"):
        run(padded, [8], argmax_over="first")


def test_random_ids_range():
    seen = []

    def model(ids):
        seen.append(ids)
        return Copier()(ids)

    curve = run(model, [8, 32], random_ids=(10, 20))
    body = torch.cat([ids[:, 1:-1].reshape(-1) for ids in seen if ids.shape[0] > 1])
    body = body[body != BOS]                                          # the middle separator
    assert int(body.min()) >= 10 and int(body.max()) < 20 and tuple(curve.meta["random_ids"]) == (10, 20)
    with pytest.raises(ValueError, match="needs >= 32000 ids"):
        run(Copier(), [8], random_ids=fc.OFFICIAL_RANDOM_IDS)        # the official range, vocab 64
    with pytest.raises(ValueError, match="random tokens only"):
        run(Copier(), [8], random_ids=(1, 20), tokens=torch.arange(1, 60))


def test_lm_prefix_tail_is_the_official_layout():
    stream = torch.arange(1, 101)                                     # every position distinct
    L, n = 10, 6
    lay = fc.make_layouts(L, n, np.random.default_rng(0), bos_id=0, eos_id=0, tokens=stream, lm_prefix="tail")
    assert torch.equal(lay.ids[n:, 1:L + 1], stream[-L:].expand(n, L))   # u = the text's last L tokens
    assert np.all(lay.x_start <= 100 - 3 * L) and np.all(lay.u_start == 100 - L)
    text = stream % 63 + 1                                            # ids 1..63 for the oracle
    curve = run(Copier(), [10, 30], tokens=text, lm_prefix="tail")
    assert curve.meta["lm_prefix"] == "tail" and np.all(curve.copy_acc == 1.0)
    with pytest.raises(ValueError, match="needs 3L"):
        run(Copier(), [40], tokens=text, lm_prefix="tail")
    with pytest.raises(ValueError, match="needs natural text"):
        run(Copier(), [8], lm_prefix="tail")


def test_module_is_standalone():
    import subprocess
    import sys
    code = ("import sys, forgetting_curve; "
            "assert not {'minimamba', 'matplotlib', 'experiments'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(fc.Path(fc.__file__).parent))


def test_a_model_with_fewer_logits_than_its_ids_is_refused():
    """A model whose logits cannot name every id it reads (vocab_size not the model's) scored every such
    target as a silent miss."""
    narrow = lambda ids: torch.zeros(*ids.shape, 10)  # noqa: E731  (10 logits, ids up to 49)
    with pytest.raises(ValueError, match="returns 10 logits per position but reads token id"):
        fc.forgetting_curve(narrow, lengths=[2], vocab_size=50, n_samples=2)


