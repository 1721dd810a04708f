"""Tests for experiments/: the data loader, the training loop (loss goes down, exact resume, DDP on
gloo equals one process, atomic checkpoints) and the first demo's collapse criteria (experiments/collapse_v1.py).

All run on CPU in well under a minute together, on a tiny corpus written into a temporary folder.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import train as T
from experiments.common import RunFolderError, parse_config
from experiments.data import DOC_SEP, VOCAB_SIZE, Corpus, newline_probe
from experiments import collapse_v1 as SC

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Twelve small deterministic 'documents' of Python-like text."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(60)]
        (d / f"doc{i:02d}.py").write_text("".join(lines))
    return d


def tiny_config(corpus_dir: Path, out_dir: Path, **kw) -> T.TrainConfig:
    base = dict(d_model=32, n_layer=1, d_state=16, headdim=16, chunk_size=16, data=str(corpus_dir),
                seq_len=16, n_segments=2, batch_size=4, grad_accum=1, steps=12, lr=1e-2, warmup_steps=2,
                out_dir=str(out_dir), seed=0, log_every=1, eval_every=0, ckpt_every=6, keep_ckpts=3,
                progress=False, threads=1)
    base.update(kw)
    return T.TrainConfig(**base)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def test_loader_deterministic_and_split_disjoint(corpus_dir):
    a, b = Corpus.load(corpus_dir), Corpus.load(corpus_dir)
    assert a.train_docs == b.train_docs and a.heldout_docs == b.heldout_docs
    assert set(a.train_docs).isdisjoint(a.heldout_docs), "a document is on both sides of the split"
    assert sorted(a.train_docs + a.heldout_docs) == sorted(p.name for p in corpus_dir.iterdir())
    assert (a.train == b.train).all() and (a.heldout == b.heldout).all()
    # no held-out document's text occurs in the train stream
    for name in a.heldout_docs:
        text = (corpus_dir / name).read_bytes()
        assert text not in a.train.tobytes(), f"held-out {name} found in the train stream"
    x1 = a.batch(5, seed=3, batch_size=6, seq_len=16, n_segments=2)
    x2 = b.batch(5, seed=3, batch_size=6, seq_len=16, n_segments=2)
    assert x1.shape == (6, 33) and torch.equal(x1, x2)
    assert not torch.equal(x1, a.batch(6, seed=3, batch_size=6, seq_len=16, n_segments=2))
    # a rank's slice is exactly its rows of the global batch
    assert torch.equal(a.batch(5, seed=3, batch_size=6, seq_len=16, n_segments=2, rows=slice(3, 6)), x1[3:6])
    assert int(x1.max()) < VOCAB_SIZE and int(x1.min()) >= 0
    assert (a.train == DOC_SEP).sum() == len(a.train_docs)  # one separator per document
    probe = newline_probe(10)
    assert probe.shape == (1, 11) and (probe == ord("\n")).all()


def test_copy_episodes_and_mix_rows(corpus_dir):
    from experiments.data import copy_batch
    x = copy_batch(3, seed=0, batch_size=4, seq_len=20, n_segments=2, copy_len=5)  # (4, 41)
    assert x.shape == (4, 41) and torch.equal(x, copy_batch(3, seed=0, batch_size=4, seq_len=20, n_segments=2,
                                                              copy_len=5))
    for e in range(4):  # every episode is r then r again; DOC_SEP never drawn
        ep = x[:, e * 10:(e + 1) * 10]
        assert torch.equal(ep[:, :5], ep[:, 5:]), f"episode {e} is not a copy"
    assert not torch.equal(x[:, :5], x[:, 10:15]) and int(x.min()) >= 1
    cfg = T.TrainConfig(task="mix", seq_len=20, n_segments=2, batch_size=4, copy_len=5, data=str(corpus_dir))
    c = Corpus.load(corpus_dir)
    rows = T.task_batch(c, cfg, 3)
    text = c.batch(3, seed=0, batch_size=4, seq_len=20, n_segments=2)
    assert torch.equal(rows[0::2], text[0::2]) and torch.equal(rows[1::2], x[1::2])
    assert torch.equal(T.task_batch(c, cfg, 3), rows), "a batch is a pure function of (seed, step)"


def test_default_corpus_is_the_stdlib():
    c = Corpus.load()
    assert len(c.train_docs) > 100 and len(c.heldout_docs) > 5
    assert set(c.train_docs).isdisjoint(c.heldout_docs)
    assert all("site-packages" not in n for n in c.train_docs + c.heldout_docs)


# ------------------------------------------------------------------------------------------------
# one command-line convention
# ------------------------------------------------------------------------------------------------

SCRIPTS = sorted(f"experiments.{p.stem}" for p in (ROOT / "experiments").glob("*.py")
                 if "def main(" in p.read_text())


def test_every_script_is_listed():
    assert {"experiments.train", "experiments.state_collapse", "experiments.state_capacity", "experiments.passkey",
            "experiments.forgetting_curves", "experiments.figures", "experiments.bench",
            "experiments.bench_mitigations", "experiments.check_equivalence", "experiments.gpu_check"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_snake_case_with_help_and_its_default(name):
    """Walk the script's parser: every flag --snake_case, with help text that states its default."""
    import argparse
    import importlib
    import re
    parser = importlib.import_module(name).build_parser()
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert flags, f"{name} has no flags"
    for action in flags:
        for option in action.option_strings:
            assert re.fullmatch(r"--[a-z][a-z0-9_]*", option), f"{name}: {option} is not a --snake_case flag"
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings} has no help"
        text = action.help % {"default": action.default}
        assert "default" in text or (action.required and "required" in text), \
            f"{name}: the help of {action.option_strings} does not state its default: {text!r}"


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def test_config_validation_and_cli():
    with pytest.raises(ValueError, match="grad_accum"):
        T.TrainConfig(batch_size=5, grad_accum=2)
    with pytest.raises(ValueError, match="headdim"):
        T.TrainConfig(d_model=24, headdim=64)
    for name in ("lr", "weight_decay", "grad_clip"):  # NaN passed every range check (lr: a raw torch error)
        with pytest.raises(ValueError, match=f"--{name} must be a finite number"):
            T.TrainConfig(**{name: float("nan")})
    cfg = parse_config(T.TrainConfig, ["--seq_len", "32", "--resume", "--lr", "0.01", "--amp", "false"], "")
    assert cfg.seq_len == 32 and cfg.resume is True and cfg.lr == 0.01 and cfg.amp is False
    with pytest.raises(ValueError, match="--arch transformer does not use --d_state"):
        T.TrainConfig(arch="transformer", d_state=128)
    with pytest.raises(ValueError, match="n_segments must be 1"):
        T.TrainConfig(arch="transformer", n_segments=2)


