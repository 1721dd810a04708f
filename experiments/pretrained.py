"""The papers' real-scale measurement on an official Mamba-2 checkpoint, in one command, on one GPU or a CPU.

Commands (run from the repository root; nothing downloads: fetch the checkpoint and the tokenizer yourself)
    # a CPU-sized run: 8K tokens of a text file, no mitigations (mamba2-130m: about 4 minutes on one CPU core)
    python -m experiments.pretrained --model path/to/mamba2-130m --tokenizer path/to/tokenizer.json \\
        --text book.txt --length 8192 --mitigations none --out_dir runs/pretrained_cpu
    # the paper's measurement: 64K tokens of the newline prompt, every mitigation at its default and tuned
    python -m experiments.pretrained --model path/to/mamba2-130m --prompt newlines --length 65536 \\
        --out_dir runs/pretrained_newlines
    # the same on text, with the forgetting curve of the same loaded model
    python -m experiments.pretrained --model path/to/mamba2-130m --text book.txt --length 65536 \\
        --forgetting_curve --out_dir runs/pretrained_text
A killed run continues where it stopped when the same command is run again (finished streams are read
back, an unfinished one restarts from its last saved segment); a run folder is refused to a command with
other settings (the error names them). experiments/gpu_pretrained.sh times it on a random 130M-shaped
checkpoint (a GPU, or any device).

Papers
    [SC]  Chen et al., "Stuffed Mamba", arXiv 2410.07145: per-position loss beyond the training length
          with the state carried (fp32), per-head state statistics every 128 tokens, the first-token
          retention alpha_{1:t}, the training-free mitigations (RRI, state normalization, sliding window;
          LongMamba's Delta scaling as the baseline).
    [FC]  Liu et al., "Forgetting Curve", arXiv 2410.04727 (--forgetting_curve, via forgetting_curve.py).
    [BG]  Buitrago Ruiz & Gu, arXiv 2507.02782: takes the official checkpoints' training length as 2K,
          where [SC] states 8K (see DEFAULT_TRAIN_LENGTH).

Reading order
    1. defaults          constants and PretrainedConfig (every flag, with its unit and why)
    2. tokens            the scored and validation stretches: a text file (tokenizers), ids, bytes, newlines
    3. one stream        run_stream: per-position loss with the state carried in pieces, and (base run)
                         the state statistics and first-token retention every BUCKET tokens
    4. mitigations       the default settings, the tuning grids, the with-block of a setting
    5. the run           run(): the base stream, each mitigation at its default, tuned on the validation
                         stretch and then scored; resume; results.json, stats.npz, the figure
    6. figure, command line

Glossary
    l  scored length (--length)       T  training length (--train_length)     V  vocabulary (real rows)
    L  layers   h  heads   p  headdim   n  d_state (a head's state is p x n)
    bucket  BUCKET consecutive positions whose losses are averaged ([SC]'s figures)
    alpha_{1:t} = exp(sum_{j=2..t} dt_j A): how much of the first token's write is left at position t

Outputs (one run folder, --out_dir)
    results.json        the resolved config, the model and data, the loss per bucket of every stream (the base
                        model, each mitigation default and tuned), the tuning table, times and peak memory
    stats.npz           the base stream's state statistics, arrays (points, layers, heads): mean, var, rms,
                        max_abs (the largest channel |h|), top_channel (its index p_i * n + n_i), norm
                        (||h||_F), retention; positions (points,)
    pretrained.png      loss vs position (the assumed training length marked) and the state statistics
    forgetting_curve.json / .png   with --forgetting_curve
    config.json         command, commit, versions, hardware, wall time of each invocation
    streams/            one JSON per finished stream, and the saved state of an unfinished one (resume)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mitigations as M
from minimamba import Mamba2LM, Mamba2State

from experiments.common import (ProgressBar, atomic_write_json, claim_run_folder, config_from_args, config_parser,
                                flag, resolve_device, write_run_config)

# ----------------------------------------------------------------------------------------------
# 1. Defaults
# ----------------------------------------------------------------------------------------------
BUCKET = 128  # tokens per loss bucket and between state statistics ([SC]'s official code: k = 128)
# The official checkpoints' training length, for the marker on the figure, the sliding window and the
# state-norm calibration. The papers disagree: [BG] (Gu co-wrote Mamba-2) take it as 2048 tokens, the length the
# Mamba-1 checkpoints were trained at (for comparison with Pythia); [SC] states 8K. 2048 is the default;
# --train_length 8192 draws [SC]'s reading.
DEFAULT_TRAIN_LENGTH = 2048
BYTE_VOCAB = 256  # a model with this vocabulary reads a text file as raw bytes (the project's byte-level models)
GPT_NEOX_NEWLINE_ID = 187  # "\n" in the GPT-NeoX tokenizer of state-spaces/mamba2-* (used without a tokenizer)
METHODS = ("rri", "delta_scaling", "state_norm", "sliding_window")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDS_SUFFIXES = (".npy", ".pt")  # token-id files: a 1-D integer array (numpy) or tensor (torch.save)


@dataclass(frozen=True)
class PretrainedConfig:
    """Everything a run depends on; each field is a flag --name value."""

    model: str = flag("", "checkpoint folder: config.json with pytorch_model.bin (state-spaces) or model.safetensors "
                          "(Hugging Face); required")
    tokenizer: str = flag("", "tokenizer.json of the tokenizers package; empty = MODEL/tokenizer.json if it exists")
    text: str = flag("", "the text: a text file (tokenized), a .npy/.pt of token ids, or any file read as bytes by a "
                         "byte-level (256-token) model; the scored stretch is its first LENGTH+1 tokens, the "
                         "validation stretch the VAL_LENGTH+1 after them")
    prompt: str = flag("", "'newlines': [SC]'s prompt of newline tokens instead of --text")
    newline_id: int = flag(-1, "the newline token id of --prompt newlines; -1 = from the tokenizer, 10 for a "
                               f"byte-level model, else {GPT_NEOX_NEWLINE_ID} (GPT-NeoX)")
    length: int = flag(65536, f"scored positions (tokens), a multiple of {BUCKET}")
    train_length: int = flag(DEFAULT_TRAIN_LENGTH, "the training length T the figure marks, the default sliding "
                             "window and the state-norm calibration length (tokens); 2048 as Buitrago Ruiz & Gu read "
                             "the official checkpoints, Stuffed Mamba states 8192")
    piece: int = flag(1024, "tokens per forward call of the loss-only streams; memory is O(piece x vocabulary)")
    segment: int = flag(4096, f"tokens between saves of a stream's state (what a killed run redoes at most), a "
                              f"multiple of {BUCKET}")
    mitigations: tuple[str, ...] = flag(METHODS, "mitigations to run, comma-separated, or none")
    tune: bool = flag(True, "tune each mitigation on the validation stretch and score the best setting too")
    val_length: int = flag(16384, "validation positions (tokens) of the tuning; the objective is their mean loss")
    rri_lambda_a: float = flag(0.9999, "RRI's default retention factor lambda_a ([SC], 370M)")
    rri_lambda_b: float = flag(0.75, "RRI's default insertion factor lambda_B ([SC], 370M)")
    delta_factor: float = flag(0.5, "Delta scaling's default factor (LongMamba's example)")
    window_mult: float = flag(1.0, "the sliding window's default length, in training lengths")
    norm_every: int = flag(BUCKET, "state normalization clamps every this many tokens ([SC]'s official code: 128)")
    norm_tau_scale: float = flag(1.0, "state normalization's default threshold, times the largest ||h||_F seen in "
                                      "the first TRAIN_LENGTH tokens of the validation stretch")
    rri_lambda_a_grid: tuple[float, ...] = flag((0.999, 0.9999, 0.99999), "RRI lambda_a values tuned")
    rri_lambda_b_grid: tuple[float, ...] = flag((0.5, 0.75, 1.0), "RRI lambda_B values tuned (with each lambda_a)")
    delta_factor_grid: tuple[float, ...] = flag((0.25, 0.5, 0.75), "Delta scaling factors tuned")
    window_mult_grid: tuple[float, ...] = flag((0.5, 1.0, 2.0, 4.0), "sliding windows tuned, in training lengths")
    norm_tau_scale_grid: tuple[float, ...] = flag((0.5, 1.0, 2.0), "state-norm threshold scales tuned")
    forgetting_curve: bool = flag(False, "also measure the forgetting curve of the same model (on the text, or on "
                                         "random tokens with --prompt newlines)")
    fc_lengths: tuple[int, ...] = flag((64, 256, 1024, 4096, 16384), "forgetting-curve dependency lengths (tokens)")
    fc_samples: int = flag(10, "forgetting-curve samples per length (the paper's 10)")
    dtype: str = flag("float32", f"weights' dtype, one of {', '.join(DTYPES)} (the state is always float32)")
    device: str = flag("auto", "torch device: auto = cuda if available, else cpu")
    threads: int = flag(0, "torch CPU threads; 0 = torch's default")
    out_dir: str = flag("runs/pretrained", "run folder")

    def __post_init__(self):
        positive = {k: getattr(self, k) for k in ("length", "train_length", "piece", "segment", "val_length",
                                                  "norm_every", "fc_samples")}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be a positive int, got {value!r}")
        for name in ("length", "segment"):
            if getattr(self, name) % BUCKET:
                raise ValueError(f"--{name} must be a multiple of {BUCKET} tokens (whole loss buckets), got "
                                 f"{getattr(self, name)}")
        if bool(self.text) == bool(self.prompt):
            raise ValueError("give exactly one of --text FILE and --prompt newlines")
        if self.prompt and self.prompt != "newlines":
            raise ValueError(f"--prompt takes 'newlines' (the paper's probe), got {self.prompt!r}")
        unknown = set(self.mitigations) - set(METHODS) - {"none"}
        if unknown or ("none" in self.mitigations and len(self.mitigations) > 1):
            raise ValueError(f"--mitigations takes none or some of {','.join(METHODS)}, got {','.join(self.mitigations)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")

    @property
    def methods(self) -> tuple[str, ...]:
        return () if "none" in self.mitigations else self.mitigations

    @property
    def needs_validation(self) -> bool:  # state_norm calibrates on the validation stretch even untuned
        return bool(self.methods) and (self.tune or "state_norm" in self.methods)


# ----------------------------------------------------------------------------------------------
# 2. Tokens: the scored stretch, then the validation stretch (disjoint), from one source
# ----------------------------------------------------------------------------------------------

def find_tokenizer(cfg: PretrainedConfig) -> Path | None:
    """--tokenizer, else MODEL/tokenizer.json if it exists, else None."""
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {cfg.tokenizer} is not a file (expected a tokenizer.json)")
        return Path(cfg.tokenizer)
    found = Path(cfg.model) / "tokenizer.json"
    return found if found.is_file() else None


def load_tokenizer(path: Path):
    """A tokenizers.Tokenizer from a local tokenizer.json (the package is imported here, only when needed)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"tokenizing with {path} needs the tokenizers package: pip install '.[pretrained]' "
                          "(or pip install tokenizers), or give token ids as a .npy/.pt file") from None
    return Tokenizer.from_file(str(path))


