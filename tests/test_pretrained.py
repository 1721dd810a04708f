"""experiments/pretrained.py on random checkpoints written in both official layouts (no downloads): the loss of
the streamed run equals one unchunked forward, the state statistics equal a token-by-token computation, text
goes through a tokenizer trained here, a killed run resumes to the same numbers, and what is missing is named."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import experiments.pretrained as P
import mitigations as M
from checkpoints import save_pretrained
from minimamba import Mamba2Config, Mamba2LM

VOCAB = 300  # not byte-level: a text file needs a tokenizer or ids
CONFIG = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=16, headdim=16, chunk_size=64)


@pytest.fixture(autouse=True)
def one_thread():  # these tiny models run fastest on one thread, the more so on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_checkpoint(folder, layout):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(**CONFIG))
    with torch.no_grad():  # larger dt: the state moves and retention decays visibly within a few hundred tokens
        for layer in model.backbone.layers:
            layer.mixer.dt_bias.add_(2.0)
    return save_pretrained(model, folder, layout=layout)


@pytest.fixture(scope="module", params=["hf", "mamba_ssm"])
def checkpoint(request, tmp_path_factory):
    """Both official layouts (the loss and statistics tests run on each)."""
    return write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The state-spaces layout of the official mamba2-* checkpoints (the command-line tests run on it)."""
    return write_checkpoint(tmp_path_factory.mktemp("mamba_ssm"), "mamba_ssm")


def ids_file(tmp_path, n=2000, seed=0):
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(seed).integers(0, VOCAB, n))
    return path


def argv(model, out, text, **kw):
    flags = {"length": 384, "val_length": 256, "train_length": 128, "segment": 128, "piece": 100,
             "rri_lambda_a_grid": "0.99,0.999", "rri_lambda_b_grid": "0.75", "delta_factor_grid": "0.5,0.25",
             "window_mult_grid": "0.5,1", "norm_tau_scale_grid": "1,2", "threads": 1, **kw}  # 1 thread: fast on a shared CPU
    return ["--model", str(model), "--text", str(text), "--out_dir", str(out),
            *[f"--{k}={v}" for k, v in flags.items()]]


@pytest.mark.parametrize("with_stats,piece", [(False, 37), (False, 1000), (True, 0)])
def test_streamed_loss_equals_one_unchunked_forward(checkpoint, with_stats, piece):
    model = Mamba2LM.from_pretrained(checkpoint).eval()
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, 385))
    got = P.run_stream(model, ids, piece=piece or 1, with_stats=with_stats, segment=256)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    vocab = model.config.vocab_size  # 300, or 304 from the HF layout (its config stores the padded size)
    want = F.cross_entropy(logits[0, :, :vocab], ids[1:], reduction="none").double()
    err = (got["loss"] - want).abs()
    assert got["loss"].shape == (384,) and err.max() < 1e-4, f"max {err.max():.2e} mean {err.mean():.2e}"
    assert P.buckets(got["loss"]) == pytest.approx(want.reshape(3, 128).mean(1).tolist(), abs=1e-4)


def test_state_statistics_equal_a_token_by_token_run(checkpoint):
    """Every 128 tokens, per layer and head: mean, variance, RMS, largest |h| and its channel, ||h||_F of the
    state of a step()-by-step() run, and the first-token retention exp(sum_{j=2..t} dt_j A) computed from
    layer 0's own dt (and, for every layer, mitigations.trace_states' independent recorder)."""
    model = Mamba2LM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, VOCAB, 257))
    got = P.run_stream(model, ids, piece=1, with_stats=True, segment=128)
    assert got["positions"] == [128, 256]
    state, rows = None, []
    with torch.no_grad():
        for t in range(256):
            _, state = model.step(ids[t:t + 1], state)
            if (t + 1) % 128 == 0:
                h = torch.stack([s[0] for s in state.ssm])  # (L, h, p, n), batch 1
                flat = h.flatten(2)
                rows.append({"mean": flat.mean(-1), "var": flat.var(-1, unbiased=False),
                             "rms": flat.square().mean(-1).sqrt(), "max_abs": flat.abs().amax(-1),
                             "top_channel": flat.abs().argmax(-1).double(), "norm": flat.norm(dim=-1)})
        mixer = model.backbone.layers[0].mixer  # layer 0's dt from its input, by hand
        u = model.backbone.layers[0].norm(model.backbone.embedding(ids[None, :-1]).double())
        dt = F.softplus(mixer.in_proj(u)[..., -model.config.nheads:] + mixer.dt_bias)[0]  # (l, h)
        a = dt * -torch.exp(mixer.A_log)
        retention0 = torch.exp(torch.cumsum(a, 0) - a[:1])  # (l, h): exp(sum_{j=2..t} a_j)
    for name in ("mean", "var", "rms", "max_abs", "top_channel", "norm"):
        want = torch.stack([r[name] for r in rows])
        err = (got["stats"][name] - want).abs().max().item()
        assert err <= 1e-9 * max(1.0, want.abs().max().item()), f"{name}: max abs err {err:.2e}"
    assert torch.allclose(got["stats"]["retention"][:, 0], retention0[[127, 255]], rtol=1e-9, atol=0)
    assert got["stats"]["retention"][-1, 0].min() < 0.5  # it decays: the check above is not 1 == 1
    trace = M.trace_states(model, ids[None, :-1], every=128)
    assert torch.allclose(got["stats"]["retention"], trace.retention, rtol=1e-9, atol=0)


