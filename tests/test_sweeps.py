"""Tests of the scaling sweeps: fit helpers, the passkey generator, resumable sweeps, the baseline.

Claims tested (issue 6):
- linear_fit and exp_fit recover known parameters from synthetic points (and report R^2);
- the passkey generator places the needle at the requested depth and builds the requested length;
- a sweep resumes without recomputing finished points (PointStore and state_capacity.run);
- T_forget / T_recall read the censored cases correctly; the Transformer baseline is causal.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from experiments import passkey, state_capacity
from experiments.sweep import PointStore, exp_fit, linear_fit, point_key, r_squared


# ---------------------------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(slope=st.floats(-50, 50).filter(lambda s: abs(s) > 1e-3), intercept=st.floats(-100, 100),
       n=st.integers(3, 12))
def test_linear_fit_recovers_exact_line(slope, intercept, n):
    x = np.linspace(1, 10, n)
    f = linear_fit(x, slope * x + intercept)
    assert abs(f.slope - slope) < 1e-8 * max(1, abs(slope)), f"slope {f.slope} vs {slope}"
    assert abs(f.intercept - intercept) < 1e-7 * max(1, abs(intercept), abs(slope)), f"intercept {f.intercept} vs {intercept}"
    assert f.r2 == pytest.approx(1.0, abs=1e-9)


def test_linear_fit_paper_capacity_law_with_noise():
    # the paper's law T = 5.172 N_S - 4.469 on its own six state sizes, with 1% noise
    rng = np.random.default_rng(0)
    ns = np.array([0.809, 1.619, 2.424, 4.848, 12.915, 19.354])
    t = (5.172 * ns - 4.469) * (1 + 0.01 * rng.standard_normal(ns.size))
    f = linear_fit(ns, t)
    assert abs(f.slope - 5.172) < 0.1, f"slope {f.slope}"
    assert 0.99 < f.r2 <= 1.0, f"R^2 {f.r2}"
    with pytest.raises(ValueError, match="distinct x"):
        linear_fit([1, 1], [2, 3])


@settings(max_examples=25, deadline=None)
@given(a=st.floats(0.5, 20), b=st.floats(1.05, 3.0), c=st.floats(-5, 5))
def test_exp_fit_recovers_known_parameters(a, b, c):
    x = np.arange(1, 9, dtype=float)
    y = a * (b ** x - 1) + c
    f = exp_fit(x, y)
    assert abs(f.b - b) < 1e-3 * b, f"b {f.b} vs {b} (a {f.a} vs {a}, c {f.c} vs {c})"
    assert abs(f.a - a) < 1e-2 * a, f"a {f.a} vs {a}"
    assert abs(f.c - c) < 1e-2 * max(1, abs(c), a), f"c {f.c} vs {c}"
    assert f.r2 > 1 - 1e-8, f"R^2 {f.r2}"


def test_exp_fit_paper_recall_law():
    a, b, c = 4.756, 1.365, -0.742
    x = np.array([0.809, 1.619, 2.424, 4.848, 12.915])
    f = exp_fit(x, a * (b ** x - 1) + c)
    err = max(abs(f.a - a) / a, abs(f.b - b) / b, abs(f.c - c) / abs(c))
    assert err < 1e-3, f"max rel err {err}: fit {f}"
    with pytest.raises(ValueError, match="3 distinct"):
        exp_fit([1, 2], [1, 2])


def test_r_squared_of_a_bad_model_is_low():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert r_squared(y, np.full(4, y.mean())) == pytest.approx(0.0)
    assert r_squared(y, y[::-1]) < 0


# ---------------------------------------------------------------------------------------------
# passkey generator
# ---------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(length=st.integers(passkey.overhead_bytes(), 3000), depth=st.floats(0, 1),
       key=st.text("0123456789", min_size=5, max_size=5))
def test_passkey_prompt_length_and_needle_depth(length, depth, key):
    prompt, pos = passkey.make_prompt(length, depth, key)
    needle = passkey.NEEDLE.format(key=key).encode()
    n_fill = length - passkey.overhead_bytes()
    assert len(prompt) == length, f"prompt has {len(prompt)} bytes, asked {length}"
    assert pos == round(depth * n_fill)
    assert prompt[pos:pos + len(needle)] == needle, f"needle not at {pos}"
    assert prompt.endswith(passkey.QUESTION.encode())
    assert prompt.count(key.encode()) >= 2  # the needle states it twice; the filler has no digits
    # depth as a fraction of the filler before the needle
    if n_fill > 0:  # with no filler every depth puts the needle first
        assert abs(pos / n_fill - depth) <= 0.5 / n_fill + 1e-12, f"depth {pos / n_fill} vs {depth}"
    # everything that is not needle or question is the filler, in order
    filler = (prompt[:pos] + prompt[pos + len(needle):len(prompt) - len(passkey.QUESTION)]).decode()
    assert filler == (passkey.FILLER * (n_fill // len(passkey.FILLER) + 1))[:n_fill]


def test_passkey_extreme_depths_and_errors():
    p0, pos0 = passkey.make_prompt(500, 0.0, "12345")
    p1, pos1 = passkey.make_prompt(500, 1.0, "12345")
    assert pos0 == 0 and p0.startswith(b"The passkey is 12345.")
    assert p1[:pos1] == (passkey.FILLER * 10).encode()[:pos1] and p1.endswith(
        passkey.NEEDLE.format(key="12345").encode() + passkey.QUESTION.encode())
    with pytest.raises(ValueError, match="shorter than"):
        passkey.make_prompt(50, 0.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        passkey.make_prompt(500, 0.5, "1234x")


class _TinyCorpus:
    """A stand-in for experiments.data.Corpus: deterministic rows of the byte 'a'."""

    train = np.frombuffer(b"a" * 5000, dtype=np.uint8)
    heldout = np.frombuffer(b"b" * 5000, dtype=np.uint8)
    source = "test"

    def batch(self, step, *, seed, batch_size, seq_len, n_segments=1, rows=None):
        return torch.full((batch_size, n_segments * seq_len + 1), ord("a"), dtype=torch.long)

    def heldout_windows(self, n, length):
        return torch.full((n, length + 1), ord("b"), dtype=torch.long)


@settings(max_examples=30, deadline=None)
@given(batch_size=st.integers(1, 12), share=st.floats(0.05, 1.0), t_train=st.integers(passkey.overhead_bytes() + 4, 200),
       answer_only=st.booleans(), step=st.integers(0, 10_000), loss_share=st.floats(0.01, 1.0))
def test_passkey_training_rows_weights(batch_size, share, t_train, answer_only, step, loss_share):
    kw = dict(step=step, seed=0, batch_size=batch_size, t_train=t_train, passkey_share=share,
              answer_loss_share=loss_share, answer_only=answer_only)
    if round(share * batch_size) < 1:
        with pytest.raises(ValueError, match="passkey_share"):
            passkey.passkey_rows(_TinyCorpus(), **kw)
        return
    rows, w = passkey.passkey_rows(_TinyCorpus(), **kw)
    n_pk = passkey.n_passkey_rows(batch_size, share)
    assert rows.shape == (batch_size, t_train + 1) and w.shape == (batch_size, t_train) and w.is_floating_point()
    assert abs(w.sum().item() - 1) < 1e-5, f"weights sum to {w.sum().item()}, not 1"
    s_pk = loss_share if n_pk < batch_size else 1.0  # the passkey rows' share of the loss
    # passkey rows first: prompt + 5 digits, holding s_pk of the loss, each row alike
    for r, wr in zip(rows[:n_pk], w[:n_pk]):
        text = bytes(r.tolist())
        key = text[-passkey.KEY_DIGITS:].decode()
        assert key.isdigit() and text[:-5].endswith(passkey.QUESTION.encode())
        assert passkey.NEEDLE.format(key=key).encode() in text
        scored = torch.nonzero(wr).flatten().tolist()
        if answer_only:  # exactly the targets rows[1:][T-5:] = the answer digits, nothing else
            assert scored == list(range(t_train - 5, t_train)), f"scored targets {scored}"
            assert bytes(r[1:][scored].tolist()).decode() == key
        else:
            assert scored == list(range(t_train))
        assert abs(wr.sum().item() - s_pk / n_pk) < 1e-6
    # text rows untouched, every target equally weighted, 1 - s_pk of the loss together
    assert (rows[n_pk:] == ord("a")).all()
    if n_pk < batch_size:
        n_text = batch_size - n_pk
        assert torch.allclose(w[n_pk:], torch.full_like(w[n_pk:], (1 - loss_share) / (n_text * t_train)))
    again = passkey.passkey_rows(_TinyCorpus(), **kw)
    assert torch.equal(rows, again[0]) and torch.equal(w, again[1]), "rows must be a pure function of (seed, step)"
    other = passkey.passkey_rows(_TinyCorpus(), **{**kw, "step": step + 1})[0]
    assert not torch.equal(rows[:n_pk], other[:n_pk]), "another step must draw other keys / depths"


def test_weighted_lm_loss_matches_masked_lm_loss_and_checks_weights():
    from experiments.sweep import weighted_lm_loss
    from experiments.train import lm_loss
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 260), torch.randint(0, 256, (3, 7))
    mask = torch.rand(3, 7) < 0.4
    mask[0, 0] = True
    got = weighted_lm_loss(logits, targets, mask.float())
    want = lm_loss(logits[mask][None], targets[mask][None])
    assert abs(got.item() - want.item()) < 1e-6, f"0/1 weights: {got.item()} vs masked lm_loss {want.item()}"
    one = torch.zeros(3, 7)
    one[1, 4] = 5.0  # a single weighted target: its own cross-entropy, whatever the weight's scale
    ce = torch.nn.functional.cross_entropy(logits[1, 4, :256][None], targets[1, 4][None])
    assert abs(weighted_lm_loss(logits, targets, one).item() - ce.item()) < 1e-6
    with pytest.raises(ValueError, match="positive sum"):
        weighted_lm_loss(logits, targets, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="shape"):
        weighted_lm_loss(logits, targets, torch.ones(3, 6))


def test_passkey_config_validates():
    passkey.PasskeyConfig(**{**passkey.QUICK, "figures": False})
    with pytest.raises(ValueError, match="passkey_share"):
        passkey.PasskeyConfig(passkey_share=0.01)  # 8 rows per step: no passkey row
    with pytest.raises(ValueError, match="multiple"):
        passkey.PasskeyConfig(tokens_per_step=1000)
    with pytest.raises(ValueError, match="answer_loss_share"):
        passkey.PasskeyConfig(answer_loss_share=0.0)
    with pytest.raises(ValueError, match="dt_max"):
        passkey.PasskeyConfig(dt_max=1e-4)


def test_fit_recall_leaves_censored_points_out():
    ns = [5_056, 17_920, 69_376, 120_000]
    fit, note = passkey.fit_recall(ns, [256, 512, 4096, 0], 4096)
    assert fit is None and "2 state size(s)" in note and "1 with T_recall = 0" in note and ">= 4096" in note
    fit, note = passkey.fit_recall(ns[:3], [256, 512, 2048], 4096)
    assert fit is not None and fit.n == 3 and "test nothing" in note
    fit, note = passkey.fit_recall(ns, [128, 384, 512, 768], 4096)  # concave in N_S: no exponential growth
    assert fit.b - 1 < passkey.FLAT_GROWTH and "no exponential growth" in note, f"fit {fit}, note {note!r}"
    a, b, c = 30.0, 1.05, 100.0  # an exact law on 4 uncensored points is recovered
    ys = [a * (b ** (x / 1e3) - 1) + c for x in ns]
    fit, note = passkey.fit_recall(ns, ys, 10 ** 9)
    assert abs(fit.b - b) < 1e-3 and note == "", f"fit {fit}, note {note!r}"


def test_recall_length_is_contiguous_from_the_shortest():
    lengths = [128, 256, 512, 1024]
    acc = np.array([[1.0, 1.0], [0.95, 1.0], [0.5, 0.6], [1.0, 1.0]])
    assert passkey.recall_length(lengths, acc) == 256  # 1024 passes again, but after a failure
    assert passkey.recall_length(lengths, np.zeros((4, 2))) == 0


# ---------------------------------------------------------------------------------------------
# resumable sweeps
# ---------------------------------------------------------------------------------------------

def test_point_store_skips_finished_points_and_checks_params(tmp_path):
    calls = []
    store = PointStore(tmp_path)
    key = point_key(d_state=64, T=16)
    assert key == "T=16_d_state=64"
    r1 = store.run(key, {"d_state": 64, "T": 16}, lambda: calls.append(1) or {"x": 1.5})
    r2 = PointStore(tmp_path).run(key, {"d_state": 64, "T": 16}, lambda: calls.append(1) or {"x": 9})
    assert r1 == r2 == {"x": 1.5} and len(calls) == 1
    with pytest.raises(ValueError, match="settings changed"):
        PointStore(tmp_path).run(key, {"d_state": 64, "T": 32}, lambda: {"x": 0})

    def killed():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        store.run("other", {"a": 1}, killed)
    assert store.get("other") is None, "a point killed mid-way must not be stored"
    assert not list((tmp_path / "points").glob(".*tmp*")), "no temporary file left behind"


def _fake_point_factory(calls, fail_after=None):
    """A stand-in for state_capacity.run_point: deterministic ratios that fall with T and rise with N."""

    def fake(cfg, n_layer, n, p, t, out, probes):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        calls.append((n, p, t))
        ns = n_layer * n * p * 4
        ratio = 1.0 + ns / (1000.0 * t)  # so T_forget grows with N_S
        pr = {"max_within": 1.0, "max_beyond": ratio, "ratio": ratio, "in_window": 1.0, "beyond": ratio,
              "first_position_2x": None}
        return {"state_size": ns, "n_params": 1, "final_loss": 1.0, "train_seconds": 0.0, "eval_seconds": 0.0,
                "probes": {"newline": pr, "text": pr}}
    return fake


def test_state_capacity_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    import experiments.data as data
    monkeypatch.setattr(data.Corpus, "load", classmethod(lambda cls, *a, **k: _TinyCorpus()))
    cfg = state_capacity.CapacityConfig(out_dir=str(tmp_path), states="16x16,32x16", train_lens="8,16,32,64",
                                        eval_length=256, figures=False)
    calls = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_point_factory(calls, fail_after=5))
    with pytest.raises(KeyboardInterrupt):  # killed during the 6th of 8 points
        state_capacity.run(cfg)
    assert len(calls) == 5 and len(list((tmp_path / "points").glob("*.json"))) == 5
    calls2 = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_point_factory(calls2))
    summary = state_capacity.run(cfg)
    assert calls2 == [(32, 16, 16), (32, 16, 32), (32, 16, 64)], f"recomputed finished points: {calls2}"
    calls3 = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_point_factory(calls3))
    again = state_capacity.run(cfg)
    assert calls3 == [] and json.dumps(again, default=str, sort_keys=True) == json.dumps(summary, default=str, sort_keys=True)
    # T_forget from the fake ratios 1 + N_S / (1000 T): at 2x nothing collapses (ratio <= 1.52)
    s16, s32 = summary["states"]
    assert s16["state_size"] == 2048 and s32["state_size"] == 4096
    assert s32["t_forget"] == {"value": 8, "censored": "at_or_below", "non_monotone": False}
    # relaxed 1.5x: N_S = 4096 needs 4096/(1000 T) <= 0.5 -> T >= 8.2 -> first tested T = 16
    assert s32["t_forget_relaxed"] == {"value": 16, "censored": None, "non_monotone": False}
    assert s16["t_forget_relaxed"] == {"value": 8, "censored": "at_or_below", "non_monotone": False}


def test_t_forget_censoring():
    assert state_capacity.t_forget({16: 2.5, 64: 1.2}, 2.0) == {"value": 64, "censored": None, "non_monotone": False}
    assert state_capacity.t_forget({16: 2.5, 64: 2.2}, 2.0) == {"value": 64, "censored": "above", "non_monotone": False}
    assert state_capacity.t_forget({16: 1.1, 64: 1.2}, 2.0) == {"value": 16, "censored": "at_or_below",
                                                                "non_monotone": False}


def test_t_forget_is_where_collapse_stops_for_good():
    """A pass below a later collapse (noise at toy scale) is flagged, and T_forget is the T after the
    last collapse, not the first pass."""
    ratios = {8: 1.7, 12: 2.19, 16: 1.74, 20: 1.0}
    assert state_capacity.t_forget(ratios, 2.0) == {"value": 16, "censored": None, "non_monotone": True}
    assert state_capacity.t_forget({**ratios, 20: 2.5}, 2.0) == {"value": 20, "censored": "above", "non_monotone": True}
    assert state_capacity.t_forget(ratios, 1.5) == {"value": 20, "censored": None, "non_monotone": False}


# ---------------------------------------------------------------------------------------------
# the Transformer baseline
# ---------------------------------------------------------------------------------------------

def test_tiny_transformer_is_causal_and_round_trips(tmp_path):
    from experiments.tiny_transformer import TinyTransformer, TransformerConfig
    torch.manual_seed(0)
    m = TinyTransformer(TransformerConfig(d_model=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 256, (2, 40))
    ids2 = ids.clone()
    ids2[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        a, b = m(ids), m(ids2)
    diff = (a[:, :25] - b[:, :25]).abs().max().item()
    assert a.shape == (2, 40, 256) and diff < 1e-5, f"future tokens changed past logits: max diff {diff}"
    assert (a[:, 25:] - b[:, 25:]).abs().max().item() > 1e-4
    m.save_pretrained(tmp_path / "tf")
    with torch.no_grad():
        c = TinyTransformer.from_pretrained(tmp_path / "tf")(ids)
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="even size"):
        TransformerConfig(d_model=30, n_head=10)


def test_copymix_rows_mask_only_the_predictable_copy_targets():
    from experiments.forgetting_curves import copymix_rows
    rows, mask = copymix_rows(_TinyCorpus(), step=50, steps=100, seed=0, batch_size=4, t_train=64)
    assert rows.shape == (4, 65) and mask.shape == (4, 64)
    assert mask[0::2].all(), "text rows: every target counts"
    for r, m in zip(rows[1::2].tolist(), mask[1::2]):
        # walk the episodes [0] x [0] x and rebuild which targets are the second x
        expect, i = [], 0
        while i < len(r):
            assert r[i] == 0
            if 0 not in r[i + 1:]:  # the row ends inside a first x: nothing more to predict
                expect += [False] * (len(r) - i)
                break
            j = r.index(0, i + 1)  # second separator
            L = j - i - 1
            assert r[j + 1:j + 1 + L] == r[i + 1:i + 1 + L][:len(r[j + 1:j + 1 + L])], "second x != first x"
            expect += [False] * (L + 2) + [True] * L
            i = j + 1 + L
        assert m.tolist() == expect[1:65]


def test_passkey_sweep_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    import experiments.data as data
    monkeypatch.setattr(data.Corpus, "load", classmethod(lambda cls, *a, **k: _TinyCorpus()))
    cfg = passkey.PasskeyConfig(out_dir=str(tmp_path), d_model=16, states="4x8,8x8", t_train=100, tokens_per_step=400,
                                steps=3, lengths="100,160", depths="0,1", n_eval=2, chunk=64, figures=False)
    summary = passkey.run(cfg)
    assert [(r["d_state"], r["headdim"]) for r in summary["results"]] == [(4, 8), (8, 8)]
    for r in summary["results"]:
        assert np.asarray(r["acc"]).shape == (2, 2) and 0 <= r["answer_loss"] < 20
        assert r["t_recall"] in (0, 100, 160)
    first = json.loads((tmp_path / "config.json").read_text())["invocations"][-1]["points_computed"]
    assert len(first) == 4, f"2 trainings + 2 evaluations, got {first}"
    again = passkey.run(cfg)
    rec = json.loads((tmp_path / "config.json").read_text())["invocations"][-1]
    assert rec["points_computed"] == [], f"a finished sweep recomputed {rec['points_computed']}"
    assert [r["acc"] for r in again["results"]] == [r["acc"] for r in summary["results"]]
