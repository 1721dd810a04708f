"""checkpoints: save minimamba models in the two official layouts, and load any checkpoint folder
with every file checked.

Reading a single-file checkpoint is minimamba's job (Mamba2LM.from_pretrained), so that
minimamba.py copied alone loads the official weights. This file adds what training code and
downloaded folders need:

    save_pretrained(model, path, layout="hf")         model.safetensors + a Mamba2ForCausalLM config
    save_pretrained(model, path, layout="mamba_ssm")  pytorch_model.bin + a state-spaces config
    load_pretrained(path)                 from_pretrained for any folder: sharded too, and every
                                          safetensors header checked before a tensor is read
    read_safetensors, write_safetensors   one .safetensors file (read: header checked first)
    config_to_dict(config, layout)        the config.json of a layout
    atomic_write(path, write)             a temporary file beside path, fsync, rename
    sha256_of(path)                       a file's hash (the manifest's)

How save_pretrained replaces the checkpoint in a folder, old or new and never neither:
    1. write the new weights and config.json beside the old files, under temporary names of its
       own (".<name>.<random>.minimamba-save.tmp"), fsync them and take their sha256;
    2. write the manifest the same way: checkpoint.json, {"layout", "files": {name: sha256}};
    3. swap: rename the manifest, then the weights, then config.json over the old files;
    4. delete the files the previous save recorded that this one did not write (the other
       layout's weights), if they are still what that save wrote.
A failure before step 3 (a full disk, an exception) removes the temporary files and leaves the old
checkpoint as it was. A kill during the renames of step 3 leaves files that do not match the new
manifest: from_pretrained then refuses the folder as an interrupted save (it never loads a mix).
A save deletes only files it made: its own temporaries, also those a killed save left, and in
step 4 files a previous save wrote; a user's files in the folder, a sharded checkpoint included,
stay as they are.

Layouts: those of state-spaces/mamba (mamba_ssm) and Hugging Face's Mamba2ForCausalLM.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch

import minimamba
from minimamba import (HF_NAMES, MANIFEST, SSM_CFG_NAMES, ST_DTYPES, WEIGHT_FILES, Mamba2Config,
                       Mamba2LM, _check_load_args, build_model, config_from_dict, read_json,
                       read_weights, sha256_of, verified_files, weight_file)

LAYOUTS = {"hf": "model.safetensors", "mamba_ssm": "pytorch_model.bin"}  # layout -> weight file
SHARD_INDEX = "model.safetensors.index.json"
ST_ALIGN = 8  # the safetensors header is padded with spaces: tensor data starts 8-byte aligned
SAVE_SUFFIX = ".minimamba-save.tmp"  # save_pretrained's temporary files end so, and only they


# ==== Saving =====================================================================================

def save_pretrained(model: Mamba2LM, path, layout: str = "hf") -> Path:
    """Write config.json and the weights of model into the folder path, replacing the checkpoint
    there old-or-new (see the module docstring). layout "hf": model.safetensors and a
    Mamba2ForCausalLM config that transformers reads too; "mamba_ssm": pytorch_model.bin and a
    state-spaces config. Returns path."""
    _check_save_args(model, path, layout)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in _own_leftovers(path):  # temporary files of saves that were killed
        leftover.unlink(missing_ok=True)
    previous = _recorded_files(path)

    weights_name = LAYOUTS[layout]
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "hf":
        if model.config.tie_embeddings:
            sd.pop("lm_head.weight")
        sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
    config_text = json.dumps(config_to_dict(model.config, layout), indent=2).encode()

    staged = {}  # final name -> the temporary file that holds it
    try:
        # 1. the new files beside the old ones
        if layout == "hf":
            staged[weights_name] = _write_beside(path, weights_name, SAVE_SUFFIX,
                                                 lambda f: _write_safetensors(f, sd))
        else:
            staged[weights_name] = _write_beside(path, weights_name, SAVE_SUFFIX,
                                                 lambda f: torch.save(sd, f))
        staged["config.json"] = _write_beside(path, "config.json", SAVE_SUFFIX,
                                              lambda f: f.write(config_text))
        files = {name: sha256_of(tmp) for name, tmp in staged.items()}
        # 2. the manifest
        manifest = json.dumps({"layout": layout, "files": files}, indent=1).encode()
        staged[MANIFEST] = _write_beside(path, MANIFEST, SAVE_SUFFIX, lambda f: f.write(manifest))
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise

    # 3. the swap; the manifest first, so that a folder caught halfway never loads as a mix
    for name in (MANIFEST, weights_name, "config.json"):
        os.replace(staged[name], path / name)
    _fsync_folder(path)

    # 4. the previous save's files that this one replaced by nothing, if nobody changed them
    for name, digest in previous.items():
        old = path / name
        if name not in files and old.is_file() and sha256_of(old) == digest:
            old.unlink()
    return path


def _own_leftovers(folder: Path) -> list[Path]:
    """Temporary files that killed saves left in folder: the names save_pretrained gives them."""
    names = "|".join(re.escape(name) for name in (*LAYOUTS.values(), "config.json", MANIFEST))
    pattern = re.compile(rf"\.({names})\.\w+{re.escape(SAVE_SUFFIX)}")
    return [p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file()]


def _recorded_files(folder: Path) -> dict:
    """{name: sha256} of the weight files the manifest in folder records, or {} if it has none."""
    try:
        files = read_json(folder / MANIFEST)["files"]
        return {name: files[name] for name in WEIGHT_FILES if name in files}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def atomic_write(path, write) -> None:
    """Write a file through a temporary file in the same folder (".<name>.<random>.tmp"), fsync,
    then rename it over path: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = _write_beside(path.parent, path.name, ".tmp", write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_beside(folder: Path, name: str, suffix: str, write) -> Path:
    """write(f) into a new temporary file ".<name>.<random><suffix>" in folder, fsync'ed;
    returns its path. On a failure it is removed; a full disk is an error that says so."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        os.unlink(tmp)
        if _disk_full(e):
            free = shutil.disk_usage(folder).free
            raise OSError(errno.ENOSPC, f"the disk is full: writing {folder / name} failed with "
                          f"{free} bytes free; nothing was replaced, free some space and try "
                          "again") from e
        raise
    return Path(tmp)


def _disk_full(error: BaseException | None) -> bool:
    """Whether error, or an error it arose from, says the disk is full (torch.save reports a full
    disk as "unexpected pos ..." and keeps the OSError as the context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fsync_folder(folder: Path) -> None:
    """Make the renames in folder durable (a power loss after the save keeps the new files)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_to_dict(config: Mamba2Config, layout: str) -> dict:
    """The config.json of a layout ("hf" or "mamba_ssm") for config."""
    def plain(value):  # JSON has lists, not tuples
        return list(value) if isinstance(value, tuple) else value

    if layout == "hf":
        out = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"],
               "num_heads": config.nheads}
        out.update({theirs: plain(getattr(config, ours)) for theirs, ours in HF_NAMES.items()})
        out["vocab_size"] = config.padded_vocab_size  # Hugging Face stores the padded size
        return out
    ssm_cfg = {"layer": "Mamba2", **{k: plain(getattr(config, k)) for k in SSM_CFG_NAMES}}
    return {"d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [],
            "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": config.residual_in_fp32,
            "fused_add_norm": True, "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
            "tie_embeddings": config.tie_embeddings, "norm_epsilon": config.norm_eps}


def write_safetensors(path, tensors: dict) -> None:
    """Write {name: tensor} to a .safetensors file, atomically (tensors are copied to the CPU)."""
    _check_safetensors_dtypes(tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda f: _write_safetensors(f, tensors))


def _write_safetensors(f, tensors: dict) -> None:
    names = {dtype: name for name, dtype in ST_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % ST_ALIGN)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for t in tensors.values():
        if t.numel():
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


# ==== Loading any folder, every file checked ======================================================

def load_pretrained(path, dtype: torch.dtype | None = None, verify: bool = True,
                    **overrides) -> Mamba2LM:
    """Mamba2LM.from_pretrained for any checkpoint folder: also a sharded one (an index,
    model.safetensors.index.json, naming the shard of every tensor), and with every safetensors
    header checked against its file before a tensor is read (read_safetensors)."""
    path = Path(path)
    _check_load_args(path, dtype)
    saved = verified_files(path) if verify else None
    config = config_from_dict(read_json(path / "config.json"))
    file = weight_file(path, saved)
    if file.name == SHARD_INDEX:
        weights = _read_shards(file)
    elif file.suffix == ".safetensors":
        weights = read_safetensors(file)
    else:
        weights = read_weights(file)
    return build_model(Mamba2LM, config, weights, path, dtype, **overrides)


def _read_shards(index_file: Path) -> dict:
    """The tensors of a sharded checkpoint: every shard a file in the index's folder, every tensor
    in the one shard the index names."""
    folder, index = index_file.parent, read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    _check_weight_map(index_file, weight_map)
    weights = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(folder / shard)
        stray = sorted(k for k in part if weight_map.get(k) != shard or k in weights)
        if stray:
            raise ValueError(f"{folder / shard} holds tensors that another shard also holds or that "
                             f"{index_file.name} assigns elsewhere: {stray[:5]}")
        weights.update(part)
    if set(weights) != set(weight_map):
        missing = sorted(set(weight_map) - set(weights))[:5]
        raise ValueError(f"{index_file} lists tensors no shard holds: {missing}")
    return weights


def read_safetensors(path) -> dict:
    """{name: tensor} from a .safetensors file whose header was checked against the file first:
    its length; every entry's dtype, shape and data_offsets inside the data, holding exactly
    numel * itemsize bytes; no two entries overlapping. Nothing is read or allocated before."""
    check_safetensors_header(path)
    return minimamba.read_safetensors(path)


def check_safetensors_header(path) -> None:
    """Raise a ValueError naming the file if its safetensors header does not fit the file."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why):
        return ValueError(f"{path} is not a valid safetensors file: {why}")

    def uints(v):
        return isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
        if not 0 < n <= size - 8:
            raise bad(f"its header length ({n}) does not fit in its {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (isinstance(info, dict) and info.get("dtype") in ST_DTYPES
                and uints(info.get("shape")) and uints(info.get("data_offsets"))
                and len(info["data_offsets"]) == 2):
            raise bad(f"tensor {name!r} needs a known dtype, a shape of ints >= 0 and "
                      f"data_offsets; got {info}")
    data_size, previous = size - 8 - n, None
    for start, end, name, info in sorted((*info["data_offsets"], name, info)
                                         for name, info in header.items()):
        nbytes = math.prod(info["shape"]) * ST_DTYPES[info["dtype"]].itemsize
        if not start <= end <= data_size or end - start != nbytes:
            raise bad(f"tensor {name!r} ({info}) must hold exactly its bytes inside the "
                      f"{data_size}-byte data")
        if previous is not None and start < previous[0]:
            raise bad(f"the data of tensors {previous[1]!r} and {name!r} overlap")
        previous = (end, name)


# ==== Argument checks =============================================================================

def _check_save_args(model, path, layout) -> None:
    if not isinstance(model, Mamba2LM):
        raise TypeError(f"save_pretrained writes a minimamba.Mamba2LM, got {type(model).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")


def _check_safetensors_dtypes(tensors: dict) -> None:
    bad = {k: getattr(v, "dtype", type(v).__name__) for k, v in tensors.items()
           if not isinstance(v, torch.Tensor) or v.dtype not in ST_DTYPES.values()}
    if bad:
        raise ValueError(f"safetensors holds tensors of {sorted(ST_DTYPES)} only, got {bad}")


def _check_weight_map(index_file: Path, weight_map) -> None:
    def inside(shard):  # a plain file name: no folder, no way out of the checkpoint's folder
        return isinstance(shard, str) and Path(shard).name == shard and shard not in (".", "..")

    if not isinstance(weight_map, dict) or not all(inside(v) for v in weight_map.values()):
        raise ValueError(f"{index_file} needs a weight_map of tensor name -> shard file; shards "
                         f"must be files inside {index_file.parent}")
