"""Tests of the scaling sweeps: statistics, fit helpers, the passkey generator, resumable sweeps over
seeds, the baseline.

Claims tested:
- mean_ci, proportion (Wilson) and linear_fit's slope interval equal hand-computed values;
- linear_fit and exp_fit recover known parameters from synthetic points (and report R^2);
- the passkey generator places the needle at the requested depth and builds the requested length;
- a sweep over seeds resumes without recomputing finished (point, seed) pairs, in-process and in
  worker processes (run_points, state_capacity.run, passkey.run, forgetting_curves.run), and
  --replot rebuilds the summary from the points alone;
- T_forget / T_recall read the censored cases correctly; the Transformer baseline is causal.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from experiments import forgetting_curves, passkey, state_capacity, sweep
from experiments.data import copymix_batch
from experiments.sweep import (Point, PointStore, exp_fit, grid_points, linear_fit, mean_ci, point_key, proportion,
                               r_squared, run_points, t_quantile)


# ---------------------------------------------------------------------------------------------
# statistics over seeds (hand-computed values)
# ---------------------------------------------------------------------------------------------

def test_t_quantiles_match_tables():
    for df, t in ((1, 12.706204736174698), (2, 4.302652729911275), (4, 2.7764451051977987),
                  (10, 2.2281388519649385), (30, 2.0422724563012373)):
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-9), df
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_mean_ci_by_hand():
    s = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027: half = 4.3027 / sqrt(3) = 2.4841
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and s["n"] == 3
    assert s["low"] == pytest.approx(2 - 2.484138, abs=1e-6) and s["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    assert mean_ci([5.0]) == {"mean": 5.0, "low": None, "high": None, "sd": None, "n": 1}
    assert mean_ci([])["n"] == 0
    assert mean_ci([4.0, 4.0])["low"] == mean_ci([4.0, 4.0])["high"] == 4.0


def test_wilson_interval_by_hand():
    # 8/10: center (8 + 1.9207) / 13.8415 = 0.71675, half 1.96 / 13.8415 * sqrt(1.6 + 0.9604) = 0.22658
    p = proportion(8, 10)
    assert (p["k"], p["n"], p["share"]) == (8, 10, 0.8)
    assert p["low"] == pytest.approx(0.49016, abs=1e-5) and p["high"] == pytest.approx(0.94332, abs=1e-5)
    zero = proportion(0, 3)  # 0/3: [0, z^2 / (3 + z^2)] = [0, 3.841459 / 6.841459] = [0, 0.561497]
    assert zero["low"] == 0.0 and zero["high"] == pytest.approx(0.561497, abs=1e-6)
    assert proportion(0, 0)["share"] is None
    with pytest.raises(ValueError, match="0 <= k <= n"):
        proportion(4, 3)


def test_slope_interval_by_hand():
    # x 1..4, y 1,3,2,5: Sxx 5, Sxy 5.5 -> slope 1.1, intercept 0; SSE 2.7; se sqrt(2.7 / 2 / 5) = 0.519615;
    # t(0.975, 2) = 4.302653 -> half 2.235724
    f = linear_fit([1, 2, 3, 4], [1, 3, 2, 5])
    assert f.slope == pytest.approx(1.1) and f.intercept == pytest.approx(0.0, abs=1e-12) and f.n == 4
    assert f.slope_low == pytest.approx(1.1 - 2.235724, abs=1e-5) and f.slope_high == pytest.approx(1.1 + 2.235724, abs=1e-5)
    two = linear_fit([1, 2], [3, 5])
    assert two.slope == pytest.approx(2.0) and two.slope_low is None and two.slope_high is None


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


def test_weighted_lm_loss_matches_masked_lm_loss():
    from experiments.train import lm_loss
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 260), torch.randint(0, 256, (3, 7))
    mask = torch.rand(3, 7) < 0.4
    mask[0, 0] = True
    got = lm_loss(logits, targets, mask.float())
    want = lm_loss(logits[mask][None], targets[mask][None])
    assert abs(got.item() - want.item()) < 1e-6, f"0/1 weights: {got.item()} vs masked lm_loss {want.item()}"
    one = torch.zeros(3, 7)
    one[1, 4] = 5.0  # a single weighted target: its own cross-entropy, whatever the weight's scale
    ce = torch.nn.functional.cross_entropy(logits[1, 4, :256][None], targets[1, 4][None])
    assert abs(lm_loss(logits, targets, one).item() - ce.item()) < 1e-6


def test_passkey_config_validates():
    passkey.PasskeyConfig(**passkey.QUICK)
    with pytest.raises(ValueError, match="passkey_share"):
        passkey.PasskeyConfig(passkey_share=0.01)  # 8 rows per step: no passkey row
    with pytest.raises(ValueError, match="multiple"):
        passkey.PasskeyConfig(tokens_per_step=1000)
    with pytest.raises(ValueError, match="answer_loss_share"):
        passkey.PasskeyConfig(answer_loss_share=0.0)
    with pytest.raises(ValueError, match="dt_max"):
        passkey.PasskeyConfig(dt_max=1e-4)


def test_sweep_configs_refuse_repeated_seeds_and_impossible_train_lens():
    for config in (passkey.PasskeyConfig, state_capacity.CapacityConfig, forgetting_curves.FCurvesConfig):
        with pytest.raises(ValueError, match="must not repeat a seed"):  # one run counted twice in k of N
            config(seeds=(0, 1, 0))
    for lens in ((), (0, 16)):  # a ZeroDivisionError / max() of nothing
        with pytest.raises(ValueError, match="train_lens must be ints >= 2"):
            state_capacity.CapacityConfig(train_lens=lens)


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

def _square(cfg, point):
    """A module-level compute (worker processes import it by name)."""
    if point.coords["x"] == cfg.get("fail_at"):
        raise KeyboardInterrupt("killed")
    return {"y": point.coords["x"] ** 2 + point.coords["seed"]}


def test_point_store_reuses_points_and_refuses_other_settings(tmp_path):
    assert point_key(d_state=64, T=16) == "T=16_d_state=64"
    pts = grid_points([{"x": 2}, {"x": 3}], seeds=(0, 1), recipe_params={"steps": 10})
    assert [p.key for p in pts] == ["seed=0_x=2", "seed=1_x=2", "seed=0_x=3", "seed=1_x=3"]
    assert pts[1].params == {"steps": 10, "x": 2, "seed": 1}
    store = PointStore(tmp_path)
    store.put(pts[0], {"y": 4}, 0.1)
    assert PointStore(tmp_path).get(pts[0]) == {"y": 4} and store.get(pts[1]) is None
    other = Point(pts[0].key, pts[0].coords, {**pts[0].params, "steps": 11})
    with pytest.raises(ValueError, match=r"other settings \(steps\).*new --out_dir"):
        store.get(other)


def test_run_points_resumes_a_killed_sweep_in_process_and_in_workers(tmp_path):
    pts = grid_points([{"x": x} for x in range(4)], seeds=(0, 1), recipe_params={})
    with pytest.raises(KeyboardInterrupt):  # killed at the 5th point (x = 2, seed 0)
        run_points(tmp_path, pts, _square, {"fail_at": 2}, workers=1)
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == [f"seed={s}_x={x}.json" for s in (0, 1) for x in (0, 1)]
    assert not list((tmp_path / "points").glob(".*")), "no temporary file left behind"
    results, computed = run_points(tmp_path, pts, _square, {}, workers=2)  # the rest, in 2 processes
    assert computed == [p.key for p in pts[4:]]
    assert results == {p.key: {"y": p.coords["x"] ** 2 + p.coords["seed"]} for p in pts}
    stored = json.loads((tmp_path / "points" / "seed=1_x=3.json").read_text())
    assert stored["threads"] == sweep.threads_per_worker(2) and stored["params"] == {"x": 3, "seed": 1}
    assert run_points(tmp_path, pts, _square, {"fail_at": 0}, workers=2) == (results, [])


def _fake_capacity_point(calls, fail_after=None):
    """A stand-in for state_capacity.run_point: ratios 1 + N_S / (1000 T) x (1 + seed / 2), falling with
    T and rising with N_S; the criteria fire above 2 (paper) and 1.5 (mean)."""

    def fake(cfg, point):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        c = point.coords
        calls.append(point.key)
        ns = c["n_layer"] * c["d_state"] * c["headdim"] * 4
        ratio = 1.0 + ns / (1000.0 * c["t_train"]) * (1 + c["seed"] / 2)
        crit = {"paper": {"collapsed": ratio > 2.0, "ratio": ratio}, "mean": {"collapsed": ratio > 1.5, "ratio": ratio}}
        retention = min(1.0, ns / (20.0 * c["t_train"] ** 2))  # the first-token retention at 4 T, falling with T
        return {"state_size": ns, "n_params": 1, "final_loss": 1.0, "train_seconds": 0.0, "eval_seconds": 0.0,
                "probes": {"newline": crit, "text": crit}, "retention_at": {"4": retention},
                "collapsed": {**{k: v["collapsed"] for k, v in crit.items()}, "retention": retention > 0.5}}
    return fake


def test_state_capacity_sweep_over_seeds_resumes_and_replots(tmp_path, monkeypatch):
    cfg = state_capacity.CapacityConfig(out_dir=str(tmp_path), states=("16x16", "32x16", "64x16"),
                                        train_lens=(8, 16, 32, 64), seeds=(0, 1), eval_length=256, workers=1)
    calls = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point(calls, fail_after=5))
    with pytest.raises(KeyboardInterrupt):  # killed during the 6th of 24 points
        state_capacity.run(cfg)
    assert len(calls) == 5 and len(list((tmp_path / "points").glob("*.json"))) == 5
    calls2 = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point(calls2))
    summary = state_capacity.run(cfg)
    assert len(calls2) == 19 and not set(calls2) & set(calls), "finished points were recomputed"
    s16, s32, s64 = summary["states"]
    assert [s["state_size"] for s in summary["states"]] == [2048, 4096, 8192]
    # N_S = 4096: ratio at T = 8 is 1.512 (seed 0) / 1.768 (seed 1): the mean criterion fires, the paper's not
    assert s32["per_seed"]["0"]["t_forget"] == {"paper": {"value": 8, "censored": "at_or_below", "non_monotone": False},
                                                "mean": {"value": 16, "censored": None, "non_monotone": False},
                                                "retention": {"value": 32, "censored": None, "non_monotone": False}}
    # the retention rule: 4096 / (20 T^2) > 0.5 up to T = 16 (12.8, 0.8), so T_forget 32; at 8192 up to T = 16 too
    assert s32["t_forget"]["mean"]["mean"] == 16 and s32["t_forget"]["paper"]["censored_at_or_below"] == 2
    # N_S = 8192: T_forget 32 (mean) and 16 (paper) for both seeds
    assert s64["t_forget"]["mean"]["mean"] == 32 and s64["t_forget"]["paper"]["mean"] == 16
    # the mean criterion's pairs (4096, 16) x 2, (8192, 32) x 2: slope 16 / 4096 tokens per element
    fit = summary["fit"]["mean"]
    assert fit["tokens_per_K_elements"]["slope"] == pytest.approx(1e3 * 16 / 4096) and fit["fit"]["n"] == 4
    assert summary["fit"]["paper"]["fit"] is None and "no fit" in summary["fit"]["paper"]["note"]
    assert s16["t_forget"]["retention"]["mean"] == 16 and s64["t_forget"]["retention"]["mean"] == 32
    calls3 = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point(calls3))
    assert state_capacity.replot(tmp_path, tmp_path / "re") == json.loads(json.dumps(summary)) and calls3 == []
    assert (tmp_path / "re" / "capacity.png").is_file() and (tmp_path / "re" / "capacity_summary.md").is_file()


def test_t_forget_censoring():
    assert state_capacity.t_forget({16: True, 64: False}) == {"value": 64, "censored": None, "non_monotone": False}
    assert state_capacity.t_forget({16: True, 64: True}) == {"value": 64, "censored": "above", "non_monotone": False}
    assert state_capacity.t_forget({16: False, 64: False}) == {"value": 16, "censored": "at_or_below",
                                                               "non_monotone": False}


def test_t_forget_is_where_collapse_stops_for_good():
    """A pass below a later collapse (noise at toy scale) is flagged, and T_forget is the T after the
    last collapse, not the first pass."""
    collapsed = {8: False, 12: True, 16: False, 20: False}
    assert state_capacity.t_forget(collapsed) == {"value": 16, "censored": None, "non_monotone": True}
    assert state_capacity.t_forget({**collapsed, 20: True}) == {"value": 20, "censored": "above", "non_monotone": True}


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
    rows, mask = copymix_batch(_TinyCorpus(), 50, steps=100, seed=0, batch_size=4, seq_len=64)
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


def test_passkey_sweep_over_seeds_runs_end_to_end_resumes_and_replots(tmp_path, monkeypatch):
    import experiments.data as data
    monkeypatch.setattr(data.Corpus, "load", classmethod(lambda cls, *a, **k: _TinyCorpus()))
    cfg = passkey.PasskeyConfig(out_dir=str(tmp_path), d_model=16, states=("4x8", "8x8"), t_train=100,
                                tokens_per_step=400, steps=3, lengths=(100, 160), depths=(0.0, 1.0), n_eval=2, chunk=64,
                                seeds=(0, 1), workers=1)
    summary = passkey.run(cfg)
    assert [(s["d_state"], s["headdim"]) for s in summary["states"]] == [(4, 8), (8, 8)]
    for s in summary["states"]:
        assert set(s["per_seed"]) == {"0", "1"} and np.asarray(s["acc_mean"]).shape == (2, 2)
        for r in s["per_seed"].values():
            assert r["t_recall"] in (0, 100, 160) and 0 <= r["answer_loss"] < 20
        tr = s["t_recall"]
        assert tr["n"] + tr["censored_zero"] + tr["censored_top"] == 2
    first = json.loads((tmp_path / "config.json").read_text())["invocations"][-1]["points_computed"]
    assert len(first) == 4, f"2 states x 2 seeds, got {first}"
    assert (tmp_path / "models" / "d_state=4_headdim=8_seed=1" / "checkpoints").is_dir(), "trained by train.py"
    again = passkey.run(cfg)
    rec = json.loads((tmp_path / "config.json").read_text())["invocations"][-1]
    assert rec["points_computed"] == [], f"a finished sweep recomputed {rec['points_computed']}"
    assert again == summary and passkey.replot(tmp_path, tmp_path / "re") == json.loads(json.dumps(summary))


def test_forgetting_curves_over_seeds_train_both_models_in_one_loop_and_resume(tmp_path, monkeypatch):
    import experiments.data as data
    monkeypatch.setattr(data.Corpus, "load", classmethod(lambda cls, *a, **k: _TinyCorpus()))
    cfg = forgetting_curves.FCurvesConfig(out_dir=str(tmp_path), d_model=16, states=("4x8",), n_head=2, train_lens=(16,),
                                          seeds=(0, 1), tokens_per_step=64, steps=2, lengths=(2, 4), n_samples=5,
                                          modes=("random",), mitigations=("none", "rri"), chunk_size=16, workers=1)
    summary = forgetting_curves.run(cfg)
    labels = [m["label"] for m in summary["models"]]
    assert labels == ["Mamba-2 n=4 p=8 T=16", "Transformer T=16"]
    mamba, tf = summary["models"]
    assert set(mamba["curves"]) == {"none|random", "rri|random"} and set(tf["curves"]) == {"none|random"}
    for c in (*mamba["curves"].values(), *tf["curves"].values()):
        assert set(c["per_seed"]) == {"0", "1"} and c["fine"]["n"] == 2
        for r in c["per_seed"].values():  # read with forgetting_curve.py's rules
            assert r["lengths"] == [2, 4] and len(r["fine_verdicts"]) == 2
    for model in ("kind=mamba2", "kind=transformer"):
        assert any(p.name.startswith("d_state" if "mamba" in model else "kind") for p in (tmp_path / "models").iterdir())
    again = forgetting_curves.run(cfg)
    assert json.loads((tmp_path / "config.json").read_text())["invocations"][-1]["points_computed"] == []
    assert again == summary
    forgetting_curves.replot(tmp_path, tmp_path / "re")
    assert (tmp_path / "re" / "fcurves_random.png").is_file()


# ---------------------------------------------------------------------------------------------
# committed results and the one re-plot command (experiments/figures.py)
# ---------------------------------------------------------------------------------------------

def test_publish_then_replot_from_committed_results_only(tmp_path, monkeypatch):
    from experiments import figures
    from experiments.common import REPO
    before = {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").iterdir()}
    run_dir = tmp_path / "run"
    cfg = state_capacity.CapacityConfig(out_dir=str(run_dir), states=("16x16", "64x16"), train_lens=(8, 16, 32),
                                        seeds=(0, 1), eval_length=256, workers=1)
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([]))
    summary = state_capacity.run(cfg)
    (run_dir / "models").mkdir()
    (run_dir / "models" / "weights.bin").write_bytes(bytes(1000))  # never published
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="unknown experiment"):
        figures.main(["--publish", str(run_dir), "--experiment", "capacity", "--results_dir", str(results)])
    done = figures.main(["--publish", str(run_dir), "--experiment", "state_capacity", "--results_dir", str(results),
                         "--figures_dir", str(tmp_path / "figs")])
    assert done == {"state_capacity": "replotted"}
    published = results / "state_capacity"
    assert sorted(p.name for p in published.iterdir()) == ["manifest.json", "points"]
    assert len(list((published / "points").iterdir())) == 12
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and manifest["config"]["train_lens"] == [8, 16, 32]
    inv = manifest["invocations"][-1]
    for key in ("command", "git_commit", "wall_s", "torch", "python", "cpu_count", "processor"):
        assert key in inv, key
    assert json.loads((tmp_path / "figs" / "capacity_summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "figs" / "capacity.png").is_file()
    # re-plot from the committed files alone, after the run folder is gone
    shutil.rmtree(run_dir)
    (tmp_path / "figs" / "capacity.png").unlink()
    done = figures.main(["--results_dir", str(results), "--figures_dir", str(tmp_path / "figs")])
    assert done["state_capacity"] == "replotted" and done["passkey"].startswith("skipped")
    assert (tmp_path / "figs" / "capacity.png").is_file()
    # an unfinished run is not published
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([], fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        state_capacity.run(dataclasses.replace(cfg, out_dir=str(tmp_path / "half")))
    with pytest.raises(FileNotFoundError, match="missing; finish the run"):
        figures.publish(tmp_path / "half", "state_capacity", results)
    assert {p.name: p.stat().st_mtime_ns for p in (REPO / "figures").iterdir()} == before, "figures/ was written"


# ---------------------------------------------------------------------------------------------
# run folders that never reuse or overwrite work made under other settings
# ---------------------------------------------------------------------------------------------

def _capacity_cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), states=("16x16", "32x16"), train_lens=(8, 16), seeds=(0,), eval_length=256,
                workers=1)
    return state_capacity.CapacityConfig(**{**base, **kw})


@pytest.mark.parametrize("damage, expect", [
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "not valid JSON"),  # a torn write
    (lambda p: p.write_text("[1, 2]"), "JSON list"),
    (lambda p: p.write_text('{"params": {}}'), "lacks|keys are"),
    (lambda p: p.write_text('{"params": 3, "result": {}}'), "under 'params'"),
])
def test_a_damaged_point_file_is_an_error_naming_it(tmp_path, monkeypatch, damage, expect):
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([]))
    cfg = _capacity_cfg(tmp_path)
    state_capacity.run(cfg)
    point = tmp_path / "points" / f"{state_capacity.capacity_points(cfg)[1].key}.json"
    damage(point)
    for read in (lambda: state_capacity.replot(tmp_path, tmp_path / "re"),  # --replot and a resumed sweep
                 lambda: run_points(tmp_path, state_capacity.capacity_points(cfg), _square, {}, workers=1)):
        with pytest.raises(ValueError, match=rf"(?s){re.escape(str(point))}.*({expect}).*delete it"):
            read()


def test_a_damaged_run_record_or_metrics_log_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([]))
    state_capacity.run(_capacity_cfg(tmp_path))
    record = tmp_path / "config.json"
    record.write_text(record.read_text()[:-30])
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))} is not valid JSON"):
        state_capacity.replot(tmp_path)
    record.write_text(json.dumps({"config": {"no_such_field": 1}, "invocations": []}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(record))}: its config is not a valid CapacityConfig"):
        state_capacity.replot(tmp_path)
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n1,2.5\n2,2.")
    assert sweep.final_train_loss(tmp_path) == pytest.approx(2.25)
    metrics.write_text("step,loss\n1,2.5\n2,2.4e")  # torn in the middle of a number
    with pytest.raises(ValueError, match=rf"{re.escape(str(metrics))}, line 3: column 'loss' holds '2.4e'"):
        sweep.final_train_loss(tmp_path)


def test_a_sweep_resumed_with_other_settings_is_refused_before_it_writes(tmp_path, monkeypatch):
    cfg = _capacity_cfg(tmp_path)
    # killed before any point was stored (its models may be trained): no point file to compare with
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([], fail_after=0))
    with pytest.raises(KeyboardInterrupt):
        state_capacity.run(cfg)
    record = (tmp_path / "config.json").read_bytes()
    calls = []
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point(calls))
    with pytest.raises(ValueError, match=r"(?s)other settings.*lr: 0.003 \(recorded\) vs 0.05 \(now\)"):
        state_capacity.run(dataclasses.replace(cfg, lr=0.05))
    assert calls == [] and (tmp_path / "config.json").read_bytes() == record, "the refused sweep ran or wrote"
    # finished: a rerun with other settings is still refused before config.json is touched
    state_capacity.run(cfg)
    record = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"(?s)other settings.*steps"):
        state_capacity.run(dataclasses.replace(cfg, steps=cfg.steps + 1))
    assert (tmp_path / "config.json").read_bytes() == record
    # more seeds, more grid points, other machine fields: the same sweep, widened
    state_capacity.run(dataclasses.replace(cfg, seeds=(0, 1), train_lens=(8, 16, 32), device="cpu"))
    assert len(list((tmp_path / "points").glob("*.json"))) == 12


def test_train_and_sweeps_never_take_over_each_others_folders(tmp_path, monkeypatch):
    import experiments.data as data
    from experiments import train as T
    from experiments.common import RunFolderError
    monkeypatch.setattr(data.Corpus, "load", classmethod(lambda cls, *a, **k: _TinyCorpus()))
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([]))
    state_capacity.run(_capacity_cfg(tmp_path / "sweep"))
    T.train(T.TrainConfig(d_model=16, n_layer=1, d_state=8, headdim=8, chunk_size=8, seq_len=8, batch_size=2, steps=1,
                          eval_every=0, progress=False, out_dir=str(tmp_path / "train")))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match=r"sweep holds a capacity sweep .*not a train.py run"):
        T.train(T.TrainConfig(out_dir=str(tmp_path / "sweep"), steps=1, resume=True, progress=False))
    with pytest.raises(SystemExit, match=r"holds a capacity sweep"):
        T.main(["--out_dir", str(tmp_path / "sweep"), "--steps", "1", "--resume", "--progress", "false"])
    with pytest.raises(RunFolderError, match=r"train holds a train.py run .*not a capacity sweep"):
        state_capacity.run(_capacity_cfg(tmp_path / "train"))
    with pytest.raises(RunFolderError, match=r"holds a capacity sweep .*not a passkey sweep"):
        passkey.run(passkey.PasskeyConfig(out_dir=str(tmp_path / "sweep"), workers=1))
    with pytest.raises(RunFolderError, match=r"config.json is a file, not a folder"):
        state_capacity.run(_capacity_cfg(tmp_path / "sweep" / "config.json" / "x"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("seeds", ["-1", str(2**70), "0,3,0"])
def test_bad_seeds_are_refused_before_anything_is_created(tmp_path, seeds):
    with pytest.raises(ValueError, match=r"--seeds must"):
        state_capacity.main(["--seeds", seeds, "--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_refused_publish_or_replot_writes_nothing_and_names_the_file(tmp_path, monkeypatch):
    from experiments import figures
    results, figs = tmp_path / "results", tmp_path / "figs"
    results.mkdir()
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([], fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        state_capacity.run(_capacity_cfg(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="missing; finish the run"):
        figures.main(["--publish", str(tmp_path / "half"), "--experiment", "state_capacity", "--results_dir",
                      str(results), "--figures_dir", str(figs)])
    assert list(results.iterdir()) == [] and not figs.exists(), "a refused publish left files behind"
    bench_run = tmp_path / "bench"
    bench_run.mkdir()
    (bench_run / "results.json").write_text('{"meta": {"wall_s": 1.0}, "rows": [{"kind": "mo')  # torn
    with pytest.raises(ValueError, match=rf"{re.escape(str(bench_run / 'results.json'))} is not valid JSON"):
        figures.publish(bench_run, "bench", results)
    assert list(results.iterdir()) == []
    monkeypatch.setattr(state_capacity, "run_point", _fake_capacity_point([]))
    state_capacity.run(_capacity_cfg(tmp_path / "full"))
    with pytest.raises(ValueError, match=r"results.json is a file, not a folder"):
        figures.publish(tmp_path / "full", "state_capacity", bench_run / "results.json" / "res")
    published = figures.publish(tmp_path / "full", "state_capacity", results)
    point = sorted((published / "points").iterdir())[0]
    point.write_text(point.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"{re.escape(str(point))} is not valid JSON"):
        figures.main(["--results_dir", str(results), "--figures_dir", str(figs), "--only", "state_capacity"])


_NAP_SWEEP = """
import dataclasses, os, sys, time
from pathlib import Path
from experiments import sweep


