"""The one training loop of the experiments: byte-level Mamba-2 (or the Transformer baseline), the way
Stuffed Mamba trains long.

Commands (run from the repository root)
    # CPU, about a minute: a 2-layer toy on the standard-library corpus, T_train = 64
    python -m experiments.train --out_dir runs/toy --steps 300 --seq_len 64
    # truncated BPTT: 4 chained segments of 64 tokens per row, state carried (detached) between them
    python -m experiments.train --out_dir runs/tbptt --seq_len 64 --n_segments 4
    # [UE]'s training-side fixes: each row starts from the previous step's final state (or fitted noise)
    python -m experiments.train --out_dir runs/passing --seq_len 64 --init_state state_passing
    # continue a killed run exactly where its last checkpoint left it
    python -m experiments.train --out_dir runs/toy --steps 300 --seq_len 64 --resume
    # ... with another learning rate than the checkpoint's (without the flag that is an error)
    python -m experiments.train --out_dir runs/toy --steps 300 --seq_len 64 --resume --lr 1e-3 --override_config
    # several processes (GPUs with NCCL; on CPU the same code uses gloo)
    torchrun --nproc_per_node 2 -m experiments.train --out_dir runs/ddp --batch_size 32
    # any text file or folder instead of the standard library
    python -m experiments.train --data path/to/text --out_dir runs/mytext
    # half the rows copy episodes (the regime in which toy models collapse; see state_collapse.py)
    python -m experiments.train --task mix --seq_len 16 --d_state 256 --headdim 32 --out_dir runs/mix
    # the Transformer baseline on the forgetting-curve task
    python -m experiments.train --arch transformer --n_head 2 --task copymix --lr 1e-3 --out_dir runs/tf

Paper
    Stuffed Mamba (arXiv 2410.07145), "Training": models are trained on length-T_train segments with
    truncated BPTT - the initial state of a segment is the (detached) final state of the previous
    segment of the same document stream, 12 chained segments in the paper.
    [UE] Buitrago Ruiz & Gu, arXiv 2507.02782: rows that start from other states than zero (State
    Passing, noise, fitted noise; InitialStates) so that training explores the states met beyond T.

Reading order
    1. TrainConfig       every knob, with units; the flags are its field names (--help lists them)
    2. the pieces        batches (a task name, or the caller's batch function), the weighted loss,
                         the lr schedule, the optimizer (weight-decay groups)
    3. checkpoints       save_checkpoint (temporary folder, COMPLETE marker, rename), the resume
                         protocol (weights_only loads, the config check, fallback to an older one)
    4. train()           setup, then the step loop: (a) batch = pure function of (seed, step)
                         (b) TBPTT over N segments with grad accumulation (c) a non-finite loss or
                         gradient stops the run (d) clip, AdamW step (e) log (f) atomic checkpoint

Glossary
    b  global batch rows per optimizer step (all ranks, all micro-batches together)
    T  seq_len: tokens per segment, the paper's T_train
    N  n_segments: chained segments per row (truncated BPTT)
    V  vocabulary, 256 bytes (padded to the model's padded_vocab_size in the logits)
    w  per-target loss weight; the loss is sum(w * ce) / sum(w) over the global batch

Outputs (all in --out_dir)
    config.json        the run record, written before anything else: run_kind "train.py run", the
                       settings a --resume must match (the recipe and the sha256 of the data read),
                       resolved config, model facts, command, git commit, versions, hardware (per run)
    .lock              held while a process trains in the folder (its pid inside)
    metrics.csv        one row per logged step: loss, lr, grad norm, tokens/s, held-out loss
    checkpoints/step_XXXXXXXX/   model/ (Mamba2LM or TinyTransformer save_pretrained: from_pretrained
                       loads it), trainer.pt (optimizer, step, config, RNG states: tensors and plain
                       data only, loaded with weights_only=True), COMPLETE (written last, with
                       the sha256 of every file in the checkpoint). A
                       checkpoint is built under checkpoints/.tmp-* and renamed into place; the
                       temporary folders of killed writes are removed at the next start and save.

Faults and what happens (the messages name the file, the step and the fix; a refused run writes nothing)
    --out_dir holding anything but a train.py run (a saved model, a sweep, other files), or a run
        without --resume -> RunFolderError (exit code 1); a folder in use -> the same, naming the pid
    --resume with other settings than the record's or the checkpoint's, or other data contents ->
        error naming each field (recorded/checkpoint vs now); --override_config takes the new
        values, except model sizes (never)
    a newest checkpoint that cannot be read (a file failing its hash, or trainer.pt holding a
        non-tensor object) -> said on stderr, moved to checkpoints/.unusable-step_XXXXXXXX, the
        previous one used; none usable -> CheckpointError (exit code 1)
    a non-finite loss or gradient norm (or weight, at a checkpoint) -> TrainingDiverged: the run
        stops before the optimizer step, nothing is saved from then on (exit code 1)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import minimamba_kernels as kernels
from checkpoints import save_pretrained, sha256_of
from minimamba import Mamba2Config, Mamba2LM, Mamba2State

from experiments.common import (RUN_RECORD, BadFileError, CsvLog, ProgressBar, RunFolderError, check_run_folder,
                                check_seeds, claim_run_folder, config_parser, flag, fsync_dir, parse_config,
                                resolve_device, write_run_config)
from experiments.data import VOCAB_SIZE, Corpus, copy_batch, copymix_batch, corpus_sha256
from experiments.tiny_transformer import TinyTransformer, TransformerConfig

# ----------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"  # written last inside a checkpoint (every file's sha256); without it: ignored
TEMP_PREFIX = ".tmp-"  # checkpoints/.tmp-step_XXXXXXXX-<pid>: a checkpoint being written
UNUSABLE_PREFIX = ".unusable-"  # checkpoints/.unusable-step_XXXXXXXX: one that could not be read
NO_DECAY_NAMES = ("dt_bias", "A_log", "D")  # SSM parameters never decayed (official Mamba-2 practice)
ARCHS = ("mamba2", "transformer")
TASKS = ("lm", "copy", "mix", "copymix", "custom")
INIT_STATES = ("zero", "state_passing", "noise", "fitted_noise")  # [UE] arXiv 2507.02782, section 4
STATE_STATS_MOMENTUM = 0.9  # noise / fitted_noise: moving average of final-state moments, per step  # custom: the caller's batch_fn (train(cfg, batch_fn))
METRIC_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "heldout_loss", "wall_s")
MAMBA_ONLY = ("d_state", "headdim", "expand", "ngroups", "chunk_size", "dt_min", "dt_max", "accelerate")
TRANSFORMER_ONLY = ("n_head",)
# What --resume compares with the checkpoint's config:
MODEL_FIELDS = ("arch", "d_model", "n_layer", "d_state", "headdim", "expand", "ngroups", "n_head")  # never change
FREE_FIELDS = ("out_dir", "log_every", "eval_every", "eval_windows", "ckpt_every", "keep_ckpts", "resume",
               "override_config", "stop_at", "device", "threads", "progress")  # bookkeeping: may change
# every other field is the recipe: a difference is an error unless --override_config
RUN_KIND = "train.py run"  # the run_kind in config.json of a train.py run folder
DATA_KEY = "data_sha256"  # the run record's setting for the contents of the data read (data.corpus_sha256)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Each field is also a command-line flag (--name value)."""

    # --- model ---
    arch: str = flag("mamba2", "model: mamba2 (minimamba.Mamba2LM) | transformer (experiments/tiny_transformer.py)")
    d_model: int = flag(64, "d, residual width (channels)")
    n_layer: int = flag(2, "number of blocks")
    d_state: int = flag(64, "n, SSM state size per head, the paper's N (mamba2 only)")
    headdim: int = flag(16, "p, channels per head, the paper's P (mamba2 only)")
    expand: int = flag(2, "e, d_inner = e * d_model (mamba2 only)")
    ngroups: int = flag(1, "g, B/C groups (mamba2 only)")
    chunk_size: int = flag(64, "q, SSD chunk length in tokens; any q gives the same function (mamba2 only)")
    dt_min: float = flag(1e-3, "lower end of the Delta init range, official 1e-3 (mamba2 only)")
    dt_max: float = flag(1e-1, "upper end of the Delta init range, official 1e-1; smaller = slower initial "
                              "decay (mamba2 only)")
    accelerate: bool = flag(True, "kernels.accelerate(model): the same function, faster (mamba2 only)")
    n_head: int = flag(2, "attention heads; head size d_model / n_head (transformer only)")
    # --- data ---
    data: str = flag("", "text file or folder; empty = this Python's standard library")
    task: str = flag("lm", "lm: the corpus | copy: random-byte copy episodes | mix: even rows lm, odd rows "
                           "copy | copymix: even rows lm, odd rows the forgetting-curve layout [SEP] x [SEP] x "
                           "(data.copymix_batch) | custom: the caller's batch_fn (Python only)")
    copy_len: int = flag(8, "random bytes per copy episode of --task copy/mix (an episode is [r, r])")
    seq_len: int = flag(64, "T, tokens per segment (the paper's T_train)")
    n_segments: int = flag(1, "N, chained segments per row, state carried detached (truncated BPTT)")
    init_state: str = flag("zero", "initial state of each row (mamba2 only): zero | state_passing (the final state "
                                   "of the same micro-batch row one step earlier, another sequence, detached) | "
                                   "noise (Gaussian at the overall RMS of recent final states) | fitted_noise "
                                   "(Gaussian with the per-entry mean and std of recent final states) [UE]")
    batch_size: int = flag(16, "b, global rows per optimizer step (summed over ranks and micro-batches)")
    grad_accum: int = flag(1, "micro-batches per step on each rank")
    # --- optimization ---
    steps: int = flag(1000, "optimizer steps")
    lr: float = flag(3e-3, "peak learning rate")
    min_lr_ratio: float = flag(0.1, "final lr = lr * min_lr_ratio (cosine decay)")
    warmup_steps: int = flag(50, "steps of linear warmup from lr / warmup_steps to lr")
    weight_decay: float = flag(0.1, "AdamW decoupled decay on matrices and the embedding only")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    grad_clip: float = flag(1.0, "max global gradient norm; <= 0 disables clipping")
    # --- bookkeeping ---
    out_dir: str = flag("runs/train", "run folder (config.json, metrics.csv, checkpoints/)")
    seed: int = flag(0, "seed of the initialization and of the batches")
    log_every: int = flag(10, "steps between metrics.csv rows")
    eval_every: int = flag(200, "steps between held-out evaluations (0 = never)")
    eval_windows: int = flag(16, "held-out windows of T tokens per evaluation")
    ckpt_every: int = flag(200, "steps between checkpoints (the last step is always checkpointed)")
    keep_ckpts: int = flag(2, "newest checkpoints kept on disk (>= 2 leaves one to fall back to)")
    resume: bool = flag(False, "continue from the newest usable checkpoint in out_dir")
    override_config: bool = flag(False, "with --resume: take this command's recipe where it differs from the "
                                        "checkpoint's (model sizes can never change)")
    stop_at: int = flag(0, "end this process after this step as if killed (time-sliced jobs, tests); 0 = never")
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 ...")
    amp: bool = flag(True, "bf16 autocast; only ever used on CUDA (CPU trains in fp32)")
    threads: int = flag(0, "torch.set_num_threads on CPU (0 = leave torch's default)")
    progress: bool = flag(True, "progress bar on stderr")

    def __post_init__(self):
        for name in ("d_model", "n_layer", "d_state", "headdim", "expand", "ngroups", "chunk_size", "n_head",
                     "seq_len", "n_segments", "batch_size", "grad_accum", "steps", "log_every",
                     "eval_windows", "ckpt_every", "keep_ckpts", "copy_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below; inf is no setting either
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"--{f.name} must be a finite number, got {getattr(self, f.name)}")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {ARCHS}, got {self.arch!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        other = TRANSFORMER_ONLY if self.arch == "mamba2" else MAMBA_ONLY
        ignored = [n for n in other if getattr(self, n) != getattr(TrainConfig, n)]
        if ignored:
            raise ValueError(f"--arch {self.arch} does not use {', '.join('--' + n for n in ignored)}; leave "
                             f"them at their defaults")
        if self.init_state not in INIT_STATES:
            raise ValueError(f"--init_state must be one of {INIT_STATES}, got {self.init_state!r}")
        if self.arch == "transformer" and self.init_state != "zero":
            raise ValueError(f"--arch transformer has no state: --init_state must be zero, got {self.init_state!r}")
        if self.arch == "transformer" and self.n_segments != 1:
            raise ValueError(f"--arch transformer has no state to carry: --n_segments must be 1, got {self.n_segments}")
        if self.arch == "mamba2" and (self.expand * self.d_model) % self.headdim:
            raise ValueError(f"d_inner = expand*d_model = {self.expand * self.d_model} must be divisible "
                             f"by headdim = {self.headdim}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                             f"{self.min_lr_ratio}, {self.warmup_steps}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch_size {self.batch_size} must be divisible by --grad_accum {self.grad_accum}")
        check_seeds((self.seed,), "--seed")

    def model_config(self) -> Mamba2Config | TransformerConfig:
        if self.arch == "transformer":
            return TransformerConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, n_layer=self.n_layer,
                                     n_head=self.n_head)
        return Mamba2Config(d_model=self.d_model, n_layer=self.n_layer, vocab_size=VOCAB_SIZE,
                            d_state=self.d_state, headdim=self.headdim, expand=self.expand,
                            ngroups=self.ngroups, chunk_size=self.chunk_size,
                            dt_min=self.dt_min, dt_max=self.dt_max)


def build_model(cfg: TrainConfig) -> Mamba2LM | TinyTransformer:
    """A freshly initialized model of cfg.arch (seed it first: torch.manual_seed)."""
    return TinyTransformer(cfg.model_config()) if cfg.arch == "transformer" else Mamba2LM(cfg.model_config())


def load_model(arch: str, model_dir: str | Path) -> Mamba2LM | TinyTransformer:
    """The model a checkpoint's model/ folder holds (from_pretrained of its architecture)."""
    return (TinyTransformer if arch == "transformer" else Mamba2LM).from_pretrained(model_dir)


DESCRIPTION = "Train a byte-level Mamba-2 or the Transformer baseline (see the module docstring)."


def build_parser():
    return config_parser(TrainConfig, DESCRIPTION)


# ----------------------------------------------------------------------------------------------
# 2. Pieces of the loop
# ----------------------------------------------------------------------------------------------

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # rows (b, N*T+1) [, weights or mask (b, N*T)]


def task_batch(corpus: Corpus, cfg: TrainConfig, step: int) -> Batch:
    """The global batch of a named task for `step`: a pure function of (seed, step)."""
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len, n_segments=cfg.n_segments)
    if cfg.task == "lm":
        return corpus.batch(step, **kw)
    if cfg.task == "copymix":
        return copymix_batch(corpus, step, steps=cfg.steps, **kw)
    if cfg.task == "custom":
        raise ValueError("--task custom needs a batch function: call train(cfg, batch_fn=...) from Python")
    copy = copy_batch(step, copy_len=cfg.copy_len, **kw)  # (b, N*T+1)
    if cfg.task == "mix":  # odd rows are copy episodes, even rows corpus text
        copy[0::2] = corpus.batch(step, **kw)[0::2]
    return copy