def test_a_killed_run_resumes_to_the_same_numbers_and_other_settings_are_refused(official, tmp_path, monkeypatch):
    text = ids_file(tmp_path)
    report = P.main(argv(official, tmp_path / "whole", text))
    # each mitigation ran its default and the best of its grid on the validation stretch
    assert report["base"]["positions"] == 384 and len(report["base"]["loss_buckets"]) == 3
    stats = np.load(tmp_path / "whole" / "stats.npz")
    assert stats["rms"].shape == (3, 2, 4) and stats["positions"].tolist() == [128, 256, 384]
    cfg = P.config_from_args(P.PretrainedConfig, P.build_parser().parse_args(argv(official, tmp_path, text)))
    for method in P.METHODS:
        entry = report["mitigations"][method]
        assert entry["default"]["params"] == P.default_setting(cfg, method)
        best = min(entry["validation"], key=lambda r: r["mean_loss"])
        assert entry["tuned"]["params"] == best["params"] and len(entry["validation"]) == 2
        assert math.isfinite(entry["tuned"]["mean_loss"])
    assert report["mitigations"]["rri"]["default"]["mean_loss"] != report["base"]["mean_loss"]  # it does something

    calls, real_save = [], P.Streams.save_partial

    def killed_after_saving(self, key, snapshot):  # the run dies right after a sliding-window stream's first save
        real_save(self, key, snapshot)
        if "sliding_window" in key and not calls:
            calls.append(key)
            raise KeyboardInterrupt
    monkeypatch.setattr(P.Streams, "save_partial", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        P.main(argv(official, tmp_path / "killed", text))
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "streams").glob("*.json")}
    assert any(p.name.endswith(".partial.pt") for p in (tmp_path / "killed" / "streams").iterdir())
    P.main(argv(official, tmp_path / "killed", text))
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "streams").glob("*.json")}
    assert all(after[name] == t for name, t in done_before.items()), "a finished stream was redone"
    resumed = [json.loads(p.read_text()) for p in (tmp_path / "killed" / "streams").glob("*.json")]
    assert [r["resumed_at"] for r in resumed if r["resumed_at"]] == [128]
    whole, killed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert killed["base"]["loss_buckets"] == whole["base"]["loss_buckets"]
    for method, entry in whole["mitigations"].items():
        for which in ("default", "tuned"):
            assert killed["mitigations"][method][which]["loss_buckets"] == pytest.approx(
                entry[which]["loss_buckets"], abs=1e-9), (method, which)
    assert (tmp_path / "killed" / "pretrained.png").is_file() and (tmp_path / "killed" / "stats.npz").is_file()
    with pytest.raises(ValueError, match="length"):
        P.main(argv(official, tmp_path / "killed", text, length=256))


def test_text_through_a_tokenizer_trained_here(official, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    words = [f"w{i}" for i in range(40)]
    rng = np.random.default_rng(3)
    text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(200)) + "\n"
    (tmp_path / "book.txt").write_text(text)
    tok = tokenizers.Tokenizer(models.BPE())  # byte-level BPE, as GPT-NeoX's: "\n" is one token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=VOCAB - 10, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = P.config_from_args(P.PretrainedConfig, P.build_parser().parse_args(
        argv(official, tmp_path / "run", tmp_path / "book.txt", tokenizer=tmp_path / "tokenizer.json")))
    scored, val, every, about = P.stretches(cfg, VOCAB)
    want = tok.encode(text).ids
    assert every.tolist() == want and scored.tolist() == want[:385] and val.tolist() == want[385:385 + 257]
    assert about["tokenized_by"] == str(tmp_path / "tokenizer.json")
    newlines = P.config_from_args(P.PretrainedConfig, P.build_parser().parse_args(
        ["--model", str(official), "--prompt", "newlines", "--tokenizer", str(tmp_path / "tokenizer.json")]))
    assert P.newline_id(newlines, VOCAB) == tok.encode("\n").ids[0]
    report = P.main(argv(official, tmp_path / "run", tmp_path / "book.txt", tokenizer=tmp_path / "tokenizer.json",
                         mitigations="none", forgetting_curve="true", fc_lengths="8,16", fc_samples=2))
    assert report["data"]["tokenized_by"].endswith("tokenizer.json") and report["mitigations"] == {}
    # the forgetting curve of the same model, on the same text
    curve = json.loads((tmp_path / "run" / "forgetting_curve.json").read_text())
    assert curve["lengths"] == [8, 16] and (tmp_path / "run" / "forgetting_curve.png").is_file()
    assert report["forgetting_curve"]["file"] == "forgetting_curve.json"


def test_what_is_missing_is_named(official, tmp_path, monkeypatch):
    (tmp_path / "book.txt").write_text("some text " * 100)
    cfg = P.config_from_args(P.PretrainedConfig, P.build_parser().parse_args(
        argv(official, tmp_path / "run", tmp_path / "book.txt")))
    with pytest.raises(ValueError, match=r"no tokenizer.*tokenizer\.json does not exist.*--tokenizer.*\.npy"):
        P.stretches(cfg, VOCAB)
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # the optional package not installed
    with pytest.raises(ImportError, match=r"pip install '\.\[pretrained\]'"):
        P.stretches(P.dataclasses.replace(cfg, tokenizer=str(tmp_path / "tokenizer.json")), VOCAB)
    with pytest.raises(ValueError, match="validation stretch"):
        P.stretches(P.dataclasses.replace(cfg, text=str(ids_file(tmp_path, n=500))), VOCAB)
    with pytest.raises(SystemExit):
        P.main(["--text", "x.txt"])  # no --model
    with pytest.raises(ValueError, match="exactly one of --text"):
        P.PretrainedConfig(model="m")