@dataclasses.dataclass(frozen=True)
class NapConfig:
    out_dir: str
    pid_dir: str
    workers: int = 2
    nap_s: float = 300.0


def nap(cfg, point):
    (Path(cfg.pid_dir) / str(os.getpid())).touch()
    time.sleep(cfg.nap_s)
    return {"slept": cfg.nap_s}


def points(cfg):
    return sweep.grid_points([{"x": 0}, {"x": 1}], (0,), {"nap_s": cfg.nap_s})


if __name__ == "__main__":
    cfg = NapConfig(sys.argv[1], sys.argv[2])
    sweep.run_sweep(cfg, points(cfg), nap, "nap")
"""


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc").is_dir():
        return True
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _quick(cfg, point):
    return {"slept": 0.0}


def test_a_sweep_folder_is_locked_and_its_workers_end_with_it(tmp_path):
    import importlib.util
    from experiments.common import REPO
    script, run_dir, pid_dir = tmp_path / "nap_sweep.py", tmp_path / "run", tmp_path / "pids"
    script.write_text(_NAP_SWEEP)
    pid_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(script), str(run_dir), str(pid_dir)], env=env, cwd=tmp_path)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(list(pid_dir.iterdir())) < 2:  # both points in flight, one per worker process
            assert parent.poll() is None and time.monotonic() < deadline, "the sweep's workers did not start"
            time.sleep(0.2)
        workers = [int(p.name) for p in pid_dir.iterdir()]
        # a second sweep on the same folder is refused, naming the process that holds it
        spec = importlib.util.spec_from_file_location("nap_sweep", script)
        nap_sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nap_sweep)
        cfg = nap_sweep.NapConfig(str(run_dir), str(pid_dir), workers=1)
        with pytest.raises(ValueError, match=rf"run is in use by process {parent.pid} \(it holds .*\.lock\)"):
            sweep.run_sweep(cfg, nap_sweep.points(cfg), _quick, "nap")
        # the sweep is killed without any chance to clean up: its workers end within seconds
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "workers outlived their killed sweep"
        # the OS dropped the dead sweep's lock: the folder can be continued at once
        assert sweep.run_sweep(cfg, nap_sweep.points(cfg), _quick, "nap") == {
            p.key: {"slept": 0.0} for p in nap_sweep.points(cfg)}
    finally:
        for pid in [parent.pid] + [w for w in workers if _running(w)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