def test_lr_schedule_warmup_then_decay():
    cfg = T.TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [T.lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:])), "lr must not increase after warmup"
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_no_weight_decay_on_ssm_params_and_norms():
    from minimamba import Mamba2LM
    cfg = T.TrainConfig(d_model=32, n_layer=1, d_state=16, headdim=16)
    model = Mamba2LM(cfg.model_config())
    opt = T.make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for leaf in ("dt_bias", "A_log", "D", "norm.weight"):
        assert any(n.endswith(leaf) for n in no_decay) and not any(n.endswith(leaf) for n in decay), leaf
    assert any(n.endswith("in_proj.weight") for n in decay)


def test_few_steps_reduce_loss(corpus_dir, tmp_path):
    res = T.train(tiny_config(corpus_dir, tmp_path / "run", steps=25))
    h = res["loss_history"]
    first, last = sum(h[:3]) / 3, sum(h[-3:]) / 3
    assert last < first - 0.5, f"loss did not go down: first3 {first:.3f}, last3 {last:.3f}"
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 26 and rows[0].startswith("step,")


def test_resume_reproduces_uninterrupted_run_exactly(corpus_dir, tmp_path):
    full = T.train(tiny_config(corpus_dir, tmp_path / "full"))["loss_history"]
    part1 = T.train(tiny_config(corpus_dir, tmp_path / "cut", stop_at=6))  # "killed" after step 6
    assert part1["step"] == 6 and T.latest_checkpoint(tmp_path / "cut").name == "step_00000006"
    part2 = T.train(tiny_config(corpus_dir, tmp_path / "cut", resume=True))["loss_history"]
    resumed = part1["loss_history"] + part2
    assert len(resumed) == len(full) == 12
    diffs = [abs(a - b) for a, b in zip(full, resumed)]
    assert resumed == full, f"resumed run differs: max |diff| {max(diffs):.3e}, per step {diffs}"
    # the final weights agree bit for bit as well
    from minimamba import Mamba2LM
    wa = Mamba2LM.from_pretrained(T.latest_checkpoint(tmp_path / "full") / "model").state_dict()
    wb = Mamba2LM.from_pretrained(T.latest_checkpoint(tmp_path / "cut") / "model").state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |diff| {(wa[k] - wb[k]).abs().max():.3e}"
    steps = [int(r.split(",")[0]) for r in (tmp_path / "cut" / "metrics.csv").read_text().split()[1:]]
    assert steps == list(range(1, 13)), "metrics.csv must hold exactly one row per step after a resume"


