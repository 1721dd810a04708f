"""The state-collapse measurements on hand-made models whose answer is known, the repeat-span recipe,
and the training-side initial states.

Hand-made models: an "induction" byte predictor that votes for the byte that followed each earlier
occurrence of the current byte. Restricted to its last W positions it is an exact-window model (so
its loss under any window r >= W equals its full-state loss, and E = 0 exactly); over all history it
keeps everything (stale votes dilute the repeats, so E > 0 on the repeat-span process).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments import measure as ME
from experiments import recipe as R

# ----------------------------------------------------------------------------------------------
# hand-made models
# ----------------------------------------------------------------------------------------------
EPS = 0.05  # share of the uniform distribution in the induction model's prediction


def induction_losses(ids: torch.Tensor, memory: int | None, window: int | None) -> torch.Tensor:
    """Per-position loss (b, l) of the induction model that remembers `memory` positions (None: all),
    read through a window r (None: no window). The model sees min(memory, window) positions back."""
    x, y = ids[:, :-1], ids[:, 1:]
    b, l = x.shape
    reach = min(m for m in (memory, window, l + 1) if m is not None)
    t = torch.arange(l)
    j = torch.arange(l)
    # (t, j): a pair (x_j, x_{j+1}) is usable if j < t and x_{j+1} lies in the last `reach` positions
    visible = (j[None, :] < t[:, None]) & (t[:, None] - j[None, :] <= reach)
    match = (x[:, None, :] == x[:, :, None]) & visible[None]  # (b, t, j): x_j == x_t
    hit = (match & (y[:, None, :] == y[:, :, None])).sum(-1).double()  # (b, t) votes for the true next byte
    total = match.sum(-1).double()
    p = torch.where(total > 0, (1 - EPS) * hit / total.clamp_min(1) + EPS / 256, torch.full_like(hit, 1 / 256))
    return -torch.log(p)


def exact_window(w: int) -> ME.LossFn:
    return lambda ids, window: induction_losses(ids, w, window)


def keeps_everything() -> ME.LossFn:
    return lambda ids, window: induction_losses(ids, None, window)


def random_base(n: int = 200_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n).astype(np.uint8)


def probe(t_train: int, mult: int, b: int = 8, seed: int = 1) -> torch.Tensor:
    cfg = R.RecipeConfig(max_lag=t_train, span_len=8, p_repeat=0.5)
    return R.repeat_span_rows(random_base(), cfg, b, mult * t_train + 1, np.random.default_rng(seed)).ids


T = 32


# ----------------------------------------------------------------------------------------------
# E(k)
# ----------------------------------------------------------------------------------------------

def test_excess_of_an_exact_window_model_is_zero():
    ids = probe(T, 32, b=4)
    f = exact_window(T)
    for e in ME.excess(f(ids, None), f(ids, T), T):
        assert (e.excess.value, e.excess.lo, e.excess.hi) == (0.0, 0.0, 0.0), e


def test_excess_of_a_model_that_keeps_everything_is_positive():
    ids = probe(T, 32, b=8)
    f = keeps_everything()
    es = ME.excess(f(ids, None), f(ids, T), T)
    assert [e.k for e in es] == [2, 4, 8, 16]
    for e in es:
        assert e.excess.lo > 0.05, e  # every k: the interval excludes 0 by a margin
    assert es[-1].excess.value > es[0].excess.value  # more stale history, more excess


def test_excess_refuses_a_probe_shorter_than_32_t():
    ids = probe(T, 16, b=2)
    f = exact_window(T)
    with pytest.raises(ValueError, match="32 x T_train"):
        ME.excess(f(ids, None), f(ids, T), T)


# ----------------------------------------------------------------------------------------------
# horizon
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [T // 2, T, 2 * T])
def test_horizon_of_a_known_window(w):
    ids = probe(T, 8, b=4)
    h = ME.horizon(exact_window(w), ids, T)
    assert h.value == w, (h.value, dict(zip(h.windows, h.gaps)))
    assert not h.censored


def test_horizon_of_a_model_that_keeps_everything_is_censored():
    ids = probe(T, 8, b=4)
    h = ME.horizon(keeps_everything(), ids, T)
    # every position of [T, 8T) is in its memory: no window of the grid up to 4T leaves its loss alone
    assert h.censored and h.value is None and abs(h.gaps[-1]) > ME.HORIZON_TOLERANCE


# ----------------------------------------------------------------------------------------------
# the paper's criterion on bucketed loss
# ----------------------------------------------------------------------------------------------

def curve(in_window: float, beyond: float, first: float = 10.0, l: int = 16 * T) -> torch.Tensor:
    c = torch.full((l,), in_window, dtype=torch.float64)
    c[T:] = beyond
    c[0] = first  # the context-free first byte: above uniform at byte level
    return c


def test_bucketed_criterion_compares_with_the_second_half_of_the_window_not_position_0():
    c = curve(1.0, 2.5)
    v = ME.bucketed_criterion(c, T)
    assert v.collapsed and v.first_position == T and v.within == pytest.approx(1.0)
    # the per-position rule against the maximum of [0, T) (position 0 included) cannot fire here
    assert not (c[T:].max() > ME.PAPER_COLLAPSE_FACTOR * c[:T].max())


def test_bucketed_criterion_does_not_fire_on_a_flat_curve_with_a_first_byte_spike():
    v = ME.bucketed_criterion(curve(1.0, 1.1), T)
    assert not v.collapsed and v.first_position is None and v.ratio == pytest.approx(1.1)


def test_bucketed_criterion_averages_prompts_and_rejects_bad_buckets():
    two = torch.stack([curve(1.0, 1.0), curve(1.0, 4.0)])  # mean beyond 2.5 > 2 x 1.0
    assert ME.bucketed_criterion(two, T).collapsed
    with pytest.raises(ValueError, match="bucket"):
        ME.bucketed_criterion(curve(1.0, 1.0), T, bucket=5)


# ----------------------------------------------------------------------------------------------
# the bootstrap
# ----------------------------------------------------------------------------------------------

def test_bootstrap_interval_covers_the_truth_at_its_level():
    g = np.random.default_rng(0)
    hits = sum(bool(iv.lo <= 1.0 <= iv.hi) for iv in
               (ME.bootstrap_mean(g.exponential(1.0, size=40), n_boot=500, seed=i) for i in range(200)))
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_bootstrap_interval_has_no_impossible_bounds():
    iv = ME.bootstrap_mean([0.0] * 19 + [10.0])  # a non-negative quantity with one outlier
    assert 0.0 <= iv.lo <= iv.value <= iv.hi <= 10.0
    with pytest.raises(ValueError, match="finite"):
        ME.bootstrap_mean([1.0, math.nan])


# ----------------------------------------------------------------------------------------------
# mechanism on hand-set decays
# ----------------------------------------------------------------------------------------------

def tiny_model(log_dt: float, a_log: float):
    from minimamba import Mamba2Config, Mamba2LM
    torch.manual_seed(0)
    m = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, d_state=8, headdim=16, vocab_size=256, chunk_size=16)).eval()
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.dt_bias.fill_(log_dt)  # softplus(~log_dt) ~ exp(log_dt) for very negative log_dt
            layer.mixer.A_log.fill_(a_log)
    return m


def test_mechanism_reads_the_share_of_heads_that_never_forget():
    ids = torch.randint(0, 256, (2, 16 * 16))
    keeps = ME.mechanism(tiny_model(log_dt=-12.0, a_log=-4.0), ids, 16, every=8)  # dt*A ~ 1e-7: retention ~ 1
    forgets = ME.mechanism(tiny_model(log_dt=2.0, a_log=1.0), ids, 16, every=8)  # dt*A ~ -5: retention ~ e^-80
    assert keeps.share_never_forget == 1.0 and forgets.share_never_forget == 0.0
    assert keeps.retention_at["256"] > 0.99 > 1e-6 > forgets.retention_at["256"]
    assert sum(keeps.hist_at_t) == sum(keeps.hist_at_16t) > 0
    assert keeps.positions[1] == 16 and len(keeps.norm) == len(keeps.positions)


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------

def test_repeat_spans_copy_a_span_from_at_most_max_lag_back():
    cfg = R.RecipeConfig(max_lag=64, span_len=8, p_repeat=0.5)
    rows = R.repeat_span_rows(random_base(), cfg, 16, 1000, np.random.default_rng(0))
    ids, lag = rows.ids, rows.lag
    assert ids.shape == (16, 1000) and 0.35 < rows.repeat[:, 64:].float().mean() < 0.65
    r, t = torch.nonzero(rows.repeat, as_tuple=True)
    assert bool((lag[r, t] <= 64).all()) and bool((lag[r, t] >= 8).all())
    assert bool((ids[r, t] == ids[r, t - lag[r, t]]).all())


def test_recipe_batches_are_a_pure_function_of_seed_and_step():
    from experiments.data import Corpus
    corpus = Corpus(train=random_base(), heldout=random_base(seed=1), train_docs=["a"], heldout_docs=["b"], source="x")
    cfg = R.RecipeConfig(max_lag=32, span_len=8)
    f = R.RecipeBatches(corpus, cfg, seed=3, batch_size=4, row_len=65)
    assert torch.equal(f(5), f(5)) and not torch.equal(f(5), f(6))
    assert f(5).shape == (4, 65)


def test_gate_is_one_for_a_perfect_copier_and_low_for_chance():
    cfg = R.RecipeConfig(max_lag=64, span_len=8, p_repeat=0.5)
    rows = R.repeat_span_rows(random_base(), cfg, 8, 513, np.random.default_rng(0))
    perfect = torch.nn.functional.one_hot(rows.ids[:, 1:], 256).float() * 10  # (b, l, V)
    assert R.repeat_copy_accuracy(perfect, rows, cfg) == 1.0
    assert R.repeat_copy_accuracy(torch.zeros(8, 512, 256), rows, cfg) < 0.05
    # the gate: what reading the far half adds on the same bytes (a model that ignores it gains nothing)
    assert R.copy_margin(perfect, torch.zeros(8, 512, 256), rows, cfg) > 0.95
    assert R.copy_margin(perfect, perfect, rows, cfg) == 0.0


# ----------------------------------------------------------------------------------------------
# training from other initial states ([UE])
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["state_passing", "noise", "fitted_noise"])
def test_initial_states_change_training_only_after_the_first_step(tmp_path, mode):
    from experiments.data import copy_batch
    from experiments.train import TrainConfig, train
    kw = dict(d_model=32, n_layer=1, d_state=8, headdim=16, seq_len=16, batch_size=4, steps=3, eval_every=0,
              progress=False, ckpt_every=100, device="cpu", task="custom", warmup_steps=1, accelerate=False)
    batches = lambda step: copy_batch(step, seed=0, batch_size=4, seq_len=16, copy_len=4)  # noqa: E731
    zero = train(TrainConfig(out_dir=str(tmp_path / "zero"), **kw), batches)["loss_history"]
    other = train(TrainConfig(out_dir=str(tmp_path / mode), init_state=mode, **kw), batches)["loss_history"]
    assert other[0] == pytest.approx(zero[0], abs=1e-6)  # step 0 starts from zero in every mode
    assert abs(other[2] - zero[2]) > 1e-6, (mode, zero, other)


def test_init_state_is_validated():
    from experiments.train import TrainConfig
    with pytest.raises(ValueError, match="init_state"):
        TrainConfig(init_state="random")


# ----------------------------------------------------------------------------------------------
# the question script: per-seed rows, verdict order, resume, replot, publishing only from a clean tree
# ----------------------------------------------------------------------------------------------

def test_verdict_order_is_the_preregistered_one():
    from experiments import state_collapse as SC
    e16 = lambda lo: [{"k": 16, "excess": {"value": lo + 0.01, "lo": lo, "hi": lo + 0.02}}]  # noqa: E731
    ok = {"failed": None, "gate": 0.2, "horizon": {"value": 64}, "excess": e16(0.05)}
    assert SC.verdict(ok, 32) == "collapsed"
    assert SC.verdict({**ok, "excess": e16(0.0)}, 32) == "not collapsed"
    assert SC.verdict({**ok, "horizon": {"value": 8}}, 32) == "untestable"  # T/4
    assert SC.verdict({**ok, "horizon": {"value": None}}, 32) == "collapsed"  # censored above 4T: testable
    assert SC.verdict({**ok, "gate": float("nan")}, 32) == "gate-failed"
    assert SC.verdict({**ok, "gate": 0.0, "horizon": {"value": 8}}, 32) == "gate-failed"
    assert SC.verdict({**ok, "failed": "TrainingDiverged: ..."}, 32) == "failed"


@pytest.mark.slow  # six tiny models and every fix's tuning: a few minutes on 2 cores
def test_demo_reports_every_seed_and_fix_resumes_and_replots(tmp_path, capsys):
    import json
    from experiments import state_collapse as SC
    from experiments.sweep import latest_checkpoint
    args = ["--out_dir", str(tmp_path / "run"), "--d_model", "16", "--n_layer", "1", "--headdim", "8",
            "--train_lens", "32", "--d_states", "8", "--fix_cell", "32,8", "--seeds", "0", "--tokens_per_step", "256",
            "--steps", "2", "--eval_prompts", "3", "--val_prompts", "2", "--workers", "1", "--device", "cpu"]
    SC.main(args)
    text = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "state_collapse_summary.json").read_text())
    rows = summary["rows"]
    assert [r["variant"] for r in rows] == list(SC.VARIANTS)
    base = rows[0]
    assert set(base["E"]) == {"2", "4", "8", "16"} and set(base["fixes"]) == set(SC.FREE_FIXES)
    for r in rows[1:]:
        assert set(r["fixes"]) == {r["variant"]}  # each training-side fix against the same seed's base
    for name in list(SC.FREE_FIXES) + list(SC.VARIANTS[1:]):
        assert f"| {name} |" in text  # printed with its gain and cost
    assert "| base | 0 |" in text and "E(16)" in text
    for f in ("state_collapse_fixes.png", "state_collapse_loss.png", "state_collapse_summary.md", "config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "prereg_commit" in config
    # a rerun trains nothing; --replot rebuilds the same summary from the points alone
    stamp = latest_checkpoint(tmp_path / "run" / "models" / "d_state=8_seed=0_t_train=32_variant=base").stat().st_mtime
    SC.main(args)
    assert latest_checkpoint(tmp_path / "run" / "models" / "d_state=8_seed=0_t_train=32_variant=base").stat().st_mtime == stamp
    before = (tmp_path / "run" / "state_collapse_summary.json").read_text()
    SC.main(["--replot", "--out_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "state_collapse_summary.json").read_text() == before


def test_publish_refuses_a_dirty_tree(monkeypatch, tmp_path):
    from experiments import publish as PB
    from experiments import state_collapse as SC
    monkeypatch.setattr(PB, "git_commit", lambda: "abc123+dirty")
    with pytest.raises(SystemExit, match="dirty"):
        SC.publish(tmp_path)


def test_gpu_script_calibration_measures_the_real_step_on_cpu():
    """The GPU script is never run in CI; its calibration is, at toy size on CPU, for a second."""
    from experiments import state_collapse as SC
    from experiments import state_collapse_gpu as G
    cfg = SC.DemoConfig(d_model=16, n_layer=1, headdim=8, train_lens=(32,), d_states=(8,), fix_cell=(),
                        tokens_per_step=256, device="cpu", workers=1, seeds=(0,))
    assert G.calibrate(cfg, seconds=0.5) > 0
    gpu = SC.DemoConfig(**{k: v for k, v in G.GPU.items() if k != "device"}, device="cpu")  # the GPU size is valid
    assert gpu.d_model == 256 and gpu.n_layer == 6 and gpu.d_states == (128,)
