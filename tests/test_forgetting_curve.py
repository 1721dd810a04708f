"""Tests of forgetting_curve.py: oracle models with known memory, layouts, rules, JSON, chunking.

Oracles are causal functions that know the layout: at a position t inside the second x they find the
latest separator s (= L + 1, the copy distance) and may copy the token at t - s + 1. Their memory is
set by how far back they are allowed (or partly allowed) to copy, so the expected memory lengths are
known exactly.
"""

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
    kw.setdefault("progress", False)
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
    assert np.all(curve.p_values() == 1.0)


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
    def __init__(self, max_len, exc):
        self.max_len, self.exc = max_len, exc

    def __call__(self, ids):
        if ids.shape[1] > self.max_len:
            raise self.exc
        return Copier(K=40)(ids)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                 MemoryError()])
def test_out_of_memory_keeps_measured_lengths(tmp_path, exc):
    out = tmp_path / "curve.json"
    curve = run(FailsBeyond(2 * 32 + 3, exc), [8, 16, 32, 64, 128], out=out)
    assert curve.lengths.tolist() == [8, 16, 32]
    assert list(curve.errors) == [64] and type(exc).__name__ in curve.errors[64]
    saved = fc.ForgettingCurve.load(out)
    assert saved.lengths.tolist() == [8, 16, 32] and list(saved.errors) == [64]
    np.testing.assert_array_equal(saved.copy_acc, curve.copy_acc)


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


def test_progress_bar_goes_to_stderr(capsys):
    run(Copier(), [8, 16], progress=True)
    captured = capsys.readouterr()
    assert "forgetting curve [" in captured.err and "100.0%" in captured.err and captured.out == ""


def test_padded_vocabulary_rows_are_ignored_when_vocab_size_is_given():
    def padded(ids):                                                 # 16 extra rows that always win
        logits = Copier()(ids)
        return torch.cat([logits, torch.full((*logits.shape[:2], 16), 10.0)], dim=-1)

    assert np.all(run(padded, [8, 32]).copy_acc == 1.0)
    # without vocab_size the padded rows win the argmax: nothing is ever right
    assert np.all(run(padded, [8, 16], tokens=torch.arange(1, V), vocab_size=None).copy_acc == 0.0)


def test_cli_on_a_tiny_checkpoint(tmp_path):
    minimamba = pytest.importorskip("minimamba")
    torch.manual_seed(0)
    cfg = minimamba.Mamba2Config(d_model=32, n_layer=1, vocab_size=256, d_state=16, headdim=16,
                                 chunk_size=16)
    minimamba.Mamba2LM(cfg).save_pretrained(tmp_path / "ckpt")
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, 3000, dtype=np.uint8)))
    curve = fc.main(["--checkpoint", str(tmp_path / "ckpt"), "--lengths", "4", "40", "--text", str(text),
                     "--n-samples", "5", "--chunk-size", "32", "--train-length", "16",
                     "--out", str(tmp_path / "out")])
    saved = fc.ForgettingCurve.load(tmp_path / "out" / "curve.json")
    np.testing.assert_array_equal(saved.copy_acc, curve.copy_acc)
    assert saved.meta["bos_id"] == 0 and saved.meta["chunk_size"] == 32
    assert (tmp_path / "out" / "curve.png").stat().st_size > 10_000
    rand = fc.main(["--checkpoint", str(tmp_path / "ckpt"), "--lengths", "4", "--random-tokens",
                    "--n-samples", "5", "--out", str(tmp_path / "rand")])
    assert rand.meta["text"] == "random" and rand.copy_acc.shape == (1, 5)
    redrawn = fc.main(["--from-json", str(tmp_path / "out" / "curve.json"), "--out", str(tmp_path / "re")])
    np.testing.assert_array_equal(redrawn.copy_acc, curve.copy_acc)
    assert (tmp_path / "re" / "curve.png").stat().st_size > 10_000


@pytest.mark.parametrize("chunk", [None, 5, 64])
def test_progress_counts_every_token_once(chunk):
    ids = torch.randint(1, V, (7, 2 * 20 + 3))
    seen = []
    model = StatefulCopier() if chunk else Copier()
    lo, hi = fc.scored_slice(20)
    fc.predict_scored(model, ids, lo, hi, chunk_size=chunk, batch_size=3, on_batch=seen.append)
    assert sum(seen) == ids.numel() and all(n >= 0 for n in seen)
    if chunk:
        assert len(seen) > ids.shape[0] // 3 + 1                     # updates within a batch


def test_resume_measures_only_missing_lengths_and_equals_a_fresh_run(tmp_path):
    out = tmp_path / "c.json"
    calls = []

    def model(ids):
        if ids.shape[0] > 1:                                         # not the 1-row fingerprint probe
            calls.append(ids.shape[1])
        return Copier(K=40, K2=90, p=0.5)(ids)

    run(model, [8, 64], out=out, seed=3)
    calls.clear()
    resumed = run(model, [8, 32, 64, 128], out=out, seed=3, resume=True)
    assert sorted(set(calls)) == [2 * 32 + 3, 2 * 128 + 3]            # only the new lengths ran
    fresh = run(model, [8, 32, 64, 128], seed=3)
    np.testing.assert_array_equal(resumed.copy_acc, fresh.copy_acc)
    np.testing.assert_array_equal(resumed.lm_acc, fresh.lm_acc)
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 32, 64, 128]
    calls.clear()
    again = run(model, [8, 32, 64, 128], out=out, seed=3, resume=True)   # everything done already
    assert calls == [] and again.lengths.tolist() == [8, 32, 64, 128]
    np.testing.assert_array_equal(again.copy_acc, fresh.copy_acc)
    # an out-of-memory error after resumed lengths keeps them in the file too (the same model,
    # which runs out of memory beyond L = 128)
    def failing_model(ids):
        if ids.shape[1] > 2 * 128 + 3:
            raise MemoryError()
        return model(ids)

    failing = run(failing_model, [8, 32, 64, 128, 256], out=out, seed=3, resume=True)
    assert failing.lengths.tolist() == [8, 32, 64, 128] and list(failing.errors) == [256]
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 32, 64, 128]
    with pytest.raises(ValueError, match="settings differ"):
        run(model, [8], out=out, seed=4, resume=True)


def test_module_is_standalone():
    import subprocess
    import sys
    code = ("import sys, forgetting_curve; "
            "assert not {'minimamba', 'matplotlib', 'experiments'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(fc.Path(fc.__file__).parent))
