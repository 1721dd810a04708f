"""checkpoints: write minimamba models in the two official layouts, all or nothing.

Reading is minimamba's job (Mamba2LM.from_pretrained reads both layouts with its own safetensors
reader, so that minimamba.py alone loads official weights). Writing lives here because it is what
training code needs, not what a reader of the model needs, and doing it safely takes a protocol:

    save_pretrained(model, path, layout="hf")      a folder that transformers and minimamba both read
    save_pretrained(model, path, layout="mamba_ssm")   the state-spaces layout (pytorch_model.bin)
    write_safetensors(path, tensors)               one .safetensors file (atomic)
    config_to_dict(config, layout)                 the config.json of a layout
    atomic_write(path, write)                      temporary file in the same folder, fsync, rename
    sha256_of(path)                                a file's hash, for manifests

The folder protocol of save_pretrained (a killed save never leaves a folder that loads as a mix of
two checkpoints; minimamba.MANIFEST names the manifest file):
    1. remove temporary files that killed saves left behind (".<name>.<random>.tmp");
    2. write the manifest {"complete": false}: from here until step 5 the folder reads as an
       interrupted save, and from_pretrained refuses it;
    3. remove every weight file of either layout (one layout per folder);
    4. write the weights and config.json, each through a temporary file and a rename;
    5. write the manifest {"complete": true, "files": [names]}: from_pretrained loads only the
       weight file it names.
Other files in the folder (a tokenizer, notes) are left alone.

Papers: the layouts are those of state-spaces/mamba (mamba_ssm) and Hugging Face transformers'
Mamba2ForCausalLM (see ../shared/MAMBA2.md section 2).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from minimamba import HF_NAMES, MANIFEST, SSM_CFG_NAMES, ST_DTYPES, Mamba2Config, Mamba2LM

LAYOUTS = {"hf": "model.safetensors", "mamba_ssm": "pytorch_model.bin"}  # layout -> its weight file
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # any layout's
ST_ALIGN = 8  # the safetensors header is padded with spaces so tensor data starts 8-byte aligned


def sha256_of(path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks (for manifests that must catch a damaged file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder (".<name>.<random>.tmp"), fsync, then rename
    over path: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files killed atomic writes left in folder; returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _write_safetensors(f, tensors: dict) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = {v: k for k, v in ST_DTYPES.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % ST_ALIGN)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for t in tensors.values():
        if t.numel():
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def write_safetensors(path, tensors: dict) -> None:
    """Write {name: tensor} to a .safetensors file (tensors are copied to contiguous CPU memory)."""
    bad = {k: v.dtype for k, v in tensors.items() if not isinstance(v, torch.Tensor) or v.dtype not in ST_DTYPES.values()}
    if bad:
        raise ValueError(f"safetensors holds tensors of {sorted(ST_DTYPES)} only, got {bad}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda f: _write_safetensors(f, tensors))


def config_to_dict(config: Mamba2Config, layout: str) -> dict:
    """The config.json of a layout ("hf" or "mamba_ssm") for config."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    if layout == "hf":
        out = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "num_heads": config.nheads}
        out.update({theirs: plain(getattr(config, ours)) for theirs, ours in HF_NAMES.items()})
        out["vocab_size"] = config.padded_vocab_size  # Hugging Face stores the padded size
        return out
    ssm_cfg = {"layer": "Mamba2", **{k: plain(getattr(config, k)) for k in SSM_CFG_NAMES}}
    return {"d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
            "tie_embeddings": config.tie_embeddings, "norm_epsilon": config.norm_eps}


def save_pretrained(model: Mamba2LM, path, layout: str = "hf") -> Path:
    """Write config.json and the weights of model to the folder path, all or nothing (see the
    module docstring). layout "hf": model.safetensors and a Mamba2ForCausalLM config that
    transformers reads too; "mamba_ssm": pytorch_model.bin and a state-spaces config. Returns path."""
    if not isinstance(model, Mamba2LM):
        raise TypeError(f"save_pretrained writes a minimamba.Mamba2LM, got {type(model).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # 1.
    manifest = lambda obj: atomic_write(path / MANIFEST, lambda f: f.write(json.dumps(obj, indent=1).encode()))  # noqa: E731
    manifest({"complete": False})  # 2.
    for name in WEIGHT_FILES:  # 3.
        (path / name).unlink(missing_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # 4.
    if layout == "hf":
        if model.config.tie_embeddings:
            sd.pop("lm_head.weight")
        sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
        write_safetensors(path / LAYOUTS[layout], sd)
    else:
        atomic_write(path / LAYOUTS[layout], lambda f: torch.save(sd, f))
    text = json.dumps(config_to_dict(model.config, layout), indent=2)
    atomic_write(path / "config.json", lambda f: f.write(text.encode()))
    manifest({"complete": True, "layout": layout, "files": [LAYOUTS[layout], "config.json"]})  # 5.
    return path
