"""Tests of experiments/measure_curve.py: resume and its refusals, out-of-memory, progress, the command line.

The oracle models (Copier, StatefulCopier) are those of tests/test_forgetting_curve.py: causal functions
with a known memory.
"""

import json

import numpy as np
import pytest
import torch

import forgetting_curve as fc
from experiments import measure_curve as mc
from test_forgetting_curve import V, Copier, FailsBeyond, StatefulCopier


def run(model, lengths, out, **kw):
    kw.setdefault("vocab_size", V)
    kw.setdefault("n_samples", 10)
    kw.setdefault("progress", False)
    return mc.measure_curve(model, lengths=lengths, out=out, **kw)


def fresh(model, lengths, **kw):
    """The same measurement by forgetting_curve.py alone (no resume, no file)."""
    return fc.forgetting_curve(model, lengths=lengths, vocab_size=V, n_samples=10, **kw)


class Bigram(torch.nn.Module):
    """A tiny real model: logits = a table row of the current token (weights set by the seed)."""

    def __init__(self, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return self.table[ids]                                        # (b, l, V)


# ---------------------------------------------------------------------------------------------
# The same measurement as forgetting_curve.py; out-of-memory; progress
# ---------------------------------------------------------------------------------------------

def test_measure_curve_equals_forgetting_curve(tmp_path):
    model = StatefulCopier(K=40, K2=90, p=0.5)
    got = run(model, [8, 32, 64], tmp_path / "c.json", seed=5, chunk_size=16)
    ref = fresh(model, [8, 32, 64], seed=5, chunk_size=16)
    np.testing.assert_array_equal(got.copy_acc, ref.copy_acc)
    np.testing.assert_array_equal(got.lm_acc, ref.lm_acc)
    assert {k: v for k, v in got.meta.items() if k != "fingerprint"} == ref.meta
    with pytest.raises(TypeError, match="unexpected keyword"):       # forgetting_curve's arguments only
        run(model, [8], tmp_path / "c.json", sample=3)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                                 MemoryError()])
def test_out_of_memory_keeps_measured_lengths(tmp_path, exc):
    out = tmp_path / "curve.json"
    curve = run(FailsBeyond(2 * 32 + 3, exc), [8, 16, 32, 64, 128], out)
    assert curve.lengths.tolist() == [8, 16, 32]
    assert list(curve.errors) == [64] and type(exc).__name__ in curve.errors[64]
    saved = fc.ForgettingCurve.load(out)
    assert saved.lengths.tolist() == [8, 16, 32] and list(saved.errors) == [64]
    np.testing.assert_array_equal(saved.copy_acc, curve.copy_acc)


def test_other_errors_propagate_after_saving(tmp_path):
    out = tmp_path / "curve.json"
    with pytest.raises(ValueError, match="a bug"):
        run(FailsBeyond(2 * 16 + 3, ValueError("a bug")), [8, 16, 32], out)
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 16]


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    run(Copier(), [8, 16], tmp_path / "c.json", progress=True)
    captured = capsys.readouterr()
    total = 2 * 10 * (19 + 35)                                        # 2n sequences of 2L + 3 tokens
    assert "forgetting curve [" in captured.err and f"{total}/{total}" in captured.err and captured.out == ""


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def test_resume_measures_only_missing_lengths_and_equals_a_fresh_run(tmp_path):
    out = tmp_path / "c.json"
    calls = []

    def model(ids):
        if ids.shape[0] > 1:                                         # not the 1-row fingerprint probe
            calls.append(ids.shape[1])
        return Copier(K=40, K2=90, p=0.5)(ids)

    run(model, [8, 64], out, seed=3)
    calls.clear()
    resumed = run(model, [8, 32, 64, 128], out, seed=3, resume=True)
    assert sorted(set(calls)) == [2 * 32 + 3, 2 * 128 + 3]            # only the new lengths ran
    ref = fresh(model, [8, 32, 64, 128], seed=3)
    np.testing.assert_array_equal(resumed.copy_acc, ref.copy_acc)
    np.testing.assert_array_equal(resumed.lm_acc, ref.lm_acc)
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 32, 64, 128]
    calls.clear()
    again = run(model, [8, 32, 64, 128], out, seed=3, resume=True)   # everything done already
    assert calls == [] and again.lengths.tolist() == [8, 32, 64, 128]
    np.testing.assert_array_equal(again.copy_acc, ref.copy_acc)
    # an out-of-memory error after resumed lengths keeps them in the file too (the same model,
    # which runs out of memory beyond L = 128)
    def failing_model(ids):
        if ids.shape[1] > 2 * 128 + 3:
            raise MemoryError()
        return model(ids)

    failing = run(failing_model, [8, 32, 64, 128, 256], out, seed=3, resume=True)
    assert failing.lengths.tolist() == [8, 32, 64, 128] and list(failing.errors) == [256]
    assert fc.ForgettingCurve.load(out).lengths.tolist() == [8, 32, 64, 128]
    with pytest.raises(ValueError, match="settings differ"):
        run(model, [8], out, seed=4, resume=True)
    with pytest.raises(ValueError, match="resume=True needs out="):
        run(model, [8], None, resume=True)


