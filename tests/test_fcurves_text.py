"""Tests for experiments/fcurves_text.py: the convergence verdict inside the script's flow (an
unconverged model is kept, marked and measured), the in-window / beyond-T_train split, the Transformer's
gate, config validation, and a tiny run end to end (a few training steps, 3 lengths, 5 samples).

All on CPU, in well under 30 s together (the tiny models train 20 steps each).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import forgetting_curve as fc
from experiments import fcurves_text as F

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 110  # characters per line of the script (as tests/test_readme.py's READABLE_WIDTH)
TINY = dict(d_model=16, n_layer=1, d_states=(16,), t_train=32, rows=2, steps=20, warmup_steps=2, log_every=1,
            window=5, lengths=(4, 8, 16), n_samples=5, chunk_size=16, eval_batch=10, workers=1, seeds=(0,))
TINY_LRS = {"mamba2_n16": 1e-2, "transformer": 1e-2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A whole reported run of the tiny config (LR_BY_ARCH patched): (config, summary)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(F, "LR_BY_ARCH", TINY_LRS)
    cfg = F.FCTextConfig(out_dir=str(tmp_path_factory.mktemp("fcurves_text") / "run"), **TINY)
    summary = F.run(cfg)
    yield cfg, summary
    patch.undo()


# ----------------------------------------------------------------------------------------------
# Convergence: refused, kept, counted
# ----------------------------------------------------------------------------------------------

def test_an_undertrained_model_is_unconverged_kept_and_measured(tiny_run):
    cfg, summary = tiny_run
    assert [m["arch"] for m in summary["models"]] == ["mamba2_n16", "transformer"]
    for m in summary["models"]:
        assert m["N"] == 1 and m["unconverged"] == ["0"], m["unconverged"]   # counted in N, not dropped
        seed = m["per_seed"]["0"]
        assert seed["convergence"]["verdict"] == "unconverged"
        conv = seed["convergence"]
        assert conv["last_mean"] > cfg.loss_ceiling or conv["rel_drop"] > cfg.rel_tol
        assert "has not converged" in conv["message"] or "ceiling" in conv["message"]
        for mode in ("random", "text"):  # curves measured all the same
            assert seed["curves"][mode]["lengths"] == list(cfg.lengths)
    md = (Path(cfg.out_dir) / f"{F.PREFIX}_summary.md").read_text()
    assert md.count("UNCONVERGED") == 2 and "| 0/1 |" in md


def test_convergence_verdict_on_hand_made_curves():
    cfg = F.FCTextConfig(**{**TINY, "out_dir": "unused"})
    flat = [1.0] * 10
    assert F.convergence_verdict(cfg, flat, run="flat")["verdict"] == "converged"
    falling = [1.4] * 5 + [1.2] * 5
    out = F.convergence_verdict(cfg, falling, run="falling")
    assert out["verdict"] == "unconverged" and out["rel_drop"] == pytest.approx(0.2 / 1.4)
    high = F.convergence_verdict(cfg, [2.0] * 10, run="high")
    assert high["verdict"] == "unconverged" and "ceiling" in high["message"] and high["last_mean"] == 2.0


# ----------------------------------------------------------------------------------------------
# The in-window / beyond split and the gate
# ----------------------------------------------------------------------------------------------

def test_in_window_means_the_whole_copy_sample_fits_in_t_train():
    for L in (4, 30, 31, 126, 128):
        lay = fc.make_layouts(L, 2, np.random.default_rng(0), bos_id=0, eos_id=0, vocab_size=256)
        assert lay.ids.shape[1] == 2 * L + 3                               # the layout the rule counts
        assert F.in_window(L, 64) == (L <= 30) and F.in_window(L, 256) == (L <= 126)
    lengths = [4, 8, 16, 32, 64]
    stored = {"lengths": lengths, "copy_acc": [[1.0] * 6] * 5, "lm_acc": [[0.0] * 6] * 5}
    r = F.read_curve(stored, t_train=64)
    assert r["in_window_lengths"] == [4, 8, 16] and r["beyond_lengths"] == [32, 64]
    assert r["in_window"] == {"fine": 16, "coarse": 16} and r["all"] == {"fine": 64, "coarse": 64}
    none_inside = F.read_curve({**stored, "lengths": [32, 64, 128, 256, 512]}, t_train=64)
    assert none_inside["in_window"] == {"fine": None, "coarse": None}


def test_transformer_gate_reads_hand_made_curves():
    lengths = [4, 8, 16, 32, 64]
    perfect = F.read_curve({"lengths": lengths, "copy_acc": [[1.0] * 6] * 3 + [[0.2] * 6] * 2,
                            "lm_acc": [[0.0] * 6] * 5}, t_train=64)
    assert F.transformer_gate(perfect)["passed"]                           # beyond the window does not count
    copy = [[1.0] * 6, [1.0] * 5 + [0.9], [1.0] * 6, [1.0] * 6, [1.0] * 6]  # L = 8 averages 0.983
    gate = F.transformer_gate(F.read_curve({"lengths": lengths, "copy_acc": copy, "lm_acc": [[0.0] * 6] * 5},
                                           t_train=64))
    assert not gate["passed"] and [L for L, _ in gate["failing"]] == [8] and "L=8: 0.983" in gate["message"]


def test_the_tiny_transformer_gate_is_reported(tiny_run):
    _, summary = tiny_run
    tf = summary["models"][1]
    assert tf["per_seed"]["0"]["gate"]["passed"] is False and tf["gate_failed"] == ["0"]


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(modes=("copy",)), "--modes"),
    (dict(n_samples=3), "n_samples must be >= 5"),
    (dict(steps=9), "2 windows of 5"),
    (dict(tf_max_len=2), "tf_max_len"),
    (dict(t_train=10), "holds no copy sample"),
    (dict(d_states=(16, 16)), "d_states"),
    (dict(d_states=(), transformer=False), "no model"),
    (dict(tune_archs=("mamba2_big",)), "tune_archs"),
    (dict(lengths=(8, 4)), "strictly increasing"),
    (dict(out_dir=F.DEFAULT_OUT, seeds=(1001,)), "tuning seeds"),
    (dict(window=0), "window"),
])
def test_config_errors_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        F.FCTextConfig(**{**TINY, "out_dir": "unused", **change})


def test_a_reported_run_needs_the_tuned_lrs(monkeypatch):
    monkeypatch.setattr(F, "LR_BY_ARCH", {"transformer": 1e-3})
    with pytest.raises(ValueError, match=r"no learning rate for \['mamba2_n16'\]"):
        F.report_points(F.FCTextConfig(**{**TINY, "out_dir": "unused"}))


def test_presets_parse():
    parser = F.build_parser()
    assert F.config_of(parser.parse_args(["--quick"])) == F.FCTextConfig(quick=True)
    gpu = F.config_of(parser.parse_args(["--gpu", "--seeds", "0"]))
    assert gpu.t_train == 2048 and gpu.device == "cuda" and gpu.seeds == (0,) and gpu.lengths[-1] == 16384
    with pytest.raises(ValueError, match="one"):
        F.config_of(parser.parse_args(["--gpu", "--quick"]))


def test_the_script_fits_the_width():
    lines = (ROOT / "experiments" / "fcurves_text.py").read_text().splitlines()
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > WIDTH]
    assert not wide, f"lines {wide} are wider than {WIDTH}"


# ----------------------------------------------------------------------------------------------
# End to end: outputs, rerun reuses, replot, tuning
# ----------------------------------------------------------------------------------------------

def test_tiny_run_end_to_end_writes_and_reuses(tiny_run, monkeypatch):
    cfg, summary = tiny_run
    out = Path(cfg.out_dir)
    for name in (f"{F.PREFIX}_summary.json", f"{F.PREFIX}_random.png", f"{F.PREFIX}_text.png", "config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "points").glob("*.json")) == [
        "arch=mamba2_n16_lr=0.01_seed=0.json", "arch=transformer_lr=0.01_seed=0.json"]
    assert json.loads((out / f"{F.PREFIX}_summary.json").read_text())["seeds"] == [0]
    again = F.run(cfg)                                                     # stored points: no training
    record = json.loads((out / "config.json").read_text())
    assert record["invocations"][-1]["points_computed"] == [] and again["models"] == summary["models"]
    assert F.replot(out)["models"] == summary["models"]


def test_tune_writes_the_lr_table(tmp_path):
    cfg = F.FCTextConfig(**{**TINY, "out_dir": str(tmp_path / "run"), "tune": True,
                            "tune_archs": ("transformer",)})
    table = F.run(cfg)
    assert [r["lr"] for r in table["rows"]] == list(F.TUNE_LRS) and table["seed"] == F.TUNE_SEED
    best = min(table["rows"], key=lambda r: r["final_heldout_loss"])
    assert table["chosen_lr"] == {"transformer": best["lr"]}
    assert json.loads((tmp_path / "run_tune" / "tune.json").read_text()) == json.loads(json.dumps(table))
    assert all(list(r["copy_in_window"]) == [4, 8] for r in table["rows"])  # 2L + 3 <= 32: L <= 14