def test_interrupted_checkpoint_write_never_loads_as_complete(corpus_dir, tmp_path, monkeypatch):
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=12, ckpt_every=6)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):  # the second checkpoint's trainer.pt write is "killed"
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"half a file")
            raise KeyboardInterrupt("simulated kill during checkpoint write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(T.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(T.torch, "save", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert partial, "the interrupted write should have left its temporary directory behind"
    assert T.latest_checkpoint(tmp_path / "run").name == "step_00000006"
    with pytest.raises(T.CheckpointError, match="not a complete checkpoint"):
        from minimamba import Mamba2LM
        T.load_checkpoint(partial[0], Mamba2LM(cfg.model_config()))
    # resuming continues from step 6 and finishes; the killed write's temporary folder is gone
    res = T.train(dataclasses.replace(cfg, resume=True))
    assert res["step"] == 12 and len(res["loss_history"]) == 6
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")], "stale temporary folder kept"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_one_process(corpus_dir, tmp_path):
    common = ["--d_model", "32", "--n_layer", "1", "--d_state", "16", "--headdim", "16", "--chunk_size", "16",
              "--data", str(corpus_dir), "--seq_len", "16", "--n_segments", "2", "--batch_size", "4",
              "--steps", "3", "--lr", "1e-2", "--warmup_steps", "1", "--eval_every", "0", "--progress", "false",
              "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "experiments.train", *common, "--out_dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "experiments.train", *common, "--out_dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    from minimamba import Mamba2LM
    wa = Mamba2LM.from_pretrained(T.latest_checkpoint(tmp_path / "one") / "model").state_dict()
    wb = Mamba2LM.from_pretrained(T.latest_checkpoint(tmp_path / "two") / "model").state_dict()
    moved = max((wa[k] - Mamba2LM(T.TrainConfig(d_model=32, n_layer=1, d_state=16, headdim=16).model_config())
                 .state_dict()[k]).abs().max().item() for k in wa if k.endswith("in_proj.weight"))
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for k in wa:
        diff = (wa[k] - wb[k]).abs()
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), \
            f"{k}: 2-process DDP differs from 1 process: max {diff.max():.3e}, mean {diff.mean():.3e}"


# ------------------------------------------------------------------------------------------------
# one loop for every model and loss
# ------------------------------------------------------------------------------------------------

def test_fused_adamw_equals_the_per_parameter_loop():
    """make_optimizer's fused AdamW takes the same steps as torch's reference loop (foreach=False)."""
    from minimamba import Mamba2LM
    cfg = T.TrainConfig(d_model=32, n_layer=1, d_state=16, headdim=16, chunk_size=16)
    ids = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = Mamba2LM(cfg.model_config())
        opt = T.make_optimizer(m, cfg)
        if not fused:
            opt = torch.optim.AdamW(opt.param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
        assert opt.defaults.get("fused") is (True if fused else None)
        for _ in range(5):
            opt.zero_grad()
            T.lm_loss(m(ids[:, :-1])[0], ids[:, 1:]).backward()
            opt.step()
        models.append(m)
    diffs = [(a - b).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters())]
    assert max(diffs) < 1e-5, f"fused vs reference AdamW after 5 steps: max |diff| {max(diffs):.3e}"


def test_masks_and_weights_train_the_same_and_shapes_are_checked(corpus_dir, tmp_path):
    """A bool mask and the same 0/1 float weights give identical runs; a mask is not ignored."""
    corpus = Corpus.load(corpus_dir)
    cfg = tiny_config(corpus_dir, tmp_path / "a", task="custom", n_segments=2, steps=3, ckpt_every=3)

    def batch(step, as_float=False, everything=False):
        rows = corpus.batch(step, seed=0, batch_size=4, seq_len=16, n_segments=2)  # (4, 33)
        mask = torch.zeros(4, 32, dtype=torch.bool)
        mask[:, 20:] = not everything
        mask[:, :20] = everything
        return rows, (mask.float() if as_float else mask)

    a = T.train(cfg, batch_fn=batch)["loss_history"]
    b = T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), batch_fn=lambda s: batch(s, True))["loss_history"]
    c = T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "c")), batch_fn=lambda s: batch(s, False, True))
    assert a == b, f"bool mask {a} vs float weights {b}"
    assert a[0] != c["loss_history"][0], "other targets in the loss must give another loss"
    with pytest.raises(ValueError, match=r"loss weights must have shape \(4, 32\)"):
        T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "d")), batch_fn=lambda s: (batch(s)[0], torch.ones(4, 16)))
    with pytest.raises(ValueError, match="positive sum"):
        T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "e")), batch_fn=lambda s: (batch(s)[0], torch.zeros(4, 32)))
    with pytest.raises(ValueError, match="batch_fn exactly when --task is custom"):
        T.train(dataclasses.replace(cfg, task="lm"), batch_fn=batch)