def test_resume_refuses_another_model(tmp_path):
    out = tmp_path / "c.json"
    run(Bigram(seed=0), [8, 16], out)
    with pytest.raises(ValueError, match="logits on the fixed probe differ"):
        run(Bigram(seed=1), [8, 16, 32], out, resume=True)             # same class, other weights
    with pytest.raises(ValueError, match="another model class"):
        run(Copier(), [8, 16, 32], out, resume=True)
    # the same model whose logits moved by rounding noise only (another device / thread count)
    noisy = Bigram(seed=0)
    with torch.no_grad():
        noisy.table.mul_(1 + 1e-7)
    resumed = run(noisy, [8, 16, 32], out, resume=True)
    assert resumed.lengths.tolist() == [8, 16, 32]


def test_resume_refuses_other_text_of_the_same_length(tmp_path):
    out = tmp_path / "c.json"
    text = torch.from_numpy(np.random.default_rng(0).integers(1, V, 400))
    other = text.flip(0)                                              # same ids, same count, other text
    run(Copier(), [8], out, tokens=text)
    with pytest.raises(ValueError, match="other text"):
        run(Copier(), [8, 16], out, tokens=other, resume=True)
    assert run(Copier(), [8, 16], out, tokens=text, resume=True).lengths.tolist() == [8, 16]


def test_resume_refuses_another_chunk_size(tmp_path):
    """Chunking is a setting of the measurement: the old fingerprint did not cover it."""
    out = tmp_path / "c.json"
    run(StatefulCopier(), [8, 16], out, chunk_size=8)
    with pytest.raises(ValueError, match=r"settings differ.*chunk_size"):
        run(StatefulCopier(), [8, 16, 32], out, chunk_size=32, resume=True)
    assert run(StatefulCopier(), [8, 16, 32], out, chunk_size=8, batch_size=3, resume=True).lengths.size == 3


def test_resume_refuses_another_sliding_window(tmp_path):
    """A sliding window longer than the fingerprint probe leaves the probe's logits unchanged: the old
    code resumed a curve measured under window 32 as if it were window 64. The caller's meta (here as
    experiments/forgetting_curves.py writes it) is part of the fingerprint now."""
    minimamba = pytest.importorskip("minimamba")
    import mitigations
    torch.manual_seed(0)
    model = minimamba.Mamba2LM(minimamba.Mamba2Config(d_model=32, n_layer=1, vocab_size=V, d_state=16,
                                                      headdim=16, chunk_size=16)).eval()
    kw = dict(n_samples=5, chunk_size=16)
    sketches = []
    for window in (32, 64):                                          # the probe: 2 * 4 + 3 = 11 tokens
        with mitigations.sliding_window(model, window):
            run(model, [4, 40], tmp_path / f"w{window}.json", meta={"mitigation": f"sliding window r={window}"}, **kw)
        sketches.append(json.loads((tmp_path / f"w{window}.json").read_text())["meta"]["fingerprint"]["probe_sketch"])
    assert sketches[0] == sketches[1]                                # the probe cannot tell the windows apart
    out = tmp_path / "w32.json"
    with mitigations.sliding_window(model, 64):
        with pytest.raises(ValueError, match=r"another description in meta=.*mitigation"):
            run(model, [4, 40, 80], out, meta={"mitigation": "sliding window r=64"}, resume=True, **kw)
        with pytest.raises(ValueError, match=r"another description in meta="):   # or none at all
            run(model, [4, 40, 80], out, resume=True, **kw)
    with mitigations.sliding_window(model, 32):
        resumed = run(model, [4, 40, 80], out, meta={"mitigation": "sliding window r=32"}, resume=True, **kw)
    assert resumed.lengths.tolist() == [4, 40, 80]


def test_resume_refuses_another_model_config(tmp_path):
    """The model's config holds settings a short probe cannot see, e.g. the SSD chunk size."""
    minimamba = pytest.importorskip("minimamba")
    torch.manual_seed(0)
    cfg = minimamba.Mamba2Config(d_model=32, n_layer=1, vocab_size=V, d_state=16, headdim=16, chunk_size=16)
    model = minimamba.Mamba2LM(cfg).eval()
    out = tmp_path / "c.json"
    run(model, [4], out, n_samples=5)
    other = minimamba.Mamba2LM(minimamba.Mamba2Config(**{**vars(cfg), "chunk_size": 64})).eval()
    other.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"another model configuration \(differs in \['chunk_size'\]\)"):
        run(other, [4, 8], out, n_samples=5, resume=True)