def read_ids(path: Path) -> torch.Tensor:
    """A .npy or .pt file of token ids (any integer shape, flattened) -> (N,) int64."""
    if path.suffix == ".npy":
        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{path} must hold an integer array of token ids, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)}")
    return ids.reshape(-1).long()


def text_ids(cfg: PretrainedConfig, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """All the token ids of --text (N,), and how they were made."""
    path = Path(cfg.text)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path} is not a file")
    if path.suffix in IDS_SUFFIXES:
        return read_ids(path), {"source": str(path), "tokenized_by": "token ids as given"}
    tokenizer = find_tokenizer(cfg)
    if tokenizer is not None:
        return (torch.tensor(load_tokenizer(tokenizer).encode(path.read_text(encoding="utf-8")).ids, dtype=torch.long),
                {"source": str(path), "tokenized_by": str(tokenizer)})
    if vocab_size == BYTE_VOCAB:
        return (torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long(),
                {"source": str(path), "tokenized_by": "raw bytes (a byte-level model)"})
    raise ValueError(f"--text {path} is text, but there is no tokenizer: --tokenizer is not given and "
                     f"{Path(cfg.model) / 'tokenizer.json'} does not exist, and the model is not byte-level "
                     f"(vocab_size {vocab_size}, not {BYTE_VOCAB}). Give --tokenizer path/to/tokenizer.json (for "
                     "state-spaces/mamba2-*: the GPT-NeoX tokenizer.json of EleutherAI/gpt-neox-20b), or token ids "
                     f"as a {' or '.join(IDS_SUFFIXES)} file")