def test_the_transformer_trains_and_resumes_in_the_same_loop(corpus_dir, tmp_path):
    kw = dict(arch="transformer", d_state=T.TrainConfig.d_state, headdim=T.TrainConfig.headdim,
              chunk_size=T.TrainConfig.chunk_size, n_head=2, n_segments=1, task="copymix", lr=3e-3, steps=8,
              ckpt_every=4)
    full = T.train(tiny_config(corpus_dir, tmp_path / "full", **kw))["loss_history"]
    T.train(tiny_config(corpus_dir, tmp_path / "cut", stop_at=4, **kw))
    rest = T.train(tiny_config(corpus_dir, tmp_path / "cut", resume=True, **kw))["loss_history"]
    assert rest == full[4:], f"resumed Transformer differs: {rest} vs {full[4:]}"
    model = T.load_model("transformer", T.latest_checkpoint(tmp_path / "cut") / "model")
    assert type(model).__name__ == "TinyTransformer"


# ------------------------------------------------------------------------------------------------
# reliability of the trainer: refused pickles, config checks, divergence, fallback
# ------------------------------------------------------------------------------------------------

class _Planted:
    """An object whose unpickling would run code (touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(ckpt: Path, state: dict, marker: Path) -> None:
    """Replace trainer.pt by one holding a code-running object, and its recorded hash (as an attacker
    handing out a run folder would)."""
    from checkpoints import sha256_of
    torch.save({**state, "planted": _Planted(marker)}, ckpt / "trainer.pt")
    marker_file = ckpt / T.COMPLETE_MARKER
    marker_file.write_text("".join(f"sha256 {sha256_of(ckpt / 'trainer.pt')} trainer.pt\n" if line.endswith(" trainer.pt")
                                   else line + "\n" for line in marker_file.read_text().splitlines()))


def test_resume_refuses_a_planted_pickle(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=4, ckpt_every=4)
    T.train(cfg)
    ckpt = T.latest_checkpoint(tmp_path / "run")
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    _plant(ckpt, state, marker)
    with pytest.raises(T.CheckpointError, match="refused to unpickle .*trainer.pt"):
        T.train(dataclasses.replace(cfg, resume=True))
    assert not marker.exists(), "loading the checkpoint ran code from it"
    argv = ["--d_model", "32", "--n_layer", "1", "--d_state", "16", "--headdim", "16", "--chunk_size", "16",
            "--data", str(corpus_dir), "--seq_len", "16", "--batch_size", "4", "--lr", "0.01", "--eval_every", "0",
            "--ckpt_every", "4", "--progress", "false", "--out_dir", str(tmp_path / "run2")]
    T.main(argv + ["--steps", "4"])  # the same through the command line
    _plant(T.latest_checkpoint(tmp_path / "run2"), state, marker)
    with pytest.raises(SystemExit) as exit_info:
        T.main(argv + ["--steps", "4", "--resume"])
    assert exit_info.value.code != 0 and "refused to unpickle" in str(exit_info.value.code)
    assert not marker.exists()


def test_resume_names_every_changed_field(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=4, ckpt_every=2)
    T.train(cfg)
    changed = dict(lr=0.02, seed=1, seq_len=8, batch_size=8, steps=6)
    with pytest.raises(T.ConfigMismatch) as info:
        T.train(dataclasses.replace(cfg, resume=True, **changed))
    message = str(info.value)
    for name, new in changed.items():
        assert f"{name}: {getattr(cfg, name)!r} (recorded) vs {new!r} (now)" in message, message
    assert "--override_config" in message
    # bookkeeping fields may change freely; --override_config takes a new recipe
    res = T.train(dataclasses.replace(cfg, resume=True, override_config=True, log_every=2, **changed))
    assert res["step"] == 6 and len(res["loss_history"]) == 2
    state = T.read_trainer_state(T.latest_checkpoint(tmp_path / "run"))
    assert state["config"]["lr"] == 0.02, "the checkpoint after an override records the new recipe"
    # model sizes never change, not even with --override_config
    with pytest.raises(T.ConfigMismatch, match=r"(?s)no flag can override.*d_model: 32 \(recorded\) vs 64 \(now\)"):
        T.train(dataclasses.replace(cfg, resume=True, override_config=True, d_model=64, **changed))


def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "run", lr=1e6, warmup_steps=0, steps=20, ckpt_every=1, keep_ckpts=50)
    with pytest.raises(T.TrainingDiverged, match=r"step \d+: the loss is nan.*diverged.*last good checkpoint") as info:
        T.train(cfg)
    ckpts = T.complete_checkpoints(tmp_path / "run")
    assert str(ckpts[-1]) in str(info.value) if ckpts else "none" in str(info.value)
    from minimamba import Mamba2LM
    for ckpt in ckpts:
        for name, w in Mamba2LM.from_pretrained(ckpt / "model").state_dict().items():
            assert torch.isfinite(w).all(), f"{ckpt.name}/{name} holds non-finite weights"
    with pytest.raises(SystemExit) as exit_info:  # the command line exits non-zero with the message
        T.main(["--d_model", "32", "--n_layer", "1", "--d_state", "16", "--headdim", "16", "--chunk_size", "16",
                "--data", str(corpus_dir), "--seq_len", "16", "--batch_size", "4", "--steps", "20", "--lr", "1e6",
                "--warmup_steps", "0", "--eval_every", "0", "--progress", "false", "--out_dir", str(tmp_path / "cli")])
    assert exit_info.value.code != 0 and "diverged" in str(exit_info.value.code)


@pytest.mark.parametrize("damaged", ["trainer.pt", "model/model.safetensors"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(corpus_dir, tmp_path, capsys, damaged):
    full = T.train(tiny_config(corpus_dir, tmp_path / "full"))["loss_history"]
    cfg = tiny_config(corpus_dir, tmp_path / "run", stop_at=12)  # checkpoints at 6 and 12
    T.train(cfg)
    newest = T.latest_checkpoint(tmp_path / "run")
    f = newest / damaged
    data = bytearray(f.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # a torn write in the middle of the file
    f.write_bytes(bytes(data))
    capsys.readouterr()
    res = T.train(dataclasses.replace(cfg, resume=True, stop_at=0))
    err = capsys.readouterr().err
    assert "step_00000012" in err and "falling back" in err, err
    assert res["loss_history"] == full[6:], "the fallback run must redo steps 7-12 exactly"
    assert (newest.parent / ".unusable-step_00000012").is_dir() and T.latest_checkpoint(tmp_path / "run") == newest


def test_stale_temporary_checkpoint_folders_are_removed(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=2, ckpt_every=2)
    T.train(cfg)
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step_00000099-12345"
    stale.mkdir(parents=True)
    (stale / "trainer.pt").write_bytes(bytes(1 << 16))
    T.train(dataclasses.replace(cfg, resume=True))
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002"]


# ------------------------------------------------------------------------------------------------
# run folders: one record written first, checked before anything is written
# ------------------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_never_takes_over_a_folder_it_did_not_make(corpus_dir, tmp_path):
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=2, ckpt_every=2)
    T.train(cfg)
    before = _snapshot(tmp_path / "run")
    # rerun without --resume: refused, nothing touched (it used to start over silently)
    with pytest.raises(RunFolderError, match=r"already holds a train.py run .*pass --resume to continue it"):
        T.train(cfg)
    assert _snapshot(tmp_path / "run") == before
    # a saved model folder (its config.json is the model's): refused, with or without --resume
    model_dir = T.latest_checkpoint(tmp_path / "run") / "model"
    saved = _snapshot(model_dir)
    for resume in (False, True):
        with pytest.raises(RunFolderError, match=r"config.json is not a run record .*saved model"):
            T.train(dataclasses.replace(cfg, out_dir=str(model_dir), resume=resume))
    assert _snapshot(model_dir) == saved
    # a folder of somebody's files; a path below a file
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"notes is not empty \(todo.txt\) and holds no run record"):
        T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "notes"), resume=True))
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    with pytest.raises(RunFolderError, match=r"todo.txt is a file, not a folder"):
        T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "notes" / "todo.txt" / "run")))
    # the command line exits non-zero with the message
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--d_model", "32", "--n_layer", "1", "--d_state", "16", "--headdim", "16", "--chunk_size", "16",
                "--data", str(corpus_dir), "--seq_len", "16", "--batch_size", "4", "--steps", "2", "--eval_every", "0",
                "--progress", "false", "--out_dir", str(tmp_path / "run")])
    assert "pass --resume" in str(exit_info.value.code)
    assert _snapshot(tmp_path / "run") == before


def test_resume_checks_the_contents_of_the_data_not_only_its_path(corpus_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    cfg = tiny_config(data, tmp_path / "run", stop_at=6)
    T.train(cfg)
    before = _snapshot(tmp_path / "run")
    doc = data / "doc03.py"
    stat = doc.stat()
    doc.write_text(doc.read_text().replace("return", "yield ", 1))  # same size, same mtime: only the bytes differ
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(T.ConfigMismatch, match=r"data_sha256: '[0-9a-f]{64}' \(recorded\) vs '[0-9a-f]{64}' \(now\): "
                                               r"the contents of --data .*data are not the ones"):
        T.train(dataclasses.replace(cfg, resume=True, stop_at=0))
    assert _snapshot(tmp_path / "run") == before, "a refused resume wrote into the run folder"
    res = T.train(dataclasses.replace(cfg, resume=True, stop_at=0, override_config=True))  # said, then taken
    assert res["step"] == 12 and len(res["loss_history"]) == 6


def test_a_sweep_point_never_reuses_a_model_trained_with_other_settings(corpus_dir, tmp_path):
    from experiments.sweep import point_train_config, train_point_model
    tcfg = point_train_config(tmp_path / "models" / "p", t_train=16, tokens_per_step=64, steps=2, seed=0,
                              device="cpu", d_model=32, n_layer=1, d_state=16, headdim=16, lr=3e-3,
                              data=str(corpus_dir))
    model_dir = train_point_model(tcfg)
    assert train_point_model(tcfg) == model_dir  # a finished model is reused under the same settings ...
    with pytest.raises(T.ConfigMismatch, match=r"lr: 0.003 \(recorded\) vs 0.05 \(now\)"):
        train_point_model(dataclasses.replace(tcfg, lr=0.05))  # ... and never under others


def test_a_train_folder_in_use_is_refused_and_released_after(corpus_dir, tmp_path):
    from experiments.common import RunLock
    cfg = tiny_config(corpus_dir, tmp_path / "run", steps=2, ckpt_every=2)
    T.train(cfg)
    with RunLock(tmp_path / "run"):  # as another process training there would hold it
        with pytest.raises(RunFolderError, match=rf"run is in use by process {os.getpid()}"):
            T.train(dataclasses.replace(cfg, resume=True))
    T.train(dataclasses.replace(cfg, resume=True))  # free again, and train() released its own lock
    T.train(dataclasses.replace(cfg, resume=True))


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_seeds_outside_32_bits_are_refused(seed):
    with pytest.raises(ValueError, match=r"--seed must be integers from 0 to 2\*\*32 - 1"):
        T.TrainConfig(seed=seed)


# ------------------------------------------------------------------------------------------------
# the first demo's per-position criteria and mechanism measures (experiments/collapse_v1.py)
# ------------------------------------------------------------------------------------------------

def test_criteria_constants_are_the_fixed_ones():
    assert SC.PAPER_COLLAPSE_FACTOR == 2.0 and SC.MEAN_COLLAPSE_RATIO == 1.5 and SC.CRITERIA == ("paper", "mean")


def test_paper_criterion_on_hand_made_curves():
    t_train = 100
    flat = torch.full((3200,), 2.0)
    flat[0] = 4.0  # the first token is the hardest in-window position
    r = SC.paper_criterion(flat, t_train)
    assert not r.collapsed and r.first_position is None and r.within == 4.0 and r.ratio == pytest.approx(0.5)

    exploding = flat.clone()
    exploding[1000:] = torch.linspace(2.0, 12.0, 2200)  # passes 8.0 at 1000 + 0.6*2199
    r = SC.paper_criterion(exploding, t_train)
    assert r.collapsed and r.first_position == 1000 + int(torch.nonzero(exploding[1000:] > 8.0)[0])
    assert r.beyond == pytest.approx(12.0) and r.ratio == pytest.approx(3.0)

    # a rise inside the training window does not count, nor does one that stays below 2x
    inside = flat.clone()
    inside[50] = 20.0
    assert not SC.paper_criterion(inside, t_train).collapsed
    mild = flat.clone()
    mild[500:] = 7.9
    assert not SC.paper_criterion(mild, t_train).collapsed
    with pytest.raises(ValueError, match="positions"):
        SC.paper_criterion(flat[:50], t_train)


def test_mean_criterion_reads_the_whole_window_and_the_far_range():
    t_train = 100
    loss = torch.full((1000,), 2.0)
    loss[:50] = 4.0  # the whole window [0, T) is the reference: mean 3.0
    r = SC.mean_criterion(loss, t_train)
    assert not r.collapsed and r.within == 3.0 and r.beyond == 2.0
    loss[200:] = 4.51  # 1.503 x the in-window mean over [2T, l)
    r = SC.mean_criterion(loss, t_train)
    assert r.collapsed and r.ratio == pytest.approx(4.51 / 3.0)
    loss[200:] = 4.49
    assert not SC.mean_criterion(loss, t_train).collapsed
    loss[100:200] = 50.0  # [T, 2T) is read by neither mean
    assert not SC.mean_criterion(loss, t_train).collapsed
    # a copy stream that forgets perfectly: episodes of 8 random then 8 copied tokens, T = 16 = one episode;
    # the window [T/2, T) would be the copied half alone and read 2x, the whole window reads 1x
    episode = torch.cat([torch.full((8,), 5.5), torch.full((8,), 0.3)])
    assert SC.mean_criterion(episode.repeat(64), 16).ratio == pytest.approx(1.0)
    # a steady climb the paper's rule misses (its in-window maximum is the first token) and ours sees
    climb = torch.cat([torch.tensor([9.0]), torch.full((99,), 2.0), torch.linspace(2.0, 5.0, 900)])
    assert not SC.paper_criterion(climb, t_train).collapsed and SC.mean_criterion(climb, t_train).collapsed
    with pytest.raises(ValueError, match="positions"):
        SC.mean_criterion(loss[:200], t_train)


def test_a_model_collapses_if_any_probe_fires():
    ok = {"criteria": {"paper": {"collapsed": False}, "mean": {"collapsed": False}}}
    bad = {"criteria": {"paper": {"collapsed": False}, "mean": {"collapsed": True}}}
    v = SC.model_verdicts({"text": ok, "copy": bad, "newline": ok})
    assert v == {"paper": {"collapsed": False, "probes": []}, "mean": {"collapsed": True, "probes": ["copy"]}}


def test_mechanism_measures_on_hand_made_traces():
    positions = [4, 8, 12, 16, 20, 24, 28, 32, 36]  # T = 8: records every T/2 here
    retention = torch.zeros(9, 2, 3)
    retention[:, 1, 2] = torch.tensor([0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert SC.retention_at_multiples(positions, retention, 8) == pytest.approx({"1": 0.9, "2": 0.7, "4": 0.3})
    norm = torch.ones(9, 2, 3)
    norm[1, 0, 0] = 2.0  # the in-window maximum, at t = T
    norm[6, 1, 1] = 7.0  # the largest past T
    assert SC.norm_growth(positions, norm, 8) == pytest.approx(3.5)
    assert SC.trace_every(16, 1024) == 4 and SC.trace_every(8192, 20000) == 2048
    assert SC.trace_every(16, 10**6) % 16 == 0 and 10**6 // SC.trace_every(16, 10**6) <= SC.MAX_TRACE_POINTS


# ------------------------------------------------------------------------------------------------
# collapse_v1.py: carried-state evaluation (the state-collapse demo's tests: tests/test_collapse.py)
# ------------------------------------------------------------------------------------------------

def test_carried_state_loss_does_not_depend_on_chunking():
    from minimamba import Mamba2Config, Mamba2LM
    from experiments.collapse_v1 import per_position_loss
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=16, headdim=16,
                                  chunk_size=16)).eval()
    ids = torch.randint(0, 256, (3, 97))
    one = per_position_loss(model, ids, chunk_len=96)
    for k in (7, 32):
        many = per_position_loss(model, ids, chunk_len=k)
        diff = (one - many).abs()
        assert one.shape == many.shape == (96,)
        assert diff.max() < 1e-4, f"chunk_len={k}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