def rows_and_weights(batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (b, N*T+1) long, weights (b, N*T) float >= 0 with a positive sum) from a batch function's
    output: rows alone (every target weighs 1), rows and a bool mask, or rows and float weights."""
    rows, weights = batch if isinstance(batch, tuple) else (batch, None)
    span = cfg.n_segments * cfg.seq_len
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (cfg.batch_size, span + 1):
        raise ValueError(f"a batch must hold rows of shape (batch_size, n_segments*seq_len + 1) = "
                         f"({cfg.batch_size}, {span + 1}), got {getattr(rows, 'shape', type(rows).__name__)}")
    if weights is None:
        return rows, torch.ones(cfg.batch_size, span)
    if tuple(weights.shape) != (cfg.batch_size, span):
        raise ValueError(f"loss weights must have shape ({cfg.batch_size}, {span}), got {tuple(weights.shape)}")
    weights = weights.float()
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError(f"loss weights must be >= 0 with a positive sum, got min {float(weights.min())}, "
                         f"sum {float(weights.sum())}")
    return rows, weights


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy per target: logits (b, T, V_padded) -> (b, T); only the first 256
    logits are real bytes."""
    ce = F.cross_entropy(logits[..., :VOCAB_SIZE].float().reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                         reduction="none")
    return ce.view(targets.shape)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-byte cross-entropy, or with weights (b, T) the weighted mean sum(w * ce) / sum(w)
    (a 0/1 weight is a mask)."""
    ce = token_losses(logits, targets)
    return ce.mean() if weights is None else (ce * weights).sum() / weights.sum()


def forward(model, arch: str, x: torch.Tensor, state, keep_state: bool):
    """(logits, state) of either architecture. keep_state=False: nobody reads the final state, so
    the Mamba-2 does not build it (return_state=False); the Transformer has no state."""
    if arch == "transformer":
        return model(x), None
    return model(x, state, return_state=keep_state)


class InitialStates:
    """Where each row's state starts: the training-side fixes of [UE] (Buitrago Ruiz & Gu, arXiv 2507.02782).

    [UE]'s claim: a model trained only from the zero state fails beyond T_train because it meets states
    it never saw; starting rows from other states lets it explore them. For micro-batch m:
        zero           None (the zero state; plain training)
        state_passing  the final state of micro-batch m's rows one optimizer step earlier (other sequences),
                       detached: conv and SSM state carried whole
        noise          SSM state h0 ~ N(0, s^2) entrywise, s = the RMS of recent final states (so the noise
                       has the real states' overall scale); conv state zero
        fitted_noise   h0 ~ N(mu, sigma^2) per (layer, head, p, n) entry, mu and sigma the moments of recent
                       final states (moving average, STATE_STATS_MOMENTUM per step); conv state zero
    Deviations: the first step (and the first step after --resume: the carried states and moments are not
    checkpointed) starts from zero; [UE] fits the noise once on a trained model, here it follows training.
    """

    def __init__(self, mode: str):
        self.mode, self.carried, self.moments = mode, {}, None  # moments: per layer (E[h], E[h^2]) (h, p, n)

    @property
    def keeps_final_state(self) -> bool:
        return self.mode != "zero"

    def draw(self, m: int, rows: int):
        """The initial Mamba2State (or None) of micro-batch m with `rows` rows."""
        if self.mode == "zero":
            return None
        if self.mode == "state_passing":
            st = self.carried.get(m)
            return st if st is not None and st.ssm[0].shape[0] == rows else None
        if self.moments is None:
            return None
        ssm = []
        for mean, sq in self.moments:
            if self.mode == "noise":
                std = sq.mean().clamp_min(0).sqrt()
                ssm.append(std * torch.randn((rows, *mean.shape), device=mean.device))
            else:
                std = (sq - mean ** 2).clamp_min(0).sqrt()
                ssm.append(mean + std * torch.randn((rows, *mean.shape), device=mean.device))
        return Mamba2State([None] * len(ssm), ssm, 0)

    def observe(self, m: int, final) -> None:
        """Record micro-batch m's final state (a Mamba2State) of this step."""
        if self.mode == "zero" or final is None:
            return
        final = final.detach()
        if self.mode == "state_passing":
            self.carried[m] = final
            return
        now = [(h.float().mean(0), h.float().pow(2).mean(0)) for h in final.ssm]
        if self.moments is None:
            self.moments = now
        else:
            a = STATE_STATS_MOMENTUM
            self.moments = [(a * mu + (1 - a) * mu2, a * sq + (1 - a) * sq2)
                            for (mu, sq), (mu2, sq2) in zip(self.moments, now)]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at the end.

    lr(s) = lr * (s+1)/W                                              for s < W
    lr(s) = lr * (r + (1-r) * 0.5 * (1 + cos(pi * (s-W)/(S-W))))      otherwise
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused: one kernel for all parameters, on CPU and GPU; equal to the per-parameter loop up
    to float rounding, tests/test_experiments.py) with weight decay on matrices (linears, conv
    kernels, the tied embedding) only.

    No decay on dt_bias, A_log, D (as the official Mamba-2) and on every other 1-D parameter (norm
    weights, biases): decaying them would pull the decay rates and gains towards 0.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if leaf in NO_DECAY_NAMES or p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, corpus: Corpus, cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss on `eval_windows` fixed held-out windows of T tokens, each from a fresh state."""
    was_training = model.training
    model.eval()
    ids = corpus.heldout_windows(cfg.eval_windows, cfg.seq_len).to(device)  # (w, T+1)
    logits, _ = forward(model, cfg.arch, ids[:, :-1], None, keep_state=False)
    model.train(was_training)
    return lm_loss(logits, ids[:, 1:]).item()


# ----------------------------------------------------------------------------------------------
# 3. Checkpoints: build in a temporary folder, write COMPLETE last, rename into place
# ----------------------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, or holding something other than tensors
    and plain data."""