def newline_id(cfg: PretrainedConfig, vocab_size: int) -> int:
    """The newline token: --newline_id, else the tokenizer's, else a byte model's 10, else GPT-NeoX's."""
    if cfg.newline_id >= 0:
        return cfg.newline_id
    tokenizer = find_tokenizer(cfg)
    if tokenizer is not None:
        ids = load_tokenizer(tokenizer).encode("\n").ids
        if len(ids) != 1:
            raise ValueError(f"{tokenizer} encodes a newline as {len(ids)} tokens {ids}: give --newline_id")
        return ids[0]
    return ord("\n") if vocab_size == BYTE_VOCAB else GPT_NEOX_NEWLINE_ID


def stretches(cfg: PretrainedConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict]:
    """(scored ids (l+1,), validation ids (val_length+1,) or None, every id of the source, description).

    Text: the scored stretch is the first l+1 tokens, the validation stretch the val_length+1 after them
    (disjoint: the tuning never sees a scored token). Newlines: both are newline prompts (the prompt has no
    disjoint text; tuning on it is tuning on the probe itself, and results.json says so)."""
    need_val = cfg.val_length + 1 if cfg.needs_validation else 0
    if cfg.prompt:
        nl = newline_id(cfg, vocab_size)
        if not 0 <= nl < vocab_size:
            raise ValueError(f"the newline id {nl} is outside the model's vocabulary of {vocab_size}")
        scored = torch.full((cfg.length + 1,), nl, dtype=torch.long)
        val = torch.full((need_val,), nl, dtype=torch.long) if need_val else None
        return scored, val, scored, {"source": "newlines", "newline_id": nl,
                                     "validation": "a newline prompt too (not disjoint text)" if need_val else None}
    ids, about = text_ids(cfg, vocab_size)
    if ids.numel() < cfg.length + 1 + need_val:
        raise ValueError(f"--text {cfg.text} gives {ids.numel()} tokens; the scored stretch needs --length + 1 = "
                         f"{cfg.length + 1}" + (f" and the validation stretch --val_length + 1 = {need_val} more"
                                                 if need_val else "") + ": give a longer text or smaller lengths")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids lie in [{ids.min().item()}, {ids.max().item()}], outside the model's "
                         f"vocabulary [0, {vocab_size})")
    scored = ids[:cfg.length + 1]
    val = ids[cfg.length + 1:cfg.length + 1 + need_val] if need_val else None
    return scored, val, ids, {**about, "tokens": ids.numel(),
                              "validation": f"tokens {cfg.length + 1}..{cfg.length + need_val} (after the scored "
                                            "stretch)" if need_val else None}


