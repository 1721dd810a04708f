"""Tests of issue 22's capacity experiments: the recall stream, T_forget's verdicts, intervals and fit,
the MQAR capacity readout, and publishing.

- experiments/recall_stream.py: every query's value is its key's last value, within max_lag; fresh keys
  are never live; a sliding window of max_lag holds every answer (hypothesis over seeds and T).
- experiments/scaling.py: verdict_interval's rule on hand-made verdict sequences; fit_intervals refuses
  an interval that says nothing and agrees with fit_power_law on grid intervals.
- experiments/t_forget.py: the preregistered verdict order on hand-made results; the summary of a
  hand-made sweep with a known answer (fit, censoring, uninformative rows); the config's refusals.
- experiments/mqar_capacity.py: the mixed-k batch, the verdicts (never learned, k*, right-censored k*).
- experiments/publish.py: a dirty run or an unfinished one is refused.
Every test reads hand-made results (no training), except the tiny end-to-end runs marked slow.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import mqar_capacity as MC
from experiments import publish as PB
from experiments import recall_stream as RS
from experiments import scaling as sc
from experiments import t_forget as TF

# ------------------------------------------------------------------------------------------------
# recall_stream.py
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(half_lag=st.integers(1, 60), seed=st.integers(0, 10_000), p=st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_stream_answers_lie_in_the_window(half_lag, seed, p):
    cfg = RS.StreamConfig(max_lag=2 * half_lag, p_query=p)
    rows = RS.stream_rows(cfg, 3, 301, np.random.default_rng(seed))
    ids, q, lag = rows.ids.numpy(), rows.query_value.numpy(), rows.lag.numpy()
    assert ids.shape == (3, 301) and q.shape == ids.shape
    keys, vals = ids[:, 0::2], ids[:, 1::2]
    assert ((keys >= RS.KEY_BYTES[0]) & (keys < RS.KEY_BYTES[1])).all()
    assert ((vals >= RS.VALUE_BYTES[0]) & (vals < RS.VALUE_BYTES[1])).all()
    assert not q[:, 0::2].any(), "only value bytes are query targets"
    for b in range(3):
        last = {}  # key -> (position of its value byte, value)
        for t in range(1, 301, 2):
            key, val = ids[b, t - 1], ids[b, t]
            live = key in last and t - last[key][0] <= cfg.max_lag
            if q[b, t]:
                assert live, f"query of a key not mentioned within max_lag (row {b}, byte {t})"
                assert val == last[key][1] and lag[b, t] == t - last[key][0], "a query answers its key's last value"
                assert 0 < lag[b, t] <= cfg.max_lag
            else:
                assert not live, f"a fresh binding reused a live key (row {b}, byte {t})"
                assert lag[b, t] == 0
            last[key] = (t, val)


def test_stream_queries_happen_and_config_refusals():
    rows = RS.probe_rows(RS.StreamConfig(max_lag=32), 4, 256)
    share = rows.query_value[:, 1::2].float().mean().item()
    assert 0.35 < share < 0.6, f"about p_query = 0.5 of the slots are queries, got {share:.2f}"
    assert rows.ids.shape == (4, 257)
    for bad in (dict(max_lag=3), dict(max_lag=0), dict(max_lag=2 * RS.N_KEYS), dict(max_lag=8, p_query=1.0)):
        with pytest.raises(ValueError):
            RS.StreamConfig(**bad)
    batches = RS.StreamBatches(RS.StreamConfig(max_lag=16), seed=3, batch_size=5, row_len=17)
    assert torch.equal(batches(7), batches(7)) and not torch.equal(batches(7), batches(8))


def test_query_accuracy_reads_far_queries_only():
    cfg = RS.StreamConfig(max_lag=32)
    rows = RS.probe_rows(cfg, 8, 32)
    l = 32
    perfect = torch.nn.functional.one_hot(rows.ids[:, 1:l + 1], 256).float() * 10  # (b, l, V): right everywhere
    assert RS.query_accuracy(perfect, rows, cfg) == 1.0
    wrong_far = perfect.clone()
    far = rows.query_value[:, 1:l + 1] & (rows.lag[:, 1:l + 1] >= 16)
    wrong_far[far] = 0.0
    wrong_far[far, 0] = 10.0  # predicts byte 0, never a value
    assert RS.query_accuracy(wrong_far, rows, cfg) == 0.0


# ------------------------------------------------------------------------------------------------
# scaling.py: verdicts -> intervals; fit_intervals
# ------------------------------------------------------------------------------------------------

C, F, G = "collapsed", "not collapsed", "gate-failed"


@pytest.mark.parametrize("verdicts, expected", [
    ({16: C, 32: C, 64: F, 128: F}, (32.0, 64.0, 0)),
    ({16: C, 32: G, 64: F, 128: F}, (16.0, 64.0, 0)),  # a gate-failed point widens the interval
    ({16: F, 32: F}, (0.0, 16.0, 0)),  # left-censored
    ({16: C, 32: C}, (32.0, math.inf, 0)),  # right-censored
    ({16: G, 32: "failed"}, (0.0, math.inf, 0)),  # says nothing
    ({16: F, 32: C, 64: F}, (32.0, 64.0, 1)),  # out of order: counted
])
def test_verdict_interval_rule(verdicts, expected):
    assert sc.verdict_interval(verdicts) == expected


def test_fit_intervals_agrees_with_grid_fit_and_refuses_nothing_intervals():
    grid = [16, 32, 64, 128]
    states = [1e3, 1e3, 4e3, 4e3, 16e3, 16e3]
    seen = [16, 32, 32, 64, 128, None]
    a = sc.fit_power_law(states, seen, grid)
    b = sc.fit_intervals(states, [sc.grid_interval(t, grid) for t in seen], grid)
    assert a.slope == pytest.approx(b.slope) and a.slope_ci == pytest.approx(b.slope_ci)
    with pytest.raises(ValueError, match="says nothing"):
        sc.fit_intervals([1e3, 4e3], [(0.0, math.inf), (16.0, 32.0)], grid)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        sc.fit_intervals([1e3, 4e3], [(32.0, 16.0), (16.0, 32.0)], grid)


# ------------------------------------------------------------------------------------------------
# t_forget.py: verdicts and the summary of a hand-made sweep
# ------------------------------------------------------------------------------------------------

def fake_result(gate: float, e16_lo: float, n_state: int = 1000, failed: bool = False) -> dict:
    if failed:
        return {"failed": "TrainingDiverged: loss nan", "train_s": 1.0}
    excess = [{"k": k, "start": 0, "stop": 1, "excess": {"value": e16_lo + 0.01, "lo": e16_lo, "hi": e16_lo + 0.02}}
              for k in (2, 4, 8, 16)]
    return {"failed": None, "gate": gate, "excess": excess, "state_size": n_state}


def test_t_forget_verdict_order():
    assert TF.verdict(fake_result(0.9, 0.5, failed=True)) == "failed"
    assert TF.verdict(fake_result(TF.GATE - 0.01, 0.5)) == "gate-failed"  # the gate comes before E
    assert TF.verdict(fake_result(TF.GATE, TF.E_MIN + 0.001)) == "collapsed"
    assert TF.verdict(fake_result(0.9, TF.E_MIN)) == "not collapsed"  # the lower bound must EXCEED E_MIN
    assert TF.ungated_verdict(fake_result(0.0, 0.5)) == "collapsed"


def test_t_forget_summary_of_a_known_sweep(tmp_path):
    """T_forget doubles with the state (b = 1 exactly): d_state 4 forgets from T 32, 16 from 64, 64 from 128;
    one seed of d_state 64 collapses everywhere (right-censored), one gate-fails everywhere (uninformative)."""
    cfg = TF.TForgetConfig(d_states=(4, 16, 64), train_lens=(16, 32, 64, 128), seeds=(0, 1, 2), workers=1,
                           out_dir=str(tmp_path))
    first_forget = {4: 32, 16: 64, 64: 128}
    results = {}
    for p in TF.grid(cfg):
        n, t, s = p.coords["d_state"], p.coords["t_train"], p.coords["seed"]
        size = TF.state_size_of(cfg, n)
        if n == 64 and s == 1:
            results[p.key] = fake_result(0.9, 0.1, size)  # never forgets on the grid
        elif n == 64 and s == 2:
            results[p.key] = fake_result(0.0, 0.0, size)  # never learns
        else:
            results[p.key] = fake_result(0.9, 0.1 if t < first_forget[n] else -0.01, size)
    summary = TF.report(cfg, results, tmp_path, {"invocations": [{"git_commit": "abc"}], "prereg_commit": "def"})
    rows = {(r["d_state"], r["seed"]): r for r in summary["rows"]}
    assert rows[4, 0]["t_forget"] == [16.0, 32.0] and rows[16, 2]["t_forget"] == [32.0, 64.0]
    assert rows[64, 0]["t_forget"] == [64.0, 128.0]
    assert rows[64, 1]["t_forget"] == [128.0, math.inf]
    assert rows[64, 2]["t_forget"] == [0.0, math.inf] and rows[64, 2]["t_forget_ungated"] == [0.0, 16.0]
    gated = summary["fit"]["gated"]
    assert gated["n_points"] == 8 and gated["n_uninformative"] == 1 and gated["n_right_censored"] == 1
    # T_forget doubles per step of the grid while N_S grows 2.75x then 3.5x: lines through the intervals have
    # slopes of about 0.55-0.95
    lo, hi = gated["slope_ci"]
    assert lo < gated["slope"] < hi and 0.45 < gated["slope"] < 0.95 and 0.3 < lo and hi < 1.2, gated
    text = (tmp_path / "t_forget_summary.md").read_text()
    assert "unknown" in text and "> 128" in text and (tmp_path / "t_forget.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "t_forget_summary.json").read_text())["constants"]["GATE"] == TF.GATE


def test_t_forget_config_refusals():
    with pytest.raises(ValueError, match="divide"):
        TF.TForgetConfig(train_lens=(16, 48), workers=1)
    with pytest.raises(ValueError, match="increase"):
        TF.TForgetConfig(train_lens=(32, 16), workers=1)
    with pytest.raises(ValueError, match="slope needs"):
        TF.TForgetConfig(d_states=(16,), workers=1)
    with pytest.raises(ValueError, match="keys"):
        TF.TForgetConfig(train_lens=(16, 512), workers=1)


# ------------------------------------------------------------------------------------------------
# mqar_capacity.py
# ------------------------------------------------------------------------------------------------

def test_mixed_k_batches_hold_every_k():
    cfg = MC.CapacityConfig(seq_len=64, train_ks=(1, 2, 4, 8, 16), eval_ks=(1, 2), tokens_per_step=2048, workers=1,
                            seeds=(0,))
    rows, mask = MC.MixedKBatches(cfg, seed=0)(3)
    assert rows.shape == (32, 65) and mask.shape == (32, 64)
    per_row = mask.sum(1).tolist()
    assert sorted(set(per_row)) == [1, 2, 4, 8, 16] and per_row.count(1) == 7 and per_row.count(16) == 6
    again, _ = MC.MixedKBatches(cfg, seed=0)(3)
    assert torch.equal(rows, again)


def test_mqar_verdicts_and_refusals():
    cfg = MC.CapacityConfig(workers=1, seeds=(0,))
    assert MC.verdict({"failed": "x"}, cfg) == "failed"
    assert MC.verdict({"failed": None, "k_star": 0}, cfg) == "never learned"
    assert MC.verdict({"failed": None, "k_star": 8}, cfg) == "k* = 8"
    assert MC.verdict({"failed": None, "k_star": 32}, cfg) == "k* >= 32"  # every swept k: right-censored
    with pytest.raises(ValueError, match="cannot hold"):
        MC.CapacityConfig(seq_len=64, train_ks=(1, 32), eval_ks=(1,), workers=1, seeds=(0,))
    with pytest.raises(ValueError, match="trained range"):
        MC.CapacityConfig(train_ks=(1, 2), eval_ks=(1, 4), workers=1, seeds=(0,))
    with pytest.raises(ValueError, match="rows per step"):
        MC.CapacityConfig(seq_len=1024, train_ks=(1, 2, 4), eval_ks=(1,), workers=1, seeds=(0,))


# ------------------------------------------------------------------------------------------------
# publish.py
# ------------------------------------------------------------------------------------------------

def test_publish_refuses_dirty_and_unfinished_runs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "points").mkdir(parents=True)
    cfg = TF.TForgetConfig(d_states=(4, 16), train_lens=(16, 32), seeds=(0,), workers=1, out_dir=str(run))
    record = {"config": dataclasses.asdict(cfg), "invocations": [{"git_commit": "abc+dirty"}]}
    (run / "config.json").write_text(json.dumps(record))

    def publish():
        return PB.publish_run(run, tmp_path / "out", "x", TF.TForgetConfig, TF.grid, lambda out: None)
    monkeypatch.setattr(PB, "git_commit", lambda: "abc+dirty")
    with pytest.raises(SystemExit, match="dirty tree"):
        publish()
    monkeypatch.setattr(PB, "git_commit", lambda: "abc")
    with pytest.raises(SystemExit, match="dirty or unknown"):
        publish()
    (run / "config.json").write_text(json.dumps({**record, "invocations": [{"git_commit": "abc"}]}))
    (run / "points" / f"{TF.grid(cfg)[0].key}.json").write_text("{}")
    with pytest.raises(SystemExit, match="unfinished"):
        publish()
    assert not (tmp_path / "out").exists(), "nothing is written before every check passes"


def test_gpu_script_refuses_without_cuda_or_a_bad_choice(monkeypatch):
    from experiments import capacity_gpu as CG
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs CUDA"):
        CG.main(["--dry_run"])
    with pytest.raises(SystemExit, match="--only"):
        CG.main(["--only", "passkey"])


def test_t_forget_reads_the_preregistered_grid_apart(tmp_path):
    """A run whose grid goes past PREREGISTRATION.md's (T 256): the pre-registered reading ignores T 256."""
    lens = TF.PREREGISTERED_LENS + (256,)
    cfg = TF.TForgetConfig(d_states=(4, 16), train_lens=lens, seeds=(0,), workers=1, out_dir=str(tmp_path))
    results = {p.key: fake_result(0.9, 0.1 if p.coords["t_train"] < (32 if p.coords["d_state"] == 4 else 256)
                                  else -0.01, TF.state_size_of(cfg, p.coords["d_state"])) for p in TF.grid(cfg)}
    summary = TF.report(cfg, results, tmp_path, {})
    rows = {r["d_state"]: r for r in summary["rows"]}
    assert rows[16]["t_forget"] == [128.0, 256.0] and rows[16]["t_forget_prereg"] == [128.0, math.inf]
    assert rows[4]["t_forget"] == rows[4]["t_forget_prereg"] == [16.0, 32.0]
    assert list(summary["fit"])[0] == "gated, pre-registered grid"
    assert "pre-registered" in (tmp_path / "t_forget_summary.md").read_text()