class ConfigMismatch(ValueError):
    """--resume with other settings than the checkpoint was trained with."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder was written at (from its name step_XXXXXXXX)."""
    return int(CHECKPOINT_RE.match(ckpt.name).group(1))


def is_complete(ckpt: Path) -> bool:
    """A checkpoint counts only under its final name and with its COMPLETE marker."""
    return bool(CHECKPOINT_RE.match(ckpt.name)) and (ckpt / COMPLETE_MARKER).is_file()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary, partial and unusable ones skipped)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p)) if root.is_dir() else []


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in out_dir, or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the checkpoints/.tmp-* folders that killed writes left behind; returns them."""
    root = Path(out_dir) / CHECKPOINT_DIR
    stale = sorted(p for p in root.glob(TEMP_PREFIX + "*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The model's save_pretrained folder (checkpoints.save_pretrained for a Mamba2LM)."""
    if isinstance(model, Mamba2LM):
        save_pretrained(model, path)
    else:
        model.save_pretrained(path)


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer, cfg: TrainConfig) -> Path:
    """Write checkpoints/step_<step>/ atomically; returns its path.

    Steps: 0. remove the temporary folders of killed writes
           1. save_pretrained + trainer.pt into checkpoints/.tmp-step_<step>-<pid>
           2. write COMPLETE (the sha256 of every file in the checkpoint), fsync
           3. os.replace to the final name   4. prune old checkpoints.
    A crash before step 3 leaves only a .tmp-* folder, which no reader treats as a checkpoint; a
    file damaged later fails its hash. trainer.pt holds tensors and plain data only, so it loads
    with torch.load(weights_only=True).
    """
    remove_stale_temporaries(out_dir)  # 0.
    final = checkpoint_path(out_dir, step)
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model")  # 1.
    state = {"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, tmp / "trainer.pt")
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    with open(tmp / COMPLETE_MARKER, "w") as f:  # 2.
        f.write(f"step {step}\n" + "".join(f"sha256 {sha256_of(tmp / name)} {name}\n" for name in files))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # 3.
    fsync_dir(final.parent)
    for old in complete_checkpoints(out_dir)[:-cfg.keep_ckpts]:  # 4.
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    """trainer.pt of a complete checkpoint, unpickled with weights_only=True (tensors and plain data
    only: a file that holds any other object is refused, and no code in it runs)."""
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE_MARKER} marker or not "
                              f"under its final step_XXXXXXXX name): an interrupted write?")
    path = ckpt / "trainer.pt"
    recorded = [line.split(maxsplit=2)[1:] for line in (ckpt / COMPLETE_MARKER).read_text().splitlines()
                if line.startswith("sha256 ")]
    damaged = [name for digest, name in recorded if not (ckpt / name).is_file() or sha256_of(ckpt / name) != digest]
    if damaged or not recorded:
        raise CheckpointError(f"{ckpt}: {damaged or 'no file'} missing or damaged: sha256 differs from the one "
                              f"{COMPLETE_MARKER} recorded when the checkpoint was written")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a file can be unreadable ends here, with its cause
        kind = "refused to unpickle" if "weights_only" in str(e).lower() else "cannot read"
        raise CheckpointError(f"{kind} {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    missing = [k for k in ("step", "optimizer", "config", "torch_rng") if k not in state]
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"{path} is not a trainer state (missing {missing})")
    return state