# ----------------------------------------------------------------------------------------------
# 3. One stream: per-position loss with the state carried, and the state statistics
# ----------------------------------------------------------------------------------------------
STAT_NAMES = ("mean", "var", "rms", "max_abs", "top_channel", "norm", "retention")


@contextlib.contextmanager
def recording_retention(model, log_retention=None, position=0):
    """Every mixer's scan wrapped in a mitigations.RetentionRecorder for the block (the mixer.scan hook),
    continuing from `position` with the log_retention reached there; yields them."""
    mixers = [layer.mixer for layer in model.backbone.layers]
    old = [m.scan for m in mixers]
    scans = [M.RetentionRecorder(s, None if log_retention is None else log_retention[i], position)
             for i, s in enumerate(old)]
    for m, s in zip(mixers, scans):
        m.scan = s
    try:
        yield scans
    finally:
        for m, s in zip(mixers, old):
            m.scan = s


def state_row(state: Mamba2State, scans: list[M.RetentionRecorder]) -> dict[str, torch.Tensor]:
    """The statistics of one moment, each (L, h): mitigations.state_statistics of every layer's state, and
    the first-token retention alpha_{1:t}."""
    per_layer = [M.state_statistics(s, top_k=1) for s in state.ssm]
    row = {k: torch.stack([d[k] for d in per_layer]) for k in ("mean", "var", "rms", "max_abs", "norm")}
    row["top_channel"] = torch.stack([d["top_channels"][:, 0] for d in per_layer]).double()
    row["retention"] = torch.stack([torch.exp(s.log_retention).mean(0) for s in scans])
    return row


# A stream's saved state holds tensors, lists, dicts, ints and strings only, so torch.load(weights_only=True)
# reads it back (no pickled objects); a mitigation's state object is stored as its fields.
_STATE_TYPES = {"NormState": M.NormState, "WindowState": M.WindowState}


def pack_state(state: Mamba2State) -> dict:
    def one(s):
        if s is None or isinstance(s, torch.Tensor):
            return {"type": "tensor", "value": s}
        if type(s).__name__ not in _STATE_TYPES:
            raise TypeError(f"cannot save a {type(s).__name__} state")
        return {"type": type(s).__name__, **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}}
    return {"conv": list(state.conv), "ssm": [one(s) for s in state.ssm], "seqlen": state.seqlen}


def unpack_state(d: dict, device) -> Mamba2State:
    to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    def one(s):
        if s["type"] == "tensor":
            return to(s["value"])
        return _STATE_TYPES[s["type"]](**{k: to(v) for k, v in s.items() if k != "type"})
    return Mamba2State([to(c) for c in d["conv"]], [one(s) for s in d["ssm"]], d["seqlen"])


