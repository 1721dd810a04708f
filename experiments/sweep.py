"""Shared machinery of the three scaling sweeps: resumable points, the fit helpers, a small trainer.

Used by experiments/state_capacity.py, experiments/passkey.py and experiments/forgetting_curves.py.

Papers
    Stuffed Mamba (arXiv 2410.07145), section "State capacity": the two scaling laws this file fits,
        T_forget = a * N_S + b                  (linear; paper: a = 5.172, b = -4.469, K tokens vs M elements)
        T_recall = a * (b^N_S - 1) + c          (exponential; paper: a = 4.756, b = 1.365, c = -0.742)

Reading order
    1. PointStore        one JSON file per finished sweep point, written atomically; a rerun skips it
    2. linear_fit, exp_fit, r_squared      the fit helpers (least squares, R^2)
    3. train_model       a compact training loop for models train.py does not build (the Transformer
                         baseline, Mamba-2 on passkey-mixed data); it reuses train.py's optimizer,
                         schedule and loss so every model in the sweeps trains the same way

Glossary
    N_S   state size in elements ([SC] section 1.2, mitigations.state_size)
    T     a training length in tokens; b batch rows; l sequence length
"""
from __future__ import annotations

import json
import math
import re
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from experiments.common import ProgressBar, atomic_write_json

POINTS_DIR = "points"  # run_dir/points/<key>.json: one finished point each
KEY_SAFE = re.compile(r"[^A-Za-z0-9_.=-]")  # characters allowed in a point's file name
EXP_FIT_GRID = 400  # log-spaced candidate growth rates tried by exp_fit before refining
EXP_FIT_REFINE = 60  # golden-section iterations of exp_fit around the best grid point
EXP_FIT_K_RANGE = (1e-4, 30.0)  # range of k = ln(b) * max|x| searched by exp_fit (b^max|x| up to e^30)

# [SC] section "State capacity" (T in K tokens, N_S in M elements)
PAPER_FORGET_SLOPE = 5.172  # T_forget = 5.172 N_S - 4.469
PAPER_FORGET_INTERCEPT = -4.469
PAPER_RECALL = (4.756, 1.365, -0.742)  # T_recall = a (b^N_S - 1) + c


# ----------------------------------------------------------------------------------------------
# 1. Resumable sweep points
# ----------------------------------------------------------------------------------------------

def point_key(**params: Any) -> str:
    """A file-name-safe key from point parameters, in sorted order: point_key(d_state=64, T=16) ->
    'T=16_d_state=64'."""
    if not params:
        raise ValueError("a point needs at least one parameter")
    return KEY_SAFE.sub("-", "_".join(f"{k}={params[k]}" for k in sorted(params)))


class PointStore:
    """Finished sweep points of one run folder, one JSON file each.

        store = PointStore("runs/capacity_quick")
        result = store.run(point_key(d_state=64, T=16), {"d_state": 64, "T": 16}, compute)

    `run` returns the stored result when the point is finished (compute is NOT called), else calls
    compute(), writes {"params", "result", "seconds"} atomically (temp file + os.replace) and returns
    the result. A run killed mid-point loses only that point; a stored point with other parameters
    than asked for is an error (a changed sweep config must get a new run folder).
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / POINTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.computed: list[str] = []  # keys computed by this process (the rest came from disk)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def run(self, key: str, params: dict, compute: Callable[[], dict]) -> dict:
        stored = self.get(key)
        if stored is not None:
            if stored["params"] != json.loads(json.dumps(params)):
                raise ValueError(f"{self.path(key)} holds a point with params {stored['params']}, not "
                                 f"{params}: the sweep settings changed; use a new --out_dir")
            return stored["result"]
        t0 = time.perf_counter()
        result = compute()
        atomic_write_json(self.path(key), {"params": params, "result": result,
                                           "seconds": time.perf_counter() - t0})
        self.computed.append(key)
        return result

    def all(self) -> dict[str, dict]:
        """key -> stored record, for every finished point on disk."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}


# ----------------------------------------------------------------------------------------------
# 2. Fits
# ----------------------------------------------------------------------------------------------

def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """R^2 = 1 - SS_res / SS_tot (nan when all y are equal)."""
    y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


@dataclass(frozen=True)
class LinearFit:
    slope: float  # a in y = a x + b
    intercept: float  # b
    r2: float
    n: int  # points fitted

    def __call__(self, x):
        return self.slope * np.asarray(x, float) + self.intercept


def linear_fit(x: Iterable[float], y: Iterable[float]) -> LinearFit:
    """Least-squares line y = a x + b. Needs >= 2 distinct x. (With exactly 2 points R^2 = 1 always.)"""
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if x.shape != y.shape or x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"linear_fit needs >= 2 points with distinct x, got x={x.tolist()}, y={y.tolist()}")
    a, b = np.polyfit(x, y, 1)
    return LinearFit(float(a), float(b), r_squared(y, a * x + b), int(x.size))


