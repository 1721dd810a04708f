"""Train a small byte-level Mamba-2 language model, the way Stuffed Mamba trains long.

Commands (run from the repository root)
    # CPU, about a minute: a 2-layer toy on the standard-library corpus, T_train = 64
    python -m experiments.train --out_dir runs/toy --steps 300 --seq_len 64
    # truncated BPTT: 4 chained segments of 64 tokens per row, state carried (detached) between them
    python -m experiments.train --out_dir runs/tbptt --seq_len 64 --n_segments 4
    # continue a killed run exactly where its last checkpoint left it
    python -m experiments.train --out_dir runs/toy --steps 300 --seq_len 64 --resume
    # several processes (GPUs with NCCL; on CPU the same code uses gloo)
    torchrun --nproc_per_node 2 -m experiments.train --out_dir runs/ddp --batch_size 32
    # any text file or folder instead of the standard library
    python -m experiments.train --data path/to/text --out_dir runs/mytext
    # half the rows copy episodes (the regime in which toy models collapse; see state_collapse.py)
    python -m experiments.train --task mix --seq_len 16 --d_state 256 --headdim 32 --out_dir runs/mix

Paper
    Stuffed Mamba (arXiv 2410.07145), "Training": models are trained on length-T_train segments with
    truncated BPTT - the initial state of a segment is the (detached) final state of the previous
    segment of the same document stream, 12 chained segments in the paper.

Reading order
    1. TrainConfig       every knob, with units; CLI flags are its field names
    2. train()           setup (seed, data, model, optimizer, resume) then the step loop:
                         (a) batch = pure function of (seed, step)  (b) TBPTT over N segments with
                         grad accumulation  (c) clip, AdamW step  (d) log  (e) atomic checkpoint
    3. save_checkpoint / latest_checkpoint / load_checkpoint   the checkpoint protocol

Glossary
    b  global batch rows per optimizer step (all ranks, all micro-batches together)
    T  seq_len: tokens per segment, the paper's T_train
    N  n_segments: chained segments per row (truncated BPTT)
    V  vocabulary, 256 bytes (padded to the model's padded_vocab_size in the logits)

Outputs (all in --out_dir)
    config.json        resolved config, versions, hardware
    metrics.csv        one row per logged step: loss, lr, grad norm, tokens/s, held-out loss
    checkpoints/step_XXXXXXXX/   model/ (a save_pretrained directory: from_pretrained loads it),
                       trainer.pt (optimizer, step, RNG states), COMPLETE (written last). A checkpoint
                       directory is built under a temporary name and renamed into place, so a killed
                       write never leaves a directory that looks complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from checkpoints import save_pretrained

from experiments.common import CsvLog, ProgressBar, atomic_write_json, fsync_dir, run_metadata
from experiments.data import VOCAB_SIZE, Corpus, copy_batch

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"  # written last inside a checkpoint; a checkpoint without it is ignored
NO_DECAY_NAMES = ("dt_bias", "A_log", "D")  # SSM parameters never decayed (official Mamba-2 practice)
TASKS = ("lm", "copy", "mix")
METRIC_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "heldout_loss", "wall_s")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Each field is also a command-line flag (--name value)."""

    # --- model (passed to minimamba.Mamba2Config) ---
    d_model: int = 64  # d, residual width
    n_layer: int = 2  # number of Mamba-2 blocks
    d_state: int = 64  # n, SSM state size per head (the paper's N)
    headdim: int = 16  # p, channels per head (the paper's P)
    expand: int = 2  # e, d_inner = e * d
    ngroups: int = 1  # g, B/C groups
    chunk_size: int = 64  # q, SSD chunk length (any q gives the same function)
    dt_min: float = 1e-3  # Delta init range lower end (official 1e-3)
    dt_max: float = 1e-1  # Delta init range upper end (official 1e-1); smaller = slower initial decay
    accelerate: bool = True  # kernels.accelerate(model): the same function, faster (kernels.py)
    # --- data ---
    data: str = ""  # text file or folder; "" = this Python's standard library
    task: str = "lm"  # lm: the corpus | copy: random-byte copy episodes | mix: even rows lm, odd rows copy
    copy_len: int = 8  # random bytes per copy episode (an episode is [r, r], 2*copy_len tokens)
    seq_len: int = 64  # T, tokens per segment (the paper's T_train)
    n_segments: int = 1  # N, chained segments per row, state carried detached (truncated BPTT)
    batch_size: int = 16  # b, global rows per optimizer step (summed over ranks and micro-batches)
    grad_accum: int = 1  # micro-batches per step on each rank
    # --- optimization ---
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine decay)
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices and the embedding only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables
    # --- bookkeeping ---
    out_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 10  # steps between metrics.csv rows
    eval_every: int = 200  # steps between held-out evaluations (0 = never)
    eval_windows: int = 16  # held-out windows of T tokens per evaluation
    ckpt_every: int = 200  # steps between checkpoints (the last step is always checkpointed)
    keep_ckpts: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    stop_at: int = 0  # end this process after this step as if killed (time-sliced jobs, tests); 0 = never
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    amp: bool = True  # bf16 autocast; only ever used on CUDA (CPU trains in fp32)
    threads: int = 0  # torch.set_num_threads on CPU (0 = leave torch's default)
    progress: bool = True  # progress bar on stderr

    def __post_init__(self):
        for name in ("d_model", "n_layer", "d_state", "headdim", "expand", "ngroups", "chunk_size",
                     "seq_len", "n_segments", "batch_size", "grad_accum", "steps", "log_every",
                     "eval_windows", "ckpt_every", "keep_ckpts", "copy_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if (self.expand * self.d_model) % self.headdim:
            raise ValueError(f"d_inner = expand*d_model = {self.expand * self.d_model} must be divisible "
                             f"by headdim = {self.headdim}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch_size {self.batch_size} must be divisible by --grad_accum {self.grad_accum}")

    def model_config(self):
        from minimamba import Mamba2Config
        return Mamba2Config(d_model=self.d_model, n_layer=self.n_layer, vocab_size=VOCAB_SIZE,
                            d_state=self.d_state, headdim=self.headdim, expand=self.expand,
                            ngroups=self.ngroups, chunk_size=self.chunk_size,
                            dt_min=self.dt_min, dt_max=self.dt_max)


def parse_config(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from command-line flags named after its fields (bools take true/false)."""
    base = base or TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    p = argparse.ArgumentParser(description="Train a byte-level Mamba-2 (see the module docstring).")

    def to_bool(s: str) -> bool:
        if s.lower() in ("1", "true", "yes", "y"):
            return True
        if s.lower() in ("0", "false", "no", "n"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

    for f in dataclasses.fields(TrainConfig):
        typ = hints[f.name]
        if typ is bool:  # `--resume` alone means true
            p.add_argument(f"--{f.name}", type=to_bool, nargs="?", const=True, default=getattr(base, f.name))
        else:
            p.add_argument(f"--{f.name}", type=typ, default=getattr(base, f.name))
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------

def training_rows(corpus: Corpus, cfg: TrainConfig, step: int, rows: slice) -> torch.Tensor:
    """This rank's rows of the global batch for `step`: LongTensor (b_rank, N*T + 1)."""
    kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, seq_len=cfg.seq_len, n_segments=cfg.n_segments)
    if cfg.task == "lm":
        return corpus.batch(step, rows=rows, **kw)
    copy = copy_batch(step, copy_len=cfg.copy_len, **kw)  # (b, N*T+1), global rows
    if cfg.task == "mix":  # odd global rows are copy episodes, even rows corpus text
        text = corpus.batch(step, **kw)
        copy[0::2] = text[0::2]
    return copy[rows]


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
    """AdamW with weight decay on matrices (linears, conv kernels, the tied embedding) only.

    No decay on dt_bias, A_log, D (as the official Mamba-2) and on every other 1-D parameter (norm
    weights, the conv bias): decaying them would pull the decay rates and gains towards 0.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if leaf in NO_DECAY_NAMES or p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy. logits (b, T, V_padded) -> only the first 256 are real bytes."""
    return F.cross_entropy(logits[..., :VOCAB_SIZE].float().reshape(-1, VOCAB_SIZE), targets.reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, corpus: Corpus, cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss on `eval_windows` fixed held-out windows of T tokens, each from a fresh state."""
    was_training = model.training
    model.eval()
    ids = corpus.heldout_windows(cfg.eval_windows, cfg.seq_len).to(device)  # (w, T+1)
    logits, _ = model(ids[:, :-1])
    model.train(was_training)
    return lm_loss(logits, ids[:, 1:]).item()


# ----------------------------------------------------------------------------------------------
# Checkpoints: build in a temporary directory, write COMPLETE last, rename into place
# ----------------------------------------------------------------------------------------------

def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def is_complete(ckpt: Path) -> bool:
    """A checkpoint counts only under its final name and with its COMPLETE marker."""
    return bool(CHECKPOINT_RE.match(ckpt.name)) and (ckpt / COMPLETE_MARKER).is_file()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in out_dir, or None. Temporary and partial ones are skipped."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer, cfg: TrainConfig,
                    extra: dict | None = None) -> Path:
    """Write checkpoints/step_<step>/ atomically; returns its path.

    Steps: 1. save_pretrained + trainer.pt into checkpoints/.tmp-step_<step>-<pid>
           2. write COMPLETE, fsync   3. os.replace to the final name   4. prune old checkpoints.
    A crash before step 3 leaves only a .tmp-* directory, which no reader treats as a checkpoint.
    """
    final = checkpoint_path(out_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp / "model")
    state = {"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             **(extra or {})}
    torch.save(state, tmp / "trainer.pt")
    with open(tmp / COMPLETE_MARKER, "w") as f:
        f.write(f"step {step}\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    done = sorted(p for p in final.parent.iterdir() if p.is_dir() and is_complete(p))
    for old in done[:-cfg.keep_ckpts]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (from the save_pretrained directory) and optimizer/RNG state. Returns trainer state."""
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE_MARKER} marker or "
                                f"not under its final step_XXXXXXXX name): an interrupted write?")
    from minimamba import Mamba2LM
    loaded = Mamba2LM.from_pretrained(str(ckpt / "model"))
    model.load_state_dict(loaded.state_dict())
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {cfg.device} asked for CUDA, but torch.cuda.is_available() is False")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)  # one GPU per process
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"step", "loss_history", "checkpoint"}.

    Works in one process or under torchrun (DistributedDataParallel). The global batch of
    cfg.batch_size rows is the same whatever the number of processes: rank r of k takes rows
    [r*b/k, (r+1)*b/k), then splits them into grad_accum micro-batches.
    """
    from minimamba import Mamba2LM

    rank, world, device = _setup_distributed(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by world_size*grad_accum "
                         f"= {world}*{cfg.grad_accum}")
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    is_main = rank == 0
    use_amp = cfg.amp and device.type == "cuda"  # bf16 autocast on GPU only

    # 1. seed, data, model, optimizer
    torch.manual_seed(cfg.seed)
    corpus = Corpus.load(cfg.data or None)
    model = Mamba2LM(cfg.model_config()).to(device)
    if cfg.accelerate:
        kernels.accelerate(model)
    optimizer = make_optimizer(model, cfg)
    start_step = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start_step = state["step"]
        model.to(device)
    elif is_main and cfg.resume:
        print(f"--resume: no complete checkpoint in {out / CHECKPOINT_DIR}, starting from step 0", file=sys.stderr)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        atomic_write_json(out / "config.json", {"train": dataclasses.asdict(cfg),
                                                "model": dataclasses.asdict(cfg.model_config()),
                                                "n_params": n_params, "world_size": world,
                                                "device": str(device), "amp_bf16": use_amp,
                                                "corpus": {"source": corpus.source,
                                                           "train_bytes": len(corpus.train),
                                                           "heldout_bytes": len(corpus.heldout)},
                                                "meta": run_metadata()})
        log = CsvLog(out / "metrics.csv", METRIC_FIELDS, keep_until=start_step if ckpt is not None else None)

    b_rank = cfg.batch_size // world  # rows on this rank
    b_micro = b_rank // cfg.grad_accum  # rows per micro-batch
    T, N = cfg.seq_len, cfg.n_segments
    tokens_per_step = cfg.batch_size * N * T
    bar = ProgressBar(cfg.steps, desc="train", initial=start_step, enabled=cfg.progress and is_main)
    losses: list[float] = []
    t_last, step = time.perf_counter(), start_step
    t_start = time.perf_counter()
    model.train()
    for step in range(start_step, cfg.steps):
        # (a) this rank's rows of the global batch: a pure function of (seed, step)
        rows = training_rows(corpus, cfg, step, slice(rank * b_rank, (rank + 1) * b_rank)).to(device)
        lr = lr_at(cfg, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        # (b) truncated BPTT: N segments per row, state carried but detached between segments;
        #     each backward frees its segment's graph. Gradients sum over micro-batches and segments.
        n_backward, i_backward = cfg.grad_accum * N, 0
        for m in range(cfg.grad_accum):
            micro = rows[m * b_micro:(m + 1) * b_micro]  # (b_micro, N*T+1)
            state = None
            for s in range(N):
                x = micro[:, s * T:(s + 1) * T]  # (b_micro, T)
                y = micro[:, s * T + 1:(s + 1) * T + 1]  # (b_micro, T)
                i_backward += 1
                sync = world == 1 or i_backward == n_backward  # DDP all-reduces on the last backward only
                ctx = ddp_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                        # the last segment's state is read by nobody: not built (return_state=False)
                        logits, state = ddp_model(x, state, return_state=s < N - 1)
                    loss = lm_loss(logits, y) / n_backward
                    loss.backward()
                state = state.detach() if state is not None else None
                step_loss += loss.detach()
        if world > 1:  # report the global mean loss (gradients are already averaged by DDP)
            dist.all_reduce(step_loss)
            step_loss /= world
        # (c) clip and step
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        loss_value = step_loss.item()
        losses.append(loss_value)

        # (d) log
        done = step + 1
        now = time.perf_counter()
        tok_s = tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        bar.update(1, loss=loss_value, tok_s=tok_s)
        evaluate = cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.steps)
        h_loss = heldout_loss(model, corpus, cfg, device) if evaluate and is_main else ""
        if is_main and (done % cfg.log_every == 0 or done == cfg.steps or evaluate):
            log.write({"step": done, "tokens": done * tokens_per_step, "loss": loss_value, "lr": lr,
                       "grad_norm": float(gnorm), "tok_per_s": tok_s, "heldout_loss": h_loss,
                       "wall_s": now - t_start})
        # (e) checkpoint (rank 0 writes; others wait so nobody races ahead of a half-written one)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            if is_main:
                save_checkpoint(out, done, model, optimizer, cfg)
            if world > 1:
                dist.barrier()
        if cfg.stop_at and done >= cfg.stop_at:
            break
    bar.close()
    if is_main:
        log.close()
    final = latest_checkpoint(out) if is_main else None
    if world > 1 and dist.is_initialized():
        dist.barrier()
    return {"step": start_step + len(losses), "loss_history": losses,
            "checkpoint": str(final) if final else None}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["loss_history"][-1] if result["loss_history"] else float("nan")
        print(f"done: step {result['step']}, last loss {last:.4f}, checkpoint {result['checkpoint']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
