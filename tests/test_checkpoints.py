"""Checkpoints: a random transformers Mamba2ForCausalLM loads into Mamba2LM with the same logits and
greedy generation; the state-spaces (mamba_ssm) layout loads too; checkpoints.save_pretrained
round-trips and is readable by transformers; a sharded checkpoint loads with
checkpoints.load_pretrained; a key or shape that does not fit the config is named.
(Killed, failed and verified saves, corrupt and hostile files: tests/test_reliability.py.)"""

import json
import pickle

import pytest
import torch
from conftest import max_rel_err

from checkpoints import load_pretrained, save_pretrained, write_safetensors
from minimamba import MANIFEST, Mamba2Config, Mamba2LM, read_safetensors

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers


def hf_model(n_groups=1, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_heads=8,
                                    head_dim=16, state_size=16, n_groups=n_groups, expand=2, conv_kernel=4,
                                    chunk_size=16, tie_word_embeddings=True)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initializes A_log as log(1..h); spread the decays randomly
        for layer in model.backbone.layers:
            layer.mixer.A_log.copy_(torch.log(torch.empty(8).uniform_(1, 16)))
            layer.mixer.D.uniform_(0.5, 1.5)
            layer.mixer.norm.weight.uniform_(0.5, 1.5)
    return model


IDS = torch.randint(0, 96, (2, 50), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n_groups", [1, 2])
def test_transformers_checkpoint_gives_the_same_logits_and_generation(tmp_path, n_groups):
    hf = hf_model(n_groups)
    hf.save_pretrained(tmp_path)
    model = Mamba2LM.from_pretrained(tmp_path).eval()
    assert model.config.ngroups == n_groups and model.config.padded_vocab_size == 96
    with torch.no_grad():
        expected = hf(IDS).logits
        logits, _ = model(IDS)
    err = max_rel_err(logits, expected)
    assert err <= 1e-4, f"logits vs transformers: max rel err {err:.3g}"
    greedy_hf = hf.generate(IDS[:, :7], max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(IDS[:, :7], 12, temperature=0), greedy_hf)


def _write_state_spaces_checkpoint(hf, path):
    """The layout of state-spaces/mamba2-*: mamba_ssm config.json, pytorch_model.bin, embedding
    (singular) and a tied copy of lm_head.weight in the file. Written by hand, not by minimamba."""
    cfg = hf.config
    path.mkdir(exist_ok=True)
    config = {"d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
              "vocab_size": cfg.vocab_size - 3,  # the tokenizer's size; the embedding is padded to 16
              "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.state_size, "headdim": cfg.head_dim,
                          "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, path / "pytorch_model.bin")
    return path


def test_state_spaces_checkpoint_loads_and_agrees(tmp_path):
    hf = hf_model()
    path = _write_state_spaces_checkpoint(hf, tmp_path / "ss")
    model = Mamba2LM.from_pretrained(path).eval()
    assert model.config.vocab_size == 93 and model.config.padded_vocab_size == 96
    with torch.no_grad():
        ids = IDS % 93
        expected = hf(ids).logits
        logits, _ = model(ids)
    assert max_rel_err(logits, expected) <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_save_pretrained_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=8)).eval()
    save_pretrained(model, tmp_path, layout=layout)
    loaded = Mamba2LM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 20))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert torch.equal(model(ids)[0], load_pretrained(tmp_path)(ids)[0])  # the fully checked loader agrees
    for field in ("d_model", "n_layer", "d_state", "headdim", "ngroups", "chunk_size", "dt_limit"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    assert loaded.config.padded_vocab_size == model.config.padded_vocab_size


def test_transformers_reads_what_we_save(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "a")
    model = Mamba2LM.from_pretrained(tmp_path / "a").eval()
    save_pretrained(model, tmp_path / "b")
    again = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert max_rel_err(again(IDS).logits, hf(IDS).logits) <= 1e-6


def test_sharded_safetensors_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8)).eval()
    save_pretrained(model, tmp_path)
    weights = read_safetensors(tmp_path / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: weights[k] for k in keys})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / MANIFEST).unlink()  # a hand-made sharded folder, as the official ones are
    ids = torch.randint(0, 50, (1, 10))
    assert torch.equal(load_pretrained(tmp_path)(ids)[0], model(ids)[0])
    with pytest.raises(ValueError, match="sharded checkpoint: load it with checkpoints.load_pretrained"):
        Mamba2LM.from_pretrained(tmp_path)  # minimamba.py reads the single-file layouts only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_safetensors_round_trip(tmp_path, dtype):
    tensors = {"a": (torch.randn(3, 5) * 10).to(dtype), "empty": torch.zeros(0, 4, dtype=dtype),
               "scalar": torch.tensor(7).to(dtype)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = read_safetensors(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    header_len = int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def _saved(tmp_path):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8))
    save_pretrained(model, tmp_path)
    (tmp_path / MANIFEST).unlink()  # the folder then reads like an official one, edited by hand below
    return read_safetensors(tmp_path / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    weights = _saved(tmp_path)
    del weights["backbone.layers.1.mixer.A_log"]
    write_safetensors(tmp_path / "model.safetensors", weights)
    with pytest.raises(ValueError, match=r"missing keys: \['backbone.layers.1.mixer.A_log'\]"):
        Mamba2LM.from_pretrained(tmp_path)


def test_unexpected_key_and_shape_mismatch_are_named(tmp_path):
    weights = _saved(tmp_path)
    weights["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    weights["backbone.layers.0.mixer.D"] = torch.zeros(5)
    write_safetensors(tmp_path / "model.safetensors", weights)
    with pytest.raises(ValueError, match="backbone.layers.0.mixer.extra") as info:
        Mamba2LM.from_pretrained(tmp_path)
    assert "backbone.layers.0.mixer.D: checkpoint (5,)" in str(info.value)


class _NotATensor:
    pass


def test_bin_files_load_with_weights_only(tmp_path):
    """A pickle that would run code (any non-tensor object) is refused."""
    torch.manual_seed(0)
    save_pretrained(Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=8)),
                    tmp_path, layout="mamba_ssm")
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _NotATensor()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(pickle.UnpicklingError):
        Mamba2LM.from_pretrained(tmp_path)


def test_bad_directories_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 50,
                                                      "ssm_cfg": {"layer": "Mamba2", "headdim": 8}}))
    with pytest.raises(FileNotFoundError, match="has none of model.safetensors"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 50}))
    with pytest.raises(ValueError, match="only Mamba2"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 50,
                                                      "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}))
    with pytest.raises(ValueError, match="norm_before_gate"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 32}))
    with pytest.raises(ValueError, match="a mamba_ssm config .* or a Hugging Face"):
        Mamba2LM.from_pretrained(tmp_path)