@torch.no_grad()
def run_stream(model, ids: torch.Tensor, *, piece: int, with_stats: bool = False, segment: int | None = None,
               save=None, resume: dict | None = None, on_tokens=None) -> dict:
    """Stream ids (l+1,) through the model, the state carried from call to call (bounded memory: one call
    holds piece x V logits), and return the loss at each position t of predicting ids[t+1] from ids[..t],
    over the first vocab_size logits (a padded vocabulary's extra rows are not tokens).

    with_stats: calls of BUCKET tokens, and after each the state statistics of every layer and head
    (state_row). save(snapshot) is called every `segment` tokens with what resume= takes back
    (the position, the packed state, the losses and statistics so far). on_tokens(n) after each call.
    Returns {"loss": (l,) float64, "stats": {name: (points, L, h)} or None, "positions": [...]}."""
    l, device, vocab = ids.numel() - 1, model.lm_head.weight.device, model.config.vocab_size
    step = BUCKET if with_stats else piece
    if segment is not None and segment % step and with_stats:
        raise ValueError(f"segment ({segment}) must be a multiple of {step}")
    pos, state, losses, rows, positions, log_ret = 0, None, [], [], [], None
    if resume is not None:
        pos, state = resume["position"], unpack_state(resume["state"], device)
        losses, positions = [resume["loss"]], list(resume["positions"])
        rows = [resume["stats"]] if resume["stats"] is not None else []
        log_ret = [t.to(device) for t in resume["log_retention"]] if with_stats else None
    recorder = recording_retention(model, log_ret, position=pos) if with_stats else contextlib.nullcontext([])
    with recorder as scans:
        while pos < l:
            end = min(pos + step, l, (pos // segment + 1) * segment if segment else l)
            logits, state = model(ids[None, pos:end].to(device), state)  # (1, k, V_padded)
            loss = F.cross_entropy(logits[0, :, :vocab].float(), ids[pos + 1:end + 1].to(device), reduction="none")
            losses.append(loss.double().cpu())
            del logits
            if with_stats:
                rows.append({k: v.cpu()[None] for k, v in state_row(state, scans).items()})
                positions.append(end)
            pos, done = end, end - pos
            if on_tokens is not None:
                on_tokens(done)
            if save is not None and pos < l and segment and pos % segment == 0:
                save({"position": pos, "state": pack_state(state), "loss": torch.cat(losses), "positions": positions,
                      "stats": _cat_rows(rows),
                      "log_retention": [s.log_retention.cpu() for s in scans] if with_stats else None})
    return {"loss": torch.cat(losses), "stats": _cat_rows(rows), "positions": positions}


def _cat_rows(rows: list[dict]) -> dict | None:
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else None


def buckets(loss: torch.Tensor, size: int = BUCKET) -> list[float]:
    """Mean loss of each run of `size` positions ([SC]'s figures): (l,) -> l / size values."""
    return loss.reshape(-1, size).mean(dim=1).tolist()


# ----------------------------------------------------------------------------------------------
# 4. Mitigations: a setting is (method, parameters); its with-block; the default and the grid
# ----------------------------------------------------------------------------------------------

def setting_name(method: str, params: dict) -> str:
    return f"{method}(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"


def default_setting(cfg: PretrainedConfig, method: str) -> dict:
    return {"rri": {"lambda_a": cfg.rri_lambda_a, "lambda_B": cfg.rri_lambda_b},
            "delta_scaling": {"factor": cfg.delta_factor},
            "state_norm": {"every": cfg.norm_every, "tau_scale": cfg.norm_tau_scale},
            "sliding_window": {"window": max(1, round(cfg.window_mult * cfg.train_length))}}[method]


def grid(cfg: PretrainedConfig, method: str) -> list[dict]:
    if method == "rri":
        return [{"lambda_a": a, "lambda_B": b} for a in cfg.rri_lambda_a_grid for b in cfg.rri_lambda_b_grid]
    if method == "delta_scaling":
        return [{"factor": f} for f in cfg.delta_factor_grid]
    if method == "state_norm":
        return [{"every": cfg.norm_every, "tau_scale": s} for s in cfg.norm_tau_scale_grid]
    return [{"window": max(1, round(m * cfg.train_length))} for m in cfg.window_mult_grid]


def mitigation_block(model, method: str, params: dict, calibration: torch.Tensor | None):
    """The with-block of mitigations.py that applies a setting to every layer. state_norm's thresholds are
    tau_scale x the largest ||h||_F per layer and head seen on `calibration` (1, <= T) (calibrate_state_norm)."""
    if method == "rri":
        return M.rri(model, lambda_a=params["lambda_a"], lambda_B=params["lambda_B"])
    if method == "delta_scaling":
        return M.delta_scaling(model, params["factor"])
    if method == "sliding_window":
        return M.sliding_window(model, params["window"])
    taus = M.calibrate_state_norm(model, calibration, every=params["every"])
    return M.state_norm(model, taus * params["tau_scale"], every=params["every"])


# ----------------------------------------------------------------------------------------------
# 5. The run: streams in a run folder, resumable
# ----------------------------------------------------------------------------------------------

def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")


class Streams:
    """The streams of a run folder: streams/<key>.json when finished, streams/<key>.partial.pt while running."""

    def __init__(self, out: Path):
        self.dir = out / "streams"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, key: str) -> dict | None:
        path = self.dir / f"{_slug(key)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def partial(self, key: str) -> dict | None:
        path = self.dir / f"{_slug(key)}.partial.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def save_partial(self, key: str, snapshot: dict) -> None:
        from checkpoints import atomic_write
        atomic_write(self.dir / f"{_slug(key)}.partial.pt", lambda f: torch.save(snapshot, f))

    def finish(self, key: str, result: dict, stats: dict | None = None) -> None:
        if stats is not None:
            np.savez(self.dir / f"{_slug(key)}.stats.npz", **{k: v.numpy() for k, v in stats.items()})
        atomic_write_json(self.dir / f"{_slug(key)}.json", result)
        (self.dir / f"{_slug(key)}.partial.pt").unlink(missing_ok=True)

    def stats(self, key: str) -> dict:
        with np.load(self.dir / f"{_slug(key)}.stats.npz") as z:
            return {k: z[k] for k in z.files}


def model_fingerprint(model: Mamba2LM, folder: Path) -> dict:
    """What identifies the loaded model: its config.json's hash and a checksum of every parameter."""
    total = sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item() for p in model.parameters())
    return {"config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
            "parameter_checksum": f"{total:.10e}"}