def config_differences(saved: dict, cfg: TrainConfig, label: str = "checkpoint") -> tuple[list[str], list[str]]:
    """(model fields, recipe fields) that differ between a saved config (a checkpoint's, or the run
    record's settings) and cfg, each as 'name: <saved> (<label>) vs <now> (now)'. A field the saved
    config lacks counts as its default. Bookkeeping fields (FREE_FIELDS) are not compared."""
    model, recipe = [], []
    for f in dataclasses.fields(TrainConfig):
        if f.name in FREE_FIELDS:
            continue
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if old != new:
            (model if f.name in MODEL_FIELDS else recipe).append(f"{f.name}: {old!r} ({label}) vs {new!r} (now)")
    return model, recipe


def refuse_differences(where: str, whose: str, model: list[str], recipe: list[str], cfg: TrainConfig) -> None:
    """Raise ConfigMismatch naming every difference, unless only recipe fields differ and
    cfg.override_config is set (then they are listed on stderr and the new values win)."""
    if model:
        raise ConfigMismatch(f"{where}: the model differs from {whose}, which no flag can override (start a new "
                             f"--out_dir):\n  " + "\n  ".join(model + recipe))
    if recipe and not cfg.override_config:
        raise ConfigMismatch(f"{where}: these settings differ from {whose}:\n  " + "\n  ".join(recipe)
                             + f"\nPass --override_config to continue with the new values, or give {whose} values.")
    if recipe:
        print(f"--override_config: {where}: continuing with\n  " + "\n  ".join(recipe), file=sys.stderr)