@dataclass(frozen=True)
class ExpFit:
    a: float  # y = a (b^x - 1) + c
    b: float
    c: float
    r2: float
    n: int

    def __call__(self, x):
        return self.a * (np.power(self.b, np.asarray(x, float)) - 1.0) + self.c


def exp_fit(x: Iterable[float], y: Iterable[float]) -> ExpFit:
    """Least-squares fit of [SC]'s passkey law y = a (b^x - 1) + c with b > 1.

    For a fixed growth rate b the model is linear in (a, c), so:
      1. scale x by s = max|x| and search k = ln(b) * s on a log grid (EXP_FIT_K_RANGE), solving
         (a, c) by linear least squares at each k and keeping the smallest residual;
      2. refine k by golden-section search between the best grid point's neighbours.
    Needs >= 4 points with >= 3 distinct x (3 parameters; with 3 points the fit is exact, R^2 = 1).
    """
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if x.shape != y.shape or x.size < 3 or np.unique(x).size < 3:
        raise ValueError(f"exp_fit needs >= 3 points with >= 3 distinct x, got x={x.tolist()}")
    s = float(np.abs(x).max())
    u = x / s

    def solve(k: float) -> tuple[float, float, float]:
        f = np.expm1(k * u)  # b^x - 1 with b = exp(k / s)
        M = np.stack([f, np.ones_like(f)], 1)
        coef, *_ = np.linalg.lstsq(M, y, rcond=None)
        return float(((M @ coef - y) ** 2).sum()), float(coef[0]), float(coef[1])

    ks = np.geomspace(*EXP_FIT_K_RANGE, EXP_FIT_GRID)
    sse = np.array([solve(k)[0] for k in ks])
    i = int(np.argmin(sse))
    lo, hi = ks[max(i - 1, 0)], ks[min(i + 1, ks.size - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(EXP_FIT_REFINE):  # golden section on [lo, hi]
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if solve(m1)[0] < solve(m2)[0]:
            hi = m2
        else:
            lo = m1
    k = (lo + hi) / 2
    _, a, c = solve(k)
    b = math.exp(k / s)
    fit = ExpFit(a, b, c, 0.0, int(x.size))
    return ExpFit(a, b, c, r_squared(y, fit(x)), int(x.size))


# ----------------------------------------------------------------------------------------------
# 3. A compact trainer for any byte-level LM (same optimizer, schedule and loss as train.py)
# ----------------------------------------------------------------------------------------------

def train_model(model: torch.nn.Module, batch_fn: Callable[[int], torch.Tensor], *, steps: int, lr: float,
                warmup_steps: int, seed: int, desc: str = "train", progress: bool = True) -> list[float]:
    """Train `model` in place for `steps` AdamW steps on batch_fn(step) -> LongTensor (b, T+1), or
    -> (rows (b, T+1), mask (b, T) bool): then only targets rows[:, 1:][mask] are in the loss, or
    -> (rows (b, T+1), weights (b, T) float >= 0): then the loss is the weighted mean of the per-target
       cross-entropies, sum(w * ce) / sum(w) (experiments/passkey.py gives its answer bytes a fixed
       share of the loss this way).

    The model may return logits or (logits, state). Optimizer groups, warmup + cosine schedule,
    clipping and the byte loss are experiments/train.py's (make_optimizer, lr_at, lm_loss), so a
    Transformer trained here and a Mamba-2 trained by train.py see the same optimization.
    Returns the loss per step. One call trains one sweep point; the point is stored when it ends
    (models this small train in a minute or two, so a killed point is simply recomputed).
    """
    from experiments.train import TrainConfig, lm_loss, lr_at, make_optimizer
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, seed=seed)
    torch.manual_seed(seed)
    opt = make_optimizer(model, cfg)
    device = next(model.parameters()).device
    bar = ProgressBar(steps, desc=desc, enabled=progress)
    losses = []
    model.train()
    for step in range(steps):
        batch = batch_fn(step)
        rows, mask = batch if isinstance(batch, tuple) else (batch, None)
        rows = rows.to(device)  # (b, T+1)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(cfg, step)
        out = model(rows[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out  # (b, T, V)
        if mask is None:
            loss = lm_loss(logits, rows[:, 1:])
        elif mask.is_floating_point():
            loss = weighted_lm_loss(logits, rows[:, 1:], mask.to(device))
        else:
            mask = mask.to(device)
            loss = lm_loss(logits[mask][None], rows[:, 1:][mask][None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.update(1, loss=losses[-1])
    bar.close()
    model.eval()
    return losses


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * ce) / sum(w): next-byte cross-entropy with a weight per target.

    logits (b, T, V_padded) (only the first 256 are bytes), targets (b, T), weights (b, T) >= 0 with a
    positive sum. A 0/1 weight equals train.py's lm_loss on the masked targets.
    """
    from experiments.data import VOCAB_SIZE
    if weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the targets' shape {tuple(targets.shape)}")
    total = weights.sum()
    if bool((weights < 0).any()) or not float(total) > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got min {float(weights.min())}, sum {float(total)}")
    ce = F.cross_entropy(logits[..., :VOCAB_SIZE].float().reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                         reduction="none").view_as(weights)  # (b, T)
    return (ce * weights).sum() / total


# ----------------------------------------------------------------------------------------------
# 4. Mamba-2 points trained by experiments/train.py (checkpoints and exact resume inside a point)
# ----------------------------------------------------------------------------------------------

def mamba_train_config(*, out_dir: str | Path, d_model: int, n_layer: int, d_state: int, headdim: int,
                       t_train: int, tokens_per_step: int, steps: int, lr: float, task: str, copy_len: int,
                       seed: int, device: str = "cpu", threads: int = 1):
    """The train.py config of one sweep point: batch rows = tokens_per_step / T, so every T_train
    sees the same number of tokens (as experiments/state_collapse.py does)."""
    from experiments.train import TrainConfig
    if tokens_per_step % t_train:
        raise ValueError(f"tokens_per_step={tokens_per_step} must be a multiple of T_train={t_train}")
    return TrainConfig(d_model=d_model, n_layer=n_layer, d_state=d_state, headdim=headdim,
                       chunk_size=min(64, t_train),
                       task=task, copy_len=copy_len, seq_len=t_train, batch_size=tokens_per_step // t_train,
                       steps=steps, lr=lr, warmup_steps=min(100, max(1, steps // 10)), out_dir=str(out_dir),
                       seed=seed, log_every=max(1, steps // 50), eval_every=0, ckpt_every=max(1, steps // 4),
                       keep_ckpts=1, resume=True, device=device, threads=threads)


def train_or_reuse_mamba(tcfg) -> Path:
    """Train (resuming a killed run from its last checkpoint) or reuse; returns the model directory."""
    from experiments.train import latest_checkpoint, train
    ckpt = latest_checkpoint(tcfg.out_dir)
    if ckpt is None or int(ckpt.name.split("_")[1]) < tcfg.steps:
        train(tcfg)
        ckpt = latest_checkpoint(tcfg.out_dir)
    return ckpt / "model"


def final_train_loss(out_dir: str | Path, last: int = 5) -> float:
    """Mean of the last `last` logged training losses in a train.py metrics.csv (nan if none)."""
    import csv
    p = Path(out_dir) / "metrics.csv"
    if not p.is_file():
        return float("nan")
    with open(p, newline="") as f:
        vals = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    return float(np.mean(vals[-last:])) if vals else float("nan")


def parse_ints(text: str, name: str) -> list[int]:
    """'16,64' -> [16, 64] with an actionable error."""
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"--{name} is empty")
    return vals


def parse_states(text: str) -> list[tuple[int, int]]:
    """'64x16,256x32' -> [(d_state, headdim), ...]: the per-head state is headdim x d_state."""
    out = []
    for item in str(text).split(","):
        try:
            n, p = item.lower().split("x")
            out.append((int(n), int(p)))
        except ValueError:
            raise ValueError(f"--states items must look like DSTATExHEADDIM (e.g. 64x16), got {item!r}") from None
    return out


def parse_config(cls, argv: list[str] | None, quick: dict, description: str):
    """Build a frozen dataclass config from flags named after its fields (--name value).

    `--quick` starts from the `quick` overrides (the CPU-sized variant); flags given explicitly win.
    """
    import argparse
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        if hints[f.name] is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes", "y"), nargs="?",
                           const=True, default=None)
        else:
            p.add_argument(f"--{f.name}", type=hints[f.name], default=None)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    base = dict(quick) if given.get("quick") else {}
    base.update(given)
    return cls(**base)


def write_run_config(out: Path, config: dict, wall_s: float | None = None, computed: list[str] | None = None) -> None:
    """config.json of a sweep's run folder: the resolved config, versions and hardware, and one record
    per invocation (wall time, points computed), so a resumed or re-plotted run keeps its history."""
    from experiments.common import run_metadata
    p = Path(out) / "config.json"
    old = json.loads(p.read_text()) if p.is_file() else {}
    runs = old.get("invocations", [])
    if wall_s is not None:
        runs = runs + [{"wall_s": round(wall_s, 1), "points_computed": computed or [], **run_metadata()}]
    atomic_write_json(p, {"config": config, "meta": run_metadata(), "invocations": runs})


def start_run(cfg) -> tuple[Path, PointStore]:
    """The opening every sweep's run() shares: torch threads, the run folder, its config.json record
    (write_run_config) and the point store of finished points. cfg: a config dataclass with
    `threads` and `out_dir`."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, dataclasses.asdict(cfg))
    return out, PointStore(out)