def test_old_file_without_a_full_fingerprint_plots_but_does_not_resume(tmp_path):
    out = tmp_path / "old.json"
    curve = fresh(Copier(K=40, K2=40), [8, 64])                       # forgetting_curve.py: no fingerprint
    data = curve.to_dict()
    data["format"] = "minimamba.forgetting_curve/1"
    out.write_text(json.dumps(data))
    old = fc.ForgettingCurve.load(out)                                # readable: re-plot, re-read
    assert old.fine_grained_length() == 8
    with pytest.raises(ValueError, match="fingerprint lacks"):
        run(Copier(K=40, K2=40), [8, 64, 128], out, resume=True)
    # a /2 file of the older fingerprint (no model config, no meta) is refused too
    run(Copier(K=40, K2=40), [8, 64], out)
    data = json.loads(out.read_text())
    del data["meta"]["fingerprint"]["meta"], data["meta"]["fingerprint"]["model_config"]
    out.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"fingerprint lacks \['model_config', 'meta'\]"):
        run(Copier(K=40, K2=40), [8, 64, 128], out, resume=True)
    mc.main(["--from_json", str(out), "--out_dir", str(tmp_path / "re")])
    assert (tmp_path / "re" / "curve.png").exists()


def test_corrupt_json_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "curve.json"
    for text in ("{not json", '{"format": "minimamba.forgetting_curve/2", "lengths": [8]}', "[1, 2]"):
        bad.write_text(text)
        with pytest.raises(ValueError, match=str(bad)):
            run(Copier(), [8], bad, resume=True)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_cli_on_a_tiny_checkpoint(tmp_path):
    minimamba = pytest.importorskip("minimamba")
    torch.manual_seed(0)
    cfg = minimamba.Mamba2Config(d_model=32, n_layer=1, vocab_size=256, d_state=16, headdim=16,
                                 chunk_size=16)
    from checkpoints import save_pretrained
    save_pretrained(minimamba.Mamba2LM(cfg), tmp_path / "ckpt")
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, 3000, dtype=np.uint8)))
    curve = mc.main(["--checkpoint", str(tmp_path / "ckpt"), "--lengths", "4,40", "--text", str(text),
                     "--n_samples", "5", "--chunk_size", "32", "--train_length", "16",
                     "--out_dir", str(tmp_path / "out")])
    saved = fc.ForgettingCurve.load(tmp_path / "out" / "curve.json")
    np.testing.assert_array_equal(saved.copy_acc, curve.copy_acc)
    assert saved.meta["bos_id"] == 0 and saved.meta["chunk_size"] == 32 and saved.meta["train_length"] == 16
    assert (tmp_path / "out" / "curve.png").stat().st_size > 10_000
    rand = mc.main(["--checkpoint", str(tmp_path / "ckpt"), "--lengths", "4", "--random_tokens",
                    "--n_samples", "5", "--out_dir", str(tmp_path / "rand")])
    assert rand.meta["text"] == "random" and rand.copy_acc.shape == (1, 5)
    redrawn = mc.main(["--from_json", str(tmp_path / "out" / "curve.json"), "--out_dir", str(tmp_path / "re"),
                       "--significance", "t-test"])
    np.testing.assert_array_equal(redrawn.copy_acc, curve.copy_acc)
    assert (tmp_path / "re" / "curve.png").stat().st_size > 10_000
    # --resume: the lengths of curve.json are reused, only L = 60 is measured
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--lengths", "4,40,60", "--text", str(text),
            "--n_samples", "5", "--chunk_size", "32", "--out_dir", str(tmp_path / "out")]
    resumed = mc.main(args + ["--resume"])
    assert resumed.lengths.tolist() == [4, 40, 60]
    np.testing.assert_array_equal(resumed.copy_acc[:2], curve.copy_acc)
    assert resumed.seconds[0] == saved.seconds[0]                     # reused, not re-measured
    other = tmp_path / "other.txt"
    other.write_bytes(text.read_bytes()[::-1])
    with pytest.raises(ValueError, match="other text"):
        mc.main(args[:5] + [str(other)] + args[6:] + ["--resume"])
    with pytest.raises(ValueError, match=r"settings differ.*chunk_size"):
        mc.main(args[:-3] + ["64", "--out_dir", str(tmp_path / "out"), "--resume"])


def test_cli_refuses_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    for argv in (["--checkpoint", "x", "--lengths", "4", "--out_dir", str(tmp_path / "file")],   # not a folder
                 ["--checkpoint", "x", "--lengths", "4", "--significance", "wilcoxon"],
                 ["--checkpoint", "x", "--lengths", "4", "--random_ids", "1,2,3"],
                 ["--lengths", "4"]):
        with pytest.raises(SystemExit):
            mc.main(argv)


def test_read_byte_tokens_names_what_is_not_a_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ab")
    assert mc.read_byte_tokens([tmp_path / "a.txt"]).tolist() == [97, 98]
    for bad in (tmp_path, tmp_path / "missing.txt"):
        with pytest.raises(FileNotFoundError, match="is not a file"):
            mc.read_byte_tokens([bad])