RUN_KIND = "experiments.pretrained run"  # what config.json records as the folder's maker
RESUME_IGNORES = ("device", "threads", "out_dir", "forgetting_curve", "fc_lengths", "fc_samples")


def peak_memory() -> dict:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak allocated GPU memory (MiB)."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def summary(loss_buckets: list[float], train_length: int) -> dict:
    """Mean loss over positions [0, T) and [T, l) (whole buckets), and the largest bucket beyond T."""
    b, k = np.asarray(loss_buckets), train_length // BUCKET
    return {"mean_within_T": float(b[:k].mean()) if k else None,
            "mean_beyond_T": float(b[k:].mean()) if k < b.size else None,
            "max_bucket_beyond_T": float(b[k:].max()) if k < b.size else None}


def run(cfg: PretrainedConfig) -> dict:
    """The whole measurement (see the module docstring); returns what results.json holds. --threads holds
    for the run only (the caller's setting is put back)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads or threads)
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: PretrainedConfig) -> dict:
    t0 = time.perf_counter()
    out, device = Path(cfg.out_dir), resolve_device(cfg.device)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out_dir {out} is a file; it names a folder")
    model = Mamba2LM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype]).to(device).eval()
    vocab = model.config.vocab_size
    scored, val, all_ids, data = stretches(cfg, vocab)
    settings = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_IGNORES},
                "model_fingerprint": model_fingerprint(model, Path(cfg.model)),
                "scored_sha256": hashlib.sha256(scored.numpy().tobytes()).hexdigest(),
                "validation_sha256": None if val is None else hashlib.sha256(val.numpy().tobytes()).hexdigest()}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the file holds them
    # the run folder: its record first, a lock, and a refusal (before writing) to continue under other settings
    lock = claim_run_folder(out, RUN_KIND, dataclasses.asdict(cfg), settings, resume=True)
    try:
        store = Streams(out)
        calibration = val[None, :cfg.train_length].to(device) if val is not None else None

        # the work: (key, ids, method, params, with_stats); the tuned streams are added once the grid is scored
        plan = [("scored/base", scored, None, {}, True)]
        for method in cfg.methods:
            plan.append((f"scored/{setting_name(method, default_setting(cfg, method))}", scored, method,
                         default_setting(cfg, method), False))
            if cfg.tune:
                plan += [(f"val/{setting_name(method, p)}", val, method, p, False) for p in grid(cfg, method)]
        pending = sum(ids.numel() - 1 for key, ids, *_ in plan if store.done(key) is None)
        pending += cfg.length * len(cfg.methods) * cfg.tune  # the tuned streams (at most one per method)
        bar = ProgressBar(pending, desc="pretrained")

        def stream(key, ids, method, params, with_stats):
            if (done := store.done(key)) is not None:
                return done
            bar.desc = f"{key}"
            part = store.partial(key)
            ctx = contextlib.nullcontext() if method is None else mitigation_block(model, method, params, calibration)
            t1 = time.perf_counter()
            with ctx:
                res = run_stream(model, ids, piece=cfg.piece, with_stats=with_stats, segment=cfg.segment,
                                 save=lambda snap: store.save_partial(key, snap), resume=part,
                                 on_tokens=lambda n: bar.update(n))
            loss = res["loss"]
            result = {"key": key, "method": method or "none", "params": params, "positions": int(loss.numel()),
                      "mean_loss": loss.mean().item(), "loss_buckets": buckets(loss) if loss.numel() % BUCKET == 0
                      else None, "seconds": round(time.perf_counter() - t1, 1), "resumed_at": part and part["position"]}
            if with_stats:
                result["stat_positions"] = res["positions"]
            store.finish(key, result, res["stats"])
            return result

        results = {"base": None, "mitigations": {}}
        for key, ids, method, params, with_stats in plan:
            r = stream(key, ids, method, params, with_stats)
            if method is None:
                results["base"] = r
            else:
                entry = results["mitigations"].setdefault(method, {"default": None, "validation": []})
                entry["default" if key.startswith("scored/") else "validation"] = (
                    r if key.startswith("scored/") else entry["validation"] + [r])
        for method, entry in results["mitigations"].items():
            if entry["validation"]:
                best = min(entry["validation"], key=lambda r: r["mean_loss"])
                key = f"scored/{setting_name(method, best['params'])}"
                if store.done(key) is not None:  # the default, or finished before a kill: counted in the bar all the same
                    bar.update(cfg.length)
                entry["tuned"] = stream(key, scored, method, best["params"], False)
                entry["validation"] = [{"params": r["params"], "mean_loss": r["mean_loss"]} for r in entry["validation"]]
        bar.close()

        stats = {"positions": np.asarray(results["base"]["stat_positions"]), **store.stats("scored/base")}
        np.savez(out / "stats.npz", **stats)
        c = model.config
        report = {"config": dataclasses.asdict(cfg),
                  "model": {"folder": cfg.model, "d_model": c.d_model, "n_layer": c.n_layer, "vocab_size": c.vocab_size,
                            "nheads": c.nheads, "headdim": c.headdim, "d_state": c.d_state, "ngroups": c.ngroups,
                            "state_size": M.state_size(c), "dtype": cfg.dtype, **settings["model_fingerprint"]},
                  "data": data, "bucket": BUCKET, "train_length_assumed": cfg.train_length,
                  "validation": {"objective": "mean loss over the validation stretch's positions", **(
                      {"stretch": data["validation"]} if val is not None else {})},
                  "base": {**{k: v for k, v in results["base"].items() if k != "stat_positions"},
                           **summary(results["base"]["loss_buckets"], cfg.train_length),
                           "stats_file": "stats.npz", "stats_per_layer": _layer_summary(stats)},
                  "mitigations": {m: {**e, **{f"{which}_summary": summary(e[which]["loss_buckets"], cfg.train_length)
                                              for which in ("default", "tuned") if which in e}}
                                  for m, e in results["mitigations"].items()},
                  "device": str(device), "wall_s": round(time.perf_counter() - t0, 1), **peak_memory()}
        if cfg.forgetting_curve:
            report["forgetting_curve"] = run_forgetting_curve(cfg, model, all_ids if cfg.text else None, out)
        plot(report, stats, out / "pretrained.png")
        report.update(peak_memory())
        atomic_write_json(out / "results.json", report)
        write_run_config(out, dataclasses.asdict(cfg), kind=RUN_KIND, wall_s=time.perf_counter() - t0,
                         record={k: report[k] for k in ("device", "peak_rss_mib")})
        return report

    finally:
        lock.release()

def _layer_summary(stats: dict) -> dict:
    """Per layer, over heads and positions: the largest RMS, the largest |h|, the smallest and largest
    final first-token retention (what the figure shows)."""
    return {"max_rms": stats["rms"].max(axis=(0, 2)).tolist(), "max_abs": stats["max_abs"].max(axis=(0, 2)).tolist(),
            "final_retention_max": stats["retention"][-1].max(axis=-1).tolist(),
            "final_retention_min": stats["retention"][-1].min(axis=-1).tolist()}


def run_forgetting_curve(cfg: PretrainedConfig, model, tokens: torch.Tensor | None, out: Path) -> dict:
    """[FC] on the same loaded model: on the text's tokens, or random tokens (the newline prompt is no text)."""
    from experiments.measure_curve import measure_curve  # forgetting_curve(), resumable
    path = out / "forgetting_curve.json"
    curve = measure_curve(model, out=path, resume=path.is_file(), lengths=cfg.fc_lengths, tokens=tokens,
                          vocab_size=model.config.vocab_size, n_samples=cfg.fc_samples,
                          meta={"checkpoint": cfg.model, "text": cfg.text or "random tokens",
                                "train_length": cfg.train_length})
    curve.plot(out / "forgetting_curve.png", train_length=cfg.train_length,
               title=f"Forgetting curve: {cfg.model}")
    return {"file": path.name, "figure": "forgetting_curve.png", **curve.summary()}


