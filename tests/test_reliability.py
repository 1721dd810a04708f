"""Faults and hostile input around the model and its checkpoints: a save that fails or is killed
leaves the old checkpoint or the new one, never a mix; a damaged or edited file is refused by name;
a save deletes only its own files; a full disk says so; one weight layout per folder; every corrupt
safetensors file and shard index is an error naming the file (before anything large is allocated);
configs are strictly typed and finite; bad ids and states get errors a user can act on."""

import errno
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import minimamba
from checkpoints import load_pretrained, read_safetensors, save_pretrained, write_safetensors
from minimamba import MANIFEST, Mamba2Config, Mamba2LM, config_from_dict

SMALL = dict(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=8, chunk_size=8)
IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


def small_model(seed):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(**SMALL)).eval()


def logits_of(model):
    with torch.no_grad():
        return model(IDS)[0]


# ---- saves: old or new, verified on load, deleting only their own files ----------------------------


class _FailingFile:
    """A file that raises `error` on the write that takes the bytes written past `budget`: its own,
    or those of every file sharing one `spent` counter (a disk that fills up)."""

    def __init__(self, f, budget, error, spent=None):
        self.f, self.budget, self.error, self.spent = f, budget, error, spent or [0]

    def write(self, data):
        self.spent[0] += memoryview(data).nbytes
        if self.spent[0] > self.budget:
            raise self.error
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail_nth_file(monkeypatch, nth, error, budget=10):
    """Every file opened with os.fdopen from now on works, except the nth (0-based), which fails
    after `budget` bytes."""
    real, opened = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        opened.append(f)
        return _FailingFile(f, budget, error) if len(opened) - 1 == nth else f
    monkeypatch.setattr(os, "fdopen", fdopen)


def _fill_disk_after(monkeypatch, free):
    """From now on, files opened with os.fdopen share `free` bytes of disk; past them, ENOSPC."""
    real, spent = os.fdopen, [0]
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FailingFile(real(fd, *a, **k), free, full, spent))


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_a_save_that_fails_partway_leaves_the_old_checkpoint(tmp_path, layout, error, monkeypatch):
    """Save model A, then fail a save of model B in each file it writes in turn: the folder still
    loads as A, file for file as before (or as B where nothing failed). The old code deleted A's
    weights first and wrote B's after, so a failure in between left neither."""
    a, b = small_model(0), small_model(1)
    for nth in range(5):
        folder = tmp_path / f"fail{nth}"
        save_pretrained(a, folder, layout="hf")
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        _fail_nth_file(monkeypatch, nth, error)
        try:
            save_pretrained(b, folder, layout=layout)
            failed = False
        except type(error):
            failed = True
        monkeypatch.undo()
        got = logits_of(Mamba2LM.from_pretrained(folder))
        if failed:
            assert torch.equal(got, logits_of(a)), f"failed in file {nth}: the old checkpoint is lost"
            assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, f"file {nth}"
        else:
            assert torch.equal(got, logits_of(b))


@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_a_full_disk_says_so_and_names_the_file(tmp_path, layout, monkeypatch):
    """A disk that fills up while the weights are written: an OSError ENOSPC that says the disk is
    full and which file (torch.save said "unexpected pos ..."), and the old checkpoint loads."""
    a = small_model(0)
    save_pretrained(a, tmp_path, layout="hf")
    _fill_disk_after(monkeypatch, free=2000)  # the config and the manifest fit, the weights do not
    weights = {"hf": "model.safetensors", "mamba_ssm": "pytorch_model.bin"}[layout]
    with pytest.raises(OSError, match=rf"the disk is full: writing \S*{weights} failed") as info:
        save_pretrained(small_model(1), tmp_path, layout=layout)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "unexpected pos" not in str(info.value)
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path)), logits_of(a))