def check_resume_config(ckpt: Path, saved: dict, cfg: TrainConfig) -> None:
    """The checkpoint's config against cfg (refuse_differences)."""
    refuse_differences(f"--resume from {ckpt}", "the checkpoint's", *config_differences(saved, cfg), cfg)


# ----------------------------------------------------------------------------------------------
# The run folder: its record (config.json) is checked against cfg and the data before anything is
# written (common.claim_run_folder), with the checkpoint's rules
# ----------------------------------------------------------------------------------------------

def run_settings(cfg: TrainConfig, data_sha256: str | None) -> dict:
    """What a train.py run folder records and compares when it is continued: every field but the
    bookkeeping ones (FREE_FIELDS), and the sha256 of the data actually read (data.corpus_sha256:
    --resume notices changed file contents, not only a changed --data path). None: no corpus read."""
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_FIELDS}, DATA_KEY: data_sha256}


def check_run_record(out_dir: Path, record: dict, cfg: TrainConfig, data_sha256: str | None) -> None:
    """A continued run folder's recorded settings against cfg and the data read now: a model field
    never differs, a recipe field or the data only with --override_config (ConfigMismatch)."""
    saved = record.get("settings") or {}
    model, recipe = config_differences(saved, cfg, label="recorded")
    if saved.get(DATA_KEY) != data_sha256:
        recipe.append(f"{DATA_KEY}: {saved.get(DATA_KEY)!r} (recorded) vs {data_sha256!r} (now): the contents of "
                      f"--data {cfg.data or '(the standard library)'} are not the ones the run was trained on")
    refuse_differences(f"--resume in {out_dir} (record {Path(out_dir) / RUN_RECORD})", "the run's", model, recipe, cfg)