# ----------------------------------------------------------------------------------------------
# 6. The figure and the command line
# ----------------------------------------------------------------------------------------------
RETENTION_FLOOR = 1e-12  # the retention panel's lowest value (a head below it has forgotten the first token)
METHOD_COLORS = {"rri": "tab:blue", "delta_scaling": "tab:orange", "state_norm": "tab:green",
                 "sliding_window": "tab:red"}


def plot(report: dict, stats: dict, path: Path) -> None:
    """Loss per bucket vs position (base, each mitigation default dashed and tuned solid) with the assumed
    training length marked; per layer, over heads: the largest state RMS, largest channel |h|, and the
    largest first-token retention."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T = report["train_length_assumed"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    centres = lambda n: (np.arange(n) + 0.5) * BUCKET  # noqa: E731
    ax = axes[0, 0]
    ax.plot(centres(len(report["base"]["loss_buckets"])), report["base"]["loss_buckets"], color="black", lw=1.2,
            label="no mitigation")
    for method, e in report["mitigations"].items():
        for which, style in (("default", "--"), ("tuned", "-")):
            if which in e and e[which]["loss_buckets"]:
                ax.plot(centres(len(e[which]["loss_buckets"])), e[which]["loss_buckets"], style, lw=0.9,
                        color=METHOD_COLORS[method], label=f"{which}: {setting_name(method, e[which]['params'])}")
    ax.set(xlabel="position (tokens)", ylabel=f"loss (nats), mean per {BUCKET} tokens", title="per-position loss")
    positions = stats["positions"]
    panels = [(axes[0, 1], "rms", "largest head RMS of the state"),
              (axes[1, 0], "max_abs", "largest channel |h| (over heads)"),
              (axes[1, 1], "retention", "largest first-token retention alpha_{1:t}")]
    colors = plt.cm.viridis(np.linspace(0, 1, stats["rms"].shape[1]))
    for ax_, name, title in panels:
        values = stats[name].max(axis=-1)  # (points, L)
        for layer in range(values.shape[1]):
            ax_.plot(positions, values[:, layer], color=colors[layer], lw=0.8,
                     label=f"layer {layer}" if layer in (0, values.shape[1] - 1) else None)
        ax_.set(xlabel="position (tokens)", title=title + " per layer", yscale="log")
        if name == "retention":  # the heads that keep (near 1) stay readable; faster ones leave at the bottom
            ax_.set_ylim(max(float(values.min()), RETENTION_FLOOR), 2.0)
        ax_.legend(fontsize=7)
    for ax_ in axes.flat:
        ax_.axvline(T, color="grey", ls=":", lw=1)
    axes[0, 0].axvline(T, color="grey", ls=":", lw=1, label=f"assumed training length T = {T} (--train_length)")
    axes[0, 0].legend(fontsize=6)
    data = report["data"]
    fig.suptitle(f"{report['model']['folder']} on {data['source']}: the marker assumes T = {T} tokens "
                 f"(Buitrago Ruiz & Gu: 2048; Stuffed Mamba: 8192)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    return config_parser(PretrainedConfig, __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(PretrainedConfig, args)
        if not cfg.model:
            raise ValueError("--model is required: a checkpoint folder (config.json + pytorch_model.bin or "
                             "model.safetensors)")
    except ValueError as e:
        build_parser().error(str(e))
    report = run(cfg)
    print(json.dumps({"base": {k: report["base"][k] for k in ("mean_loss", "mean_within_T", "mean_beyond_T")},
                      **{m: {w: e[f"{w}_summary"] for w in ("default", "tuned") if f"{w}_summary" in e}
                         for m, e in report["mitigations"].items()},
                      "wall_s": report["wall_s"], "peak_rss_mib": report["peak_rss_mib"]}, indent=1))
    print(f"wrote {Path(cfg.out_dir) / 'results.json'} and {Path(cfg.out_dir) / 'pretrained.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