def test_gpu_presets_are_valid_configs():
    """The GPU script cannot run here, but its grids must be ones the scripts accept (T <= 380 for the
    recall stream's keys, k <= 95 for MQAR's)."""
    from experiments import capacity_gpu as CG
    for cls, preset in ((TF.TForgetConfig, CG.T_FORGET_GPU), (MC.CapacityConfig, CG.MQAR_GPU)):
        cfg = cls(**preset)
        assert cfg.device == "cuda" and len(cfg.seeds) >= 3
    assert max(CG.MQAR_GPU["eval_ks"]) >= 64  # the k range


def test_gpu_calibration_times_the_real_step_on_cpu(monkeypatch):
    """The GPU script is never run in CI; its calibration is, on CPU at toy size, for both tasks."""
    from experiments import capacity_gpu as CG
    monkeypatch.setattr(CG, "CALIBRATION_STEPS", 2)
    monkeypatch.setattr(CG, "WARMUP_STEPS", 1)
    stream = RS.StreamBatches(RS.StreamConfig(max_lag=16), seed=0, batch_size=2, row_len=17)
    s = CG.seconds_per_step(4, 16, 2, stream, 16, 1, 8, device="cpu")
    cfg = MC.CapacityConfig(seq_len=16, train_ks=(1, 2), eval_ks=(1,), tokens_per_step=64, workers=1, seeds=(0,))
    m = CG.seconds_per_step(4, 16, 4, MC.MixedKBatches(cfg, seed=0), 16, 1, 8, device="cpu")
    assert 0 < s < 5 and 0 < m < 5, (s, m)