def claim_train_folder(cfg: TrainConfig, data_sha256: str | None, is_main: bool,
                       world: int) -> contextlib.AbstractContextManager:
    """Check cfg.out_dir on every rank, then on rank 0 claim it: check, lock it and write its record
    (common.claim_run_folder). Returns the lock to hold while training (a no-op on other ranks)."""
    out = Path(cfg.out_dir)
    if not is_main:  # read only
        record = check_run_folder(out, RUN_KIND, resume=cfg.resume)
        if record is not None:
            check_run_record(out, record, cfg, data_sha256)
    if world > 1:
        dist.barrier()  # every rank has checked before rank 0 writes
    if not is_main:
        return contextlib.nullcontext()
    return claim_run_folder(out, RUN_KIND, dataclasses.asdict(cfg), run_settings(cfg, data_sha256), resume=cfg.resume,
                            check=lambda rec: check_run_record(out, rec, cfg, data_sha256))


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer=None, cfg: TrainConfig | None = None) -> dict:
    """Load weights, optimizer and RNG states from a checkpoint; returns its trainer state.

    cfg: check it against the checkpoint's config first (check_resume_config). Raises
    CheckpointError for anything unreadable, ConfigMismatch for other settings.
    """
    state = read_trainer_state(ckpt)
    if cfg is not None:
        check_resume_config(ckpt, state["config"], cfg)
    arch = state["config"].get("arch", "mamba2")
    try:
        model.load_state_dict(load_model(arch, ckpt / "model").state_dict())
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except Exception as e:  # noqa: BLE001 - a corrupt weight file shows up as any of several errors
        raise CheckpointError(f"cannot load {ckpt}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def resume(out_dir: Path, model: torch.nn.Module, optimizer, cfg: TrainConfig, is_main: bool = True) -> int:
    """Load the newest usable checkpoint; returns its step (0 when there is none).

    A checkpoint that cannot be read is moved aside to checkpoints/.unusable-step_XXXXXXXX (so no
    later run picks it again) and the previous one is tried, which is said on stderr. A config
    mismatch is not a damaged checkpoint: it stops at once. Only the main rank (is_main) moves
    checkpoints and speaks; under DDP the other ranks resume after it (train() orders them).
    """
    reasons = []
    for ckpt in reversed(complete_checkpoints(out_dir)):
        try:
            return load_checkpoint(ckpt, model, optimizer, cfg)["step"]
        except CheckpointError as e:
            reasons.append(str(e))
            aside = ckpt.parent / f"{UNUSABLE_PREFIX}{ckpt.name}"
            if is_main:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(ckpt, aside)
                print(f"--resume: {e}\n  moved it to {aside}; falling back to the previous checkpoint "
                      f"(if any)", file=sys.stderr)
    if reasons:
        raise CheckpointError(f"--resume: no usable checkpoint in {out_dir / CHECKPOINT_DIR}:\n  "
                              + "\n  ".join(reasons))
    if is_main:
        print(f"--resume: no complete checkpoint in {out_dir / CHECKPOINT_DIR}, starting from step 0", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------

def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {cfg.device} asked for CUDA, but torch.cuda.is_available() is False")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)  # one GPU per process
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def train(cfg: TrainConfig, batch_fn: Callable[[int], Batch] | None = None) -> dict:
    """Run (or resume) training; returns {"step", "loss_history", "checkpoint"}.

    cfg.out_dir is claimed before anything is written (claim_train_folder): a folder holding anything
    but a train.py run is refused, a run folder without --resume is refused, and --resume with other
    settings or other data is refused as for a checkpoint; the folder stays locked until train returns.

    batch_fn(step) -> the GLOBAL batch of that step: rows (b, N*T+1), optionally with a bool mask or
    float weights (b, N*T) for the targets rows[:, 1:] (the loss is sum(w * ce) / sum(w) over the
    global batch). It must be a pure function of step (resume and DDP rely on it) and goes with
    --task custom; without it the batch is task_batch(corpus, cfg, step).

    Works in one process or under torchrun (DistributedDataParallel). The global batch is the same
    whatever the number of processes: rank r of k takes rows [r*b/k, (r+1)*b/k), then splits them
    into grad_accum micro-batches.
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, released however training ends
        return _train(cfg, batch_fn, held)


def _train(cfg: TrainConfig, batch_fn: Callable[[int], Batch] | None, held: contextlib.ExitStack) -> dict:
    """The body of train(); `held` keeps the run folder's lock."""
    if (batch_fn is None) == (cfg.task == "custom"):
        raise ValueError(f"train(): pass batch_fn exactly when --task is custom (task {cfg.task!r}, "
                         f"batch_fn {'given' if batch_fn else 'None'})")
    rank, world, device = _setup_distributed(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by world_size*grad_accum "
                         f"= {world}*{cfg.grad_accum}")
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    is_main = rank == 0
    use_amp = cfg.amp and device.type == "cuda"  # bf16 autocast on GPU only
    t_start = time.perf_counter()

    # 1. seed, data, model, optimizer, resume
    torch.manual_seed(cfg.seed)
    corpus = Corpus.load(cfg.data or None) if (batch_fn is None or cfg.eval_every > 0) else None
    batch_fn = batch_fn or (lambda step: task_batch(corpus, cfg, step))
    held.enter_context(claim_train_folder(cfg, None if corpus is None else corpus_sha256(corpus), is_main, world))
    model = build_model(cfg).to(device)
    if cfg.arch == "mamba2" and cfg.accelerate:
        kernels.accelerate(model)
        if device.type == "cpu":
            kernels.keep_freed_memory()  # process-wide, chosen here on purpose: ~30% faster toy CPU steps
    optimizer = make_optimizer(model, cfg)
    if is_main:
        remove_stale_temporaries(out)
    start_step = 0
    if cfg.resume:  # rank 0 first: it moves unusable checkpoints aside before the others look
        if world > 1 and not is_main:
            dist.barrier()
        start_step = resume(out, model, optimizer, cfg, is_main)
        if world > 1 and is_main:
            dist.barrier()
    ddp_model = model
    if world > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    facts = dict(model=dataclasses.asdict(cfg.model_config()), n_params=sum(p.numel() for p in model.parameters()),
                 world_size=world, device=str(device), amp_bf16=use_amp,
                 corpus=None if corpus is None else {"source": corpus.source, "train_bytes": len(corpus.train),
                                                     "heldout_bytes": len(corpus.heldout)})
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, dataclasses.asdict(cfg), kind=RUN_KIND, **facts)
        log = CsvLog(out / "metrics.csv", METRIC_FIELDS, keep_until=start_step if cfg.resume else None)

    b_rank = cfg.batch_size // world  # rows on this rank
    b_micro = b_rank // cfg.grad_accum  # rows per micro-batch
    T, N = cfg.seq_len, cfg.n_segments
    tokens_per_step = cfg.batch_size * N * T
    initial = InitialStates(cfg.init_state)  # where each row's state starts ([UE]'s fixes; zero by default)
    bar = ProgressBar(cfg.steps, desc="train", initial=start_step, enabled=cfg.progress and is_main)
    losses: list[float] = []
    last_saved = latest_checkpoint(out) if is_main else None
    t_last = time.perf_counter()
    model.train()
    try:
        for step in range(start_step, cfg.steps):
            # (a) the global batch, a pure function of (seed, step); this rank's rows of it
            rows, weights = rows_and_weights(batch_fn(step), cfg)
            # DDP averages the ranks' gradients, so each rank divides by the global weight / world
            norm = weights.sum().item() / world
            mine = slice(rank * b_rank, (rank + 1) * b_rank)
            rows, weights = rows[mine].to(device), weights[mine].to(device)
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            # (b) truncated BPTT: N segments per row, state carried but detached between segments;
            #     each backward frees its segment's graph. Gradients sum over micro-batches and segments.
            n_backward, i_backward = cfg.grad_accum * N, 0
            for m in range(cfg.grad_accum):
                micro, w_micro = rows[m * b_micro:(m + 1) * b_micro], weights[m * b_micro:(m + 1) * b_micro]
                state = initial.draw(m, micro.shape[0])
                for s in range(N):
                    x = micro[:, s * T:(s + 1) * T]  # (b_micro, T)
                    y = micro[:, s * T + 1:(s + 1) * T + 1]  # (b_micro, T)
                    i_backward += 1
                    sync = world == 1 or i_backward == n_backward  # DDP all-reduces on the last backward only
                    with ddp_model.no_sync() if not sync else contextlib.nullcontext():
                        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                            # the last segment's state is read by nobody: not built
                            logits, state = forward(ddp_model, cfg.arch, x, state,
                                                    keep_state=s < N - 1 or initial.keeps_final_state)
                        loss = (token_losses(logits, y) * w_micro[:, s * T:(s + 1) * T]).sum() / norm
                        loss.backward()
                    state = state.detach() if state is not None else None
                    step_loss += loss.detach()
                initial.observe(m, state)
            if world > 1:  # the global weighted mean (every rank then agrees on divergence too)
                dist.all_reduce(step_loss)
                step_loss /= world
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss_value, gnorm_value, done = step_loss.item(), float(gnorm), step + 1
            # (c) a non-finite loss or gradient: stop before the step can write NaN into the weights
            diverged = not (math.isfinite(loss_value) and math.isfinite(gnorm_value))
            # (d) clip and step
            if not diverged:
                optimizer.step()
                losses.append(loss_value)

            # (e) log
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            bar.update(1, loss=loss_value, tok_s=tok_s)
            evaluate = not diverged and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps)
            h_loss = heldout_loss(model, corpus, cfg, device) if evaluate and is_main else ""
            if is_main and (diverged or done % cfg.log_every == 0 or done == cfg.steps or evaluate):
                log.write({"step": done, "tokens": done * tokens_per_step, "loss": loss_value, "lr": lr,
                           "grad_norm": gnorm_value, "tok_per_s": tok_s, "heldout_loss": h_loss,
                           "wall_s": now - t_start})
            if diverged:
                raise TrainingDiverged(
                    f"step {done}: the loss is {loss_value} and the gradient norm {gnorm_value} (lr {lr:g}): "
                    f"training diverged and stopped before the optimizer step. The last good checkpoint is "
                    f"{last_saved or 'none (none was written)'}; nothing was saved after it. Lower --lr "
                    f"(or --grad_clip) and rerun, or --resume --override_config with a smaller --lr.")
            # (f) checkpoint (rank 0 writes; others wait so nobody races ahead of a half-written one)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                broken = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
                if broken:  # a finite gradient can still overflow a weight: never checkpoint that
                    raise TrainingDiverged(f"step {done}: weights {broken[:3]} hold NaN or inf after the optimizer "
                                           f"step (lr {lr:g}); not checkpointed. The last good checkpoint is "
                                           f"{last_saved or 'none (none was written)'}.")
                if is_main:
                    last_saved = save_checkpoint(out, done, model, optimizer, cfg)
                if world > 1:
                    dist.barrier()
            if cfg.stop_at and done >= cfg.stop_at:
                break
    finally:
        bar.close()
        if is_main:
            log.close()
    if is_main:
        write_run_config(out, dataclasses.asdict(cfg), kind=RUN_KIND, wall_s=time.perf_counter() - t_start,
                         record={"steps": [start_step, start_step + len(losses)]}, **facts)
    if world > 1 and dist.is_initialized():
        dist.barrier()
    final = latest_checkpoint(out) if is_main else None
    return {"step": start_step + len(losses), "loss_history": losses, "checkpoint": str(final) if final else None}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, DESCRIPTION)
    try:
        result = train(cfg)
    except (CheckpointError, ConfigMismatch, TrainingDiverged, RunFolderError, BadFileError) as e:
        sys.exit(f"experiments.train: error: {e}")  # exit code 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["loss_history"][-1] if result["loss_history"] else float("nan")
        print(f"done: step {result['step']}, last loss {last:.4f}, checkpoint {result['checkpoint']}")


if __name__ == "__main__":
    main()