def test_a_damaged_weight_file_is_refused_by_name(tmp_path):
    """One flipped bit in a saved model.safetensors: refused, naming the file (it loaded without a
    word before the manifest recorded hashes); loaded unverified, the logits do change."""
    model = small_model(0)
    save_pretrained(model, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # an exponent bit of the last float
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is missing or is not the file that was saved"):
        Mamba2LM.from_pretrained(tmp_path)
    assert not torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path, verify=False)), logits_of(model))


def test_a_hand_edited_config_is_refused_until_saved_again_or_unverified(tmp_path):
    save_pretrained(small_model(0), tmp_path, layout="mamba_ssm")
    config = json.loads((tmp_path / "config.json").read_text())
    config["ssm_cfg"]["chunk_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json is missing or is not the file that was saved.*verify=False"):
        Mamba2LM.from_pretrained(tmp_path)
    edited = Mamba2LM.from_pretrained(tmp_path, verify=False)
    assert edited.config.chunk_size == 4
    save_pretrained(edited, tmp_path, layout="mamba_ssm")
    assert Mamba2LM.from_pretrained(tmp_path).config.chunk_size == 4


def test_a_save_deletes_only_files_it_made(tmp_path):
    """A user's hidden .tmp files (one named like an atomic_write temporary) and a sharded
    checkpoint in the folder survive a save; a temporary file a killed save left is removed."""
    _sharded(tmp_path)
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # config, index and its shards
    for name in (".notes.tmp", ".config.json.abc123.tmp"):
        (tmp_path / name).write_text("the user's")
    leftover = tmp_path / ".model.safetensors.k1ll3d00.minimamba-save.tmp"
    leftover.write_bytes(b"half a file")
    save_pretrained(small_model(1), tmp_path)
    assert all((tmp_path / name).read_text() == "the user's" for name in (".notes.tmp", ".config.json.abc123.tmp"))
    assert all((tmp_path / name).read_bytes() == data for name, data in kept.items() if name != "config.json")
    assert not leftover.exists()
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path)), logits_of(small_model(1)))


@pytest.mark.slow  # up to a minute of process starts; the tests above cover each failure point in the default run
def test_sigkilled_saves_never_load_as_a_mix(tmp_path):
    """A process saves two models in turn into one folder (pausing 20 ms between saves) and is
    SIGKILLed at random moments, until the folder was found holding each model twice: after each
    kill it loads as one of the two models exactly, or (killed during the renames that swap the
    files in) is refused as interrupted; a user's hidden file survives, and the next save removes
    what the kills left."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".mine.tmp").write_text("the user's")
    code = ("import sys, time, torch\nsys.path.insert(0, %r)\nfrom checkpoints import save_pretrained\n"
            "from minimamba import Mamba2Config, Mamba2LM\n"
            "models = []\nfor s in (0, 1):\n    torch.manual_seed(s)\n"
            "    models.append(Mamba2LM(Mamba2Config(**%r)))\n"
            "print('ready', flush=True)\ni = 0\nwhile True:\n"
            "    save_pretrained(models[i %% 2], %r, layout=('hf', 'mamba_ssm')[i %% 3 == 0])\n"
            "    i += 1\n    time.sleep(0.02)\n"
            % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), SMALL, str(folder)))
    expect = [logits_of(small_model(0)), logits_of(small_model(1))]
    seen = [0, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.3 * float(torch.rand(1, generator=gen)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            got = logits_of(Mamba2LM.from_pretrained(folder))
        except ValueError as e:
            assert "interrupted" in str(e), e
            continue
        except FileNotFoundError:  # killed before the first save wrote its config
            continue
        which = [i for i, e in enumerate(expect) if torch.equal(got, e)]
        assert which, "the folder loaded as neither model: a mix"
        seen[which[0]] += 1
        if min(seen) >= 2:
            break
    assert min(seen) >= 2, f"kills landed too one-sidedly to test both models: {seen}"
    save_pretrained(small_model(0), folder)
    assert [p.name for p in folder.glob(".*.tmp")] == [".mine.tmp"], "the next save removes what kills left"


def test_one_layout_per_folder_and_the_manifest_names_it(tmp_path):
    a, b = small_model(0), small_model(1)
    save_pretrained(a, tmp_path, layout="hf")
    save_pretrained(b, tmp_path, layout="mamba_ssm")  # replaces the hf save as a whole
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path)), logits_of(b))
    # a weights file of the other layout copied in later is not what the manifest names: ignored
    save_pretrained(a, tmp_path / "other", layout="hf")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path)), logits_of(b))
    # a hand-made folder (no manifest) with both layouts: which weights are current is ambiguous
    save_pretrained(a, tmp_path / "both", layout="hf")
    (tmp_path / "both" / MANIFEST).unlink()
    torch.save(b.state_dict(), tmp_path / "both" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model.safetensors and pytorch_model.bin.*ambiguous"):
        Mamba2LM.from_pretrained(tmp_path / "both")


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        save_pretrained(small_model(0), tmp_path, layout="gguf")
    with pytest.raises(TypeError, match="Mamba2LM"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        save_pretrained(small_model(0), tmp_path / "file")
    with pytest.raises(ValueError, match="safetensors holds tensors of"):
        write_safetensors(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


# ---- corrupt and hostile safetensors files ---------------------------------------------------------------


def _good_file(path):
    write_safetensors(path, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)})
    return path.read_bytes()


def _with_header(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("case", ["truncated", "empty", "header_len_0", "header_len_past_end", "not_json",
                                  "not_object", "offsets_past_end", "offsets_reversed", "bytes_not_shape",
                                  "overlap", "unknown_dtype", "negative_shape", "huge_claim"])
def test_every_corrupt_safetensors_file_is_an_error_naming_it(tmp_path, case):
    path = tmp_path / "model.safetensors"
    good = _good_file(path)
    data = bytes(40)
    bad = {
        "truncated": good[: len(good) - 5],
        "empty": b"",
        "header_len_0": struct.pack("<Q", 0) + good[8:],
        "header_len_past_end": struct.pack("<Q", 10 ** 9) + good[8:],
        "not_json": struct.pack("<Q", 5) + b"{nope" + data,
        "not_object": _with_header([1, 2], data),
        "offsets_past_end": _with_header({"a": {"dtype": "F32", "shape": [20], "data_offsets": [0, 80]}}, data),
        "offsets_reversed": _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, data),
        "bytes_not_shape": _with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data),
        "overlap": _with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, data),
        "unknown_dtype": _with_header({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, data),
        "negative_shape": _with_header({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data),
        # a 21 KB file asking for 2^62 bytes: refused by the size check, nothing is allocated
        "huge_claim": _with_header({"a": {"dtype": "F32", "shape": [2 ** 30, 2 ** 30],
                                          "data_offsets": [0, 2 ** 62]}}, bytes(21_000)),
    }[case]
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        read_safetensors(path)
    if case != "overlap":  # minimamba's own short reader: still an error naming the file
        with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
            minimamba.read_safetensors(path)


def _sharded(tmp_path, weight_map=None, shards=None):
    """A hand-made sharded checkpoint of small_model(0); weight_map and shards as the test bends them."""
    save_pretrained(small_model(0), tmp_path)
    weights = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / MANIFEST).unlink()
    names = sorted(weights)
    shards = shards or {"s1.safetensors": names[:3], "s2.safetensors": names[3:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: weights[k] for k in keys})
    if weight_map is None:
        weight_map = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(weight_map))
    return names


def test_shard_index_problems_are_named(tmp_path):
    names = _sharded(tmp_path / "ok")
    assert torch.equal(logits_of(load_pretrained(tmp_path / "ok")), logits_of(small_model(0)))
    _sharded(tmp_path / "no_map", weight_map={"metadata": {}})
    with pytest.raises(ValueError, match="index.json needs a weight_map"):
        load_pretrained(tmp_path / "no_map")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    _sharded(tmp_path / "escape", weight_map={"weight_map": {names[0]: "../outside.safetensors"}})
    with pytest.raises(ValueError, match="shards must be files inside"):
        load_pretrained(tmp_path / "escape")
    dup = {"s1.safetensors": names[:3], "s2.safetensors": names[2:]}  # names[2] in both shards
    _sharded(tmp_path / "dup", shards=dup, weight_map={"weight_map": {k: "s1.safetensors" for k in names[:3]} |
                                                       {k: "s2.safetensors" for k in names[3:]}})
    with pytest.raises(ValueError, match="s2.safetensors holds tensors that another shard"):
        load_pretrained(tmp_path / "dup")
    listed = {"weight_map": {**{k: "s1.safetensors" for k in names[:3]}, **{k: "s2.safetensors" for k in names[3:]},
                             "extra.weight": "s1.safetensors"}}
    _sharded(tmp_path / "listed", weight_map=listed)
    with pytest.raises(ValueError, match="lists tensors no shard holds"):
        load_pretrained(tmp_path / "listed")


def test_config_json_problems_are_named(tmp_path):
    save_pretrained(small_model(0), tmp_path)
    (tmp_path / MANIFEST).unlink()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Mamba2LM.from_pretrained(tmp_path)


# ---- strict configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, match", [
    ({"tie_word_embeddings": "false"}, "tie_embeddings must be true or false"),
    ({"tie_word_embeddings": "no"}, "tie_embeddings must be true or false"),
    ({"use_bias": 1}, "bias must be true or false"),
    ({"time_step_min": "0.001"}, "dt_min must be a finite number"),
    ({"time_step_max": float("inf")}, "dt_max must be a finite number"),
    ({"time_step_floor": float("inf")}, "dt_init_floor must be a finite number"),
    ({"layer_norm_epsilon": float("nan")}, "norm_eps must be a finite number"),
    ({"time_step_limit": [0.0, float("nan")]}, "dt_limit must be a number"),
    ({"time_step_limit": [0.0]}, "dt_limit must be a \\(low, high\\) pair"),
    ({"state_size": 16.0}, "d_state must be a positive int"),
    ({"state_size": True}, "d_state must be a positive int"),
])
def test_config_fields_are_strictly_typed_and_finite(raw, match):
    base = {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 64, "head_dim": 8,
            "state_size": 8, "n_groups": 1}
    with pytest.raises(ValueError, match=match):
        config_from_dict({**base, **raw})


def test_an_untied_checkpoint_stays_untied(tmp_path):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(**SMALL, tie_embeddings=False)).eval()
    save_pretrained(model, tmp_path)
    loaded = Mamba2LM.from_pretrained(tmp_path)
    assert not loaded.config.tie_embeddings and torch.equal(logits_of(loaded), logits_of(model))
    assert math.isinf(loaded.config.dt_limit[1])  # the one field that may be infinite, round-tripped


# ---- input ids and states ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32, torch.bool])
def test_ids_of_another_dtype_are_a_clear_error(dtype):
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        small_model(0)(IDS.to(dtype))


def test_load_names_a_dtype_that_is_not_one(tmp_path):
    save_pretrained(small_model(0), tmp_path)  # dtype="float16" was read as a device: "Invalid device string"
    with pytest.raises(TypeError, match="dtype=str"):
        Mamba2LM.from_pretrained(tmp_path, dtype="float16")
    assert Mamba2LM.from_pretrained(tmp_path, dtype=torch.float64).lm_head.weight.dtype == torch.float64


def test_states_of_another_model_batch_or_device_are_named():
    model = small_model(0)
    _, state = model(IDS)
    other = Mamba2LM(Mamba2Config(**{**SMALL, "d_state": 16}))
    with pytest.raises(ValueError, match="conv part is"):
        other(IDS, state)
    with pytest.raises(ValueError, match="conv part is"):
        model(IDS[:1], state)
    meta = type(state)([c.to("meta") for c in state.conv], state.ssm, state.seqlen)
    with pytest.raises(ValueError, match="on meta"):
        model(IDS, meta)
    with pytest.raises(TypeError, match="Mamba2State"):
        model(IDS, {"conv": []})
