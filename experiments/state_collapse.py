"""State collapse at toy scale: train Mamba-2 on short sequences, watch it break beyond them, per seed.

Commands (run from the repository root)
    # the README demo at CPU size (2 cores: about 10 minutes per seed and T_train; finished points are reused)
    python -m experiments.state_collapse --quick --seeds 0,1,2
    # redraw the figures and the summary of a finished run folder (seconds, no training)
    python -m experiments.state_collapse --quick --replot
    # the default size (meant for one GPU; on a CPU it takes hours)
    python -m experiments.state_collapse --seeds 0,1,2,3,4 --workers 5
    # analyse any from_pretrained checkpoint, e.g. the official mamba2-130m you downloaded yourself
    python -m experiments.state_collapse --checkpoint path/to/mamba2-130m --t_train 8192 --eval_length 20000

Paper
    Stuffed Mamba (arXiv 2410.07145), sections "State collapse" and "Mitigating SC":
    - per-token loss vs position with the state carried across chunks, on held-out text and on the
      newline prompt "\\n" * L;
    - failure criterion: loss anywhere beyond T_train above 2x the maximum within the first T_train;
    - per-head state statistics every k tokens and the retention of the first token alpha_{1:t};
    - training-free mitigations (RRI, state normalization, sliding window, LongMamba Delta scaling).

The regime (why these defaults; experiments/LOG.md has every run, negative ones included)
    Tiny byte-level models trained on plain text at T_train 32-512 learn to forget and do not
    collapse. Collapse needs (a) an over-sized state for T_train: a large per-head state
    (headdim x d_state) against a very short T_train, and (b) data where keeping the whole window
    pays: half of each batch is copy episodes (random bytes, then the same bytes again). At this
    scale the outcome depends on the seed (LOG.md), which is why every verdict here is k of N seeds.

Probes (each prompt is locally in-distribution; only the amount of carried context grows)
    text     held-out standard-library source (documents never trained on)
    copy     a stream of fresh copy episodes [r1 r1 r2 r2 ...], copy_len random bytes each
    newline  the paper's "\\n" * l prompt

Reading order (the file's sections)
    1. the criteria       paper_criterion, mean_criterion (constants fixed before any multi-seed
                          run), model_verdicts (collapsed if a criterion fires on any probe)
    2. mechanism measures retention_at_multiples, norm_growth (reported, never verdicts)
    3. evaluation         per_position_loss (carried state, bounded memory), analyse_model
    4. mitigations        MitigationSettings, mitigation_context (shared with forgetting_curves.py)
    5. DemoConfig, QUICK  sizes, training lengths, seeds, evaluation length
    6. run_point          one (T_train, seed): train (experiments/train.py) then analyse
    7. report             per T_train k/N verdicts with Wilson intervals; mitigations: k/N fixed
                          among the collapsed seeds, in-window cost mean +- sd; summary.md
    8. plot               the three figures; replot(run_dir) redraws them from the points
    9. run_checkpoint     the same analysis for any from_pretrained folder

Glossary
    T  T_train, training length      l  evaluation length      k  chunk: tokens per forward call
    h  heads   p  headdim   n  d_state (per-head state is p x n)
    alpha_{1:t}  retention of the first token after t tokens = exp(sum_{j<=t} Delta_j A)  [SC eq. 2]
    k/N  k of N seeds

Outputs (one run folder, default runs/state_collapse[_quick]/)
    config.json      resolved config, command, git commit, versions, hardware, wall time per invocation
    points/T=<T>_seed=<s>.json   one per (T_train, seed): verdicts, curves, mechanism, mitigations
    summary.json, summary.md     the report (k/N with intervals, means with intervals)
    state_collapse_loss.png, state_collapse_mitigations.png, state_collapse_state.png
    models/<point>/  the training runs (train.py layout; not part of the committed results)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minimamba_kernels as kernels
import mitigations as M
from minimamba import Mamba2LM

from experiments.common import (ProgressBar, add_flag, atomic_write_json, atomic_write_text, config_from_args,
                                config_parser, flag, resolve_device, write_run_config)
from experiments.data import Corpus, copy_batch, newline_probe
from experiments.sweep import (Point, PointStore, check_seeds_and_workers, fmt_ci, grid_points, load_run_config,
                               mean_ci, point_train_config, proportion, read_run_record, recipe, run_sweep,
                               stored_results, train_point_model, workers_flag)

# ----------------------------------------------------------------------------------------------
# 1. The collapse criteria
# ----------------------------------------------------------------------------------------------
# Fixed on 2026-12-02, before any reported multi-seed run; they are not to be tuned on results. (One change
# while tuning the recipe on seeds 1000-1007, never reported: the mean criterion's in-window reference was
# [T/2, T); on the copy probe with T = 2 * copy_len that window is exactly the predictable second half of
# an episode, so a model that forgets perfectly would read ~2x. The whole window [0, T) covers whole
# episodes, like [2T, L). The threshold did not change. LOG.md, 2026-12-02.)
#
# Paper criterion ([SC] section "State capacity"): collapsed if
#     max_{t >= T} loss_t  >  PAPER_COLLAPSE_FACTOR * max_{t < T} loss_t      (loss averaged over prompts)
PAPER_COLLAPSE_FACTOR = 2.0
# Mean criterion (ours): collapsed if
#     mean_{t in [2T, L)} loss_t  >  MEAN_COLLAPSE_RATIO * mean_{t in [0, T)} loss_t   (averaged over prompts)
# A model that learned to forget does no worse with more context, so its long-range mean stays at or
# below its in-window mean up to averaging noise of a few percent (~1000 positions x many prompts);
# 1.5x is far outside that noise and below the paper's 2x on maxima (a maximum over noisy positions
# is the harder statistic to move: the paper's rule misses a steady climb whose in-window maximum
# is the unpredictable first token).
MEAN_COLLAPSE_RATIO = 1.5
CRITERIA = ("paper", "mean")
PROBES = ("text", "copy", "newline")
RETENTION_MULTIPLES_BASE = 2  # alpha_{1:t} is reported at t = k * T_train, k = 1, 2, 4, 8, ... up to l
TRACE_POINTS_PER_T = 4  # state statistics every T_train / 4 tokens (when T_train divides by 4) ...
MAX_TRACE_POINTS = 512  # ... but at most this many records per probe
GPT_NEOX_NEWLINE_ID = 187  # "\n" in the GPT-NeoX tokenizer of the official mamba2 checkpoints
BYTE_NEWLINE_ID = ord("\n")  # "\n" for our byte-level models
PLOT_POINTS = 60  # geometric bins per loss curve in figures and points
EVAL_SEED = 12345  # seed of the evaluation copy streams (never a training seed's stream: step EVAL_STEP)
EVAL_STEP = 10**9


@dataclass(frozen=True)
class Verdict:
    """One criterion on one per-position loss curve."""

    collapsed: bool
    ratio: float  # beyond / within: the statistic the criterion compares with its constant
    within: float  # paper: max loss over [0, T); mean: mean loss over [0, T)
    beyond: float  # paper: max loss over [T, l);  mean: mean loss over [2T, l)
    first_position: int | None  # paper: the first t >= T with loss_t > 2 x within; mean: None


def _curve(loss, t_train: int, min_length: int) -> torch.Tensor:
    loss = torch.as_tensor(loss, dtype=torch.float64).flatten()
    if t_train < 2 or loss.numel() < min_length:
        raise ValueError(f"the loss curve ({loss.numel()} positions) must have >= {min_length} positions for "
                         f"t_train={t_train} (>= 2)")
    return loss


def paper_criterion(loss, t_train: int) -> Verdict:
    """[SC]'s rule: max_{t >= T} loss_t > PAPER_COLLAPSE_FACTOR * max_{t < T} loss_t. loss: (l,), l > T."""
    loss = _curve(loss, t_train, t_train + 1)
    within, beyond = loss[:t_train].max().item(), loss[t_train:]
    over = torch.nonzero(beyond > PAPER_COLLAPSE_FACTOR * within)
    first = int(over[0]) + t_train if over.numel() else None
    return Verdict(first is not None, beyond.max().item() / within, within, beyond.max().item(), first)


def mean_criterion(loss, t_train: int) -> Verdict:
    """Ours: mean_{[2T, l)} loss > MEAN_COLLAPSE_RATIO * mean_{[0, T)} loss. loss: (l,), l > 2T."""
    loss = _curve(loss, t_train, 2 * t_train + 1)
    within, beyond = loss[:t_train].mean().item(), loss[2 * t_train:].mean().item()
    return Verdict(beyond > MEAN_COLLAPSE_RATIO * within, beyond / within, within, beyond, None)


def criteria(loss, t_train: int) -> dict[str, dict]:
    """Both criteria on one curve: {"paper": Verdict as a dict, "mean": ...}."""
    return {"paper": dataclasses.asdict(paper_criterion(loss, t_train)),
            "mean": dataclasses.asdict(mean_criterion(loss, t_train))}


def model_verdicts(per_probe: dict[str, dict]) -> dict[str, dict]:
    """A model's verdict per criterion: collapsed if the criterion fires on any of its probes.
    per_probe: probe -> {"criteria": criteria(...)}. Returns criterion -> {"collapsed", "probes"}."""
    out = {}
    for c in CRITERIA:
        fired = [p for p, s in per_probe.items() if s["criteria"][c]["collapsed"]]
        out[c] = {"collapsed": bool(fired), "probes": fired}
    return out


# ----------------------------------------------------------------------------------------------
# 2. Mechanism measures (reported next to the verdicts, never verdicts themselves)
# ----------------------------------------------------------------------------------------------

def trace_every(t_train: int, length: int) -> int:
    """Tokens between state records: T/4 (so that k * T are record positions), coarser when the
    evaluation is so long that more than MAX_TRACE_POINTS records would be kept."""
    every = t_train // TRACE_POINTS_PER_T if t_train % TRACE_POINTS_PER_T == 0 else t_train
    if length // every > MAX_TRACE_POINTS:
        every = t_train * math.ceil(length / (t_train * MAX_TRACE_POINTS))
    return every


def retention_at_multiples(positions: list[int], retention: torch.Tensor, t_train: int) -> dict[str, float]:
    """The largest first-token retention over all layers and heads at t = k * T_train, k = 1, 2, 4, ...
    up to the evaluation length (positions that were recorded). retention: (points, n_layer, h)."""
    out, k = {}, 1
    while k * t_train <= positions[-1]:
        if k * t_train in positions:
            out[str(k)] = retention[positions.index(k * t_train)].max().item()
        k *= RETENTION_MULTIPLES_BASE
    return out


def norm_growth(positions: list[int], norm: torch.Tensor, t_train: int) -> float:
    """max_{t > T} max_head ||h_t||_F / max_{t <= T} max_head ||h_t||_F over the recorded positions.
    norm: (points, n_layer, h), the largest Frobenius norm over the batch."""
    largest = norm.flatten(1).amax(1)  # (points,)
    pos = torch.tensor(positions)
    return (largest[pos > t_train].max() / largest[pos <= t_train].max()).item()


def trace(model, ids: torch.Tensor, t_train: int) -> dict:
    """State statistics over time (mitigations.trace_states): the mechanism measures and, per layer,
    the largest head's RMS and first-token retention (for the state figure)."""
    tr = M.trace_states(model, ids, every=trace_every(t_train, ids.shape[1]))
    return {"positions": tr.positions,
            "retention_at": retention_at_multiples(tr.positions, tr.retention, t_train),
            "norm_growth": norm_growth(tr.positions, tr.norm, t_train),
            "rms_max_head": tr.rms.amax(-1).T.tolist(),  # (n_layer, points)
            "retention_max_head": tr.retention.amax(-1).T.tolist()}


# ----------------------------------------------------------------------------------------------
# 3. Carried-state evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def per_position_loss(model, ids: torch.Tensor, chunk_len: int, vocab: int | None = None,
                      progress: str = "") -> torch.Tensor:
    """Per-position loss with the state carried across chunks ([SC] section 3's measurement).

    Memory is bounded by one chunk: only (b, chunk_len, V) logits exist at a time, so arbitrarily
    long inputs run on a CPU. Whatever mitigation is installed on the mixers is used.

    Args:
        model: a Mamba2LM.
        ids: LongTensor (b, l + 1); inputs ids[:, :-1], targets ids[:, 1:].
        chunk_len: tokens per forward call.
        vocab: only the first `vocab` logits are real tokens (None = model.config.vocab_size).
    Returns:
        (l,) float64: the loss at each position, mean over the b prompts.
    """
    vocab = vocab or model.config.vocab_size
    device = next(model.parameters()).device
    l = ids.shape[1] - 1
    losses, state = [], None
    chunks = range(0, l, chunk_len)
    bar = ProgressBar(len(chunks), desc=progress, enabled=bool(progress))
    for start in chunks:
        stop = min(start + chunk_len, l)
        x = ids[:, start:stop].to(device)  # (b, k)
        y = ids[:, start + 1:stop + 1].to(device)  # (b, k)
        logits, state = model(x, state, return_state=stop < l)  # (b, k, V_padded)
        loss = F.cross_entropy(logits[..., :vocab].float().transpose(1, 2), y, reduction="none")  # (b, k)
        losses.append(loss.double().mean(0).cpu())
        bar.update(1)
    bar.close()
    return torch.cat(losses)


def log_curve(loss: torch.Tensor, n_points: int = PLOT_POINTS) -> tuple[list[float], list[float]]:
    """Average a per-position curve over geometric bins (for log-x plots): (bin centres, means)."""
    l = loss.numel()
    edges = sorted(set(int(round(e)) for e in torch.logspace(0, math.log10(l), n_points).tolist()) | {0, l})
    xs, ys = [], []
    for a, b in zip(edges, edges[1:]):
        if b > a:
            xs.append(math.sqrt(max(a, 1) * b))
            ys.append(loss[a:b].mean().item())
    return xs, ys


def evaluate(model, probes: dict[str, torch.Tensor], t_train: int, chunk_len: int) -> dict:
    """Per probe: both criteria, the in-window mean loss [0, T) and the binned curve."""
    out = {}
    for name, ids in probes.items():
        loss = per_position_loss(model, ids, chunk_len)
        xs, ys = log_curve(loss)
        out[name] = {"criteria": criteria(loss, t_train), "in_window": loss[:t_train].mean().item(),
                     "curve": {"position": xs, "loss": ys}}
    return out


# ----------------------------------------------------------------------------------------------
# 4. Mitigations (shared with experiments/forgetting_curves.py)
# ----------------------------------------------------------------------------------------------

MITIGATIONS = ("rri", "state_norm", "sliding_window", "delta_scaling")


@dataclass(frozen=True)
class MitigationSettings:
    """How each training-free mitigation is set for a model trained at T_train."""

    rri_horizon: float = 4.0  # RRI lambda_a = 1 - 1 / (rri_horizon * T_train)  ([SC] rule of thumb)
    rri_lambda_b: float = 0.75  # [SC] 370M value
    delta_factor: float = 0.5  # LongMamba Delta scaling
    window_mult: int = 1  # sliding window r = window_mult * T_train
    norm_every: int = 0  # state-norm clamp period in tokens; 0 = min(T_train, 128)


def mitigation_context(name: str, model, t_train: int, s: MitigationSettings, calib: torch.Tensor | None = None):
    """(description, context manager) of one mitigation ("none" too) on a Mamba2LM. state_norm
    needs calib: in-distribution inputs (b, <= T_train) its thresholds are calibrated on."""
    if name == "none":
        return "none", contextlib.nullcontext()
    if name == "rri":
        lam_a = 1.0 - 1.0 / (s.rri_horizon * t_train)
        return (f"RRI lambda_a={lam_a:.5f} lambda_B={s.rri_lambda_b}",
                M.rri(model, lambda_a=lam_a, lambda_B=s.rri_lambda_b))
    if name == "sliding_window":
        return f"sliding window r={s.window_mult * t_train}", M.sliding_window(model, s.window_mult * t_train)
    if name == "delta_scaling":
        return f"Delta x {s.delta_factor}", M.delta_scaling(model, s.delta_factor)
    if name == "state_norm":
        if calib is None:
            raise ValueError("state_norm needs calibration inputs (calib)")
        every = s.norm_every or min(t_train, 128)
        taus = M.calibrate_state_norm(model, calib, every=every)
        return (f"state norm every {every} (tau from {calib.shape[1]}-token inputs)",
                M.state_norm(model, taus, every=every))
    raise ValueError(f"unknown mitigation {name!r}; expected none or one of {MITIGATIONS}")


def analyse_model(model, probes: dict[str, torch.Tensor], t_train: int, chunk_len: int, trace_prompts: int,
                  settings: MitigationSettings | None) -> dict:
    """Everything the report reads about one model: per-probe criteria and curves, the model's
    verdicts, the mechanism measures per probe, and (settings given) each mitigation's evaluation."""
    device = next(model.parameters()).device
    base = evaluate(model, probes, t_train, chunk_len)
    entry = {"base": base, "verdicts": model_verdicts(base),
             "trace": {name: trace(model, ids[:trace_prompts, :-1].to(device), t_train)
                       for name, ids in probes.items()}}
    if settings is not None:
        calib = torch.cat([ids[:, :t_train] for name, ids in probes.items() if name != "newline"]
                          or [probes["newline"][:, :t_train]]).to(device)
        entry["mitigations"] = {}
        for name in MITIGATIONS:
            desc, ctx = mitigation_context(name, model, t_train, settings, calib)
            with ctx:
                per_probe = evaluate(model, probes, t_train, chunk_len)
            entry["mitigations"][name] = {"description": desc, "probes": per_probe,
                                          "verdicts": model_verdicts(per_probe)}
    return entry


# ----------------------------------------------------------------------------------------------
# 5. Demo configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConfig:
    """One state size, several training lengths, several seeds. Each field is a flag: --name value."""

    out_dir: str = flag("runs/state_collapse", "run folder")
    # --- the model (the same for every T_train) ---
    d_model: int = flag(128, "d, residual width (channels)")
    n_layer: int = flag(2, "number of Mamba-2 blocks")
    d_state: int = flag(256, "n, state size per head; the per-head state is headdim x d_state (over-sized on purpose)")
    headdim: int = flag(32, "p, channels per head")
    # --- training (experiments/train.py) ---
    train_lens: tuple[int, ...] = flag((16, 64, 256), "T_train values (tokens), comma-separated")
    seeds: tuple[int, ...] = flag((0,), "training seeds (init and batches), comma-separated; every verdict is k of "
                                        "these")
    tokens_per_step: int = flag(1024, "tokens per optimizer step; rows = tokens_per_step / T_train (same for every T)")
    steps: int = flag(8000, "optimizer steps per model")
    lr: float = flag(3e-3, "peak learning rate (warmup + cosine, train.py)")
    task: str = flag("mix", "train.py task: mix = half corpus text, half copy episodes")
    copy_len: int = flag(8, "random bytes per copy episode (training and the copy probe)")
    # --- evaluation ---
    eval_mult: int = flag(64, "evaluation length = eval_mult * min(T_train) tokens (the issue asks >= 32)")
    eval_length: int = flag(0, "evaluation length in tokens; 0 = eval_mult * min(T_train)")
    eval_prompts: int = flag(32, "held-out windows / copy streams averaged per position")
    trace_prompts: int = flag(4, "prompts for the state statistics")
    chunk_len: int = flag(128, "tokens per forward call with the state carried (the official k = 128)")
    # --- mitigations, applied to the shortest-T_train model ---
    mitigations: bool = flag(True, "evaluate the four training-free mitigations on the shortest-T_train models")
    rri_horizon: float = flag(4.0, "RRI lambda_a = 1 - 1 / (rri_horizon * T_train) ([SC] rule of thumb)")
    rri_lambda_b: float = flag(0.75, "RRI insertion scale lambda_B ([SC] 370M value)")
    delta_factor: float = flag(0.5, "LongMamba Delta scaling factor")
    window_mult: int = flag(1, "sliding window r = window_mult * T_train tokens")
    norm_every: int = flag(0, "state-norm clamp period in tokens; 0 = min(T_train, 128)")
    # --- machine ---
    device: str = flag("auto", "auto | cpu | cuda")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values (the README demo)")

    def __post_init__(self):
        if not self.train_lens or any(t < 2 for t in self.train_lens):
            raise ValueError(f"--train_lens must be ints >= 2, got {self.train_lens}")
        if any(self.tokens_per_step % t for t in self.train_lens):
            raise ValueError(f"--tokens_per_step {self.tokens_per_step} must be a multiple of every T_train "
                             f"{self.train_lens}")
        if self.eval_mult < 3 and not self.eval_length:
            raise ValueError(f"--eval_mult must be >= 3 (the mean criterion reads [2T, l)), got {self.eval_mult}")
        check_seeds_and_workers(self)

    @property
    def eval_len(self) -> int:
        return self.eval_length or self.eval_mult * min(self.train_lens)

    @property
    def mitigation_settings(self) -> MitigationSettings:
        return MitigationSettings(self.rri_horizon, self.rri_lambda_b, self.delta_factor, self.window_mult,
                                  self.norm_every)


# The README demo: 5 seeds x T_train 16 and 64 in under 10 minutes on 2 CPU cores. headdim 16 (8 heads per
# layer, not 4): with 4 heads whether a seed draws a slow-decaying head was a lottery (LOG.md, 2026-12-02)
QUICK = dict(out_dir="runs/state_collapse_quick", d_model=64, n_layer=2, d_state=256, headdim=16,
             train_lens=(16, 64), tokens_per_step=512, steps=3000, eval_prompts=16, eval_mult=64, seeds=(0, 1, 2, 3, 4))
DESCRIPTION = "State collapse at toy scale, per seed (see the module docstring)."


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(DemoConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the figures and the summary from out_dir's points (no training)")
    add_flag(p, "checkpoint", str, "", "analyse this from_pretrained folder instead of training")
    add_flag(p, "t_train", int, 8192, "--checkpoint: its training length in tokens (official checkpoints: 8K)")
    add_flag(p, "newline_id", int, -1, "--checkpoint: token id of newline; -1 = 10 for byte vocabularies, "
             "187 (GPT-NeoX) otherwise")
    return p


# ----------------------------------------------------------------------------------------------
# 6. One point: train (or reuse) one model per (T_train, seed), then analyse it
# ----------------------------------------------------------------------------------------------

def make_probes(cfg: DemoConfig, corpus: Corpus) -> dict[str, torch.Tensor]:
    """The evaluation inputs, each (prompts, eval_len + 1): held-out text, copy stream, newlines."""
    l = cfg.eval_len
    return {"text": corpus.heldout_windows(cfg.eval_prompts, l),
            "copy": copy_batch(EVAL_STEP, seed=EVAL_SEED, batch_size=cfg.eval_prompts, seq_len=l,
                               copy_len=cfg.copy_len),
            "newline": newline_probe(l)}


def load_for_eval(model_dir: str | Path, device: str) -> Mamba2LM:
    """A trained model on `device` (a --device name), in eval mode, with kernels.accelerate's fast
    paths (which mitigations then wrap)."""
    model = kernels.accelerate(Mamba2LM.from_pretrained(model_dir).to(resolve_device(device)).eval())
    return kernels.forward_in_pieces(model, 1024)  # long no-grad evaluations in pieces: bounded memory


def run_point(cfg: DemoConfig, point: Point) -> dict:
    """Train (resuming a killed run) the model of one (T_train, seed) and analyse it."""
    t_train, seed = point.coords["t_train"], point.coords["seed"]
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=t_train,
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=seed, device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_state, headdim=cfg.headdim,
                              lr=cfg.lr, task=cfg.task, copy_len=cfg.copy_len)
    model = load_for_eval(train_point_model(tcfg), cfg.device)
    settings = cfg.mitigation_settings if point.coords["mitigations"] else None
    return {"state_size": M.state_size(model.config),
            **analyse_model(model, make_probes(cfg, Corpus.load()), t_train, cfg.chunk_len, cfg.trace_prompts,
                            settings)}


def demo_points(cfg: DemoConfig) -> list[Point]:
    """One point per (T_train, seed); the shortest T_train's points also evaluate the mitigations."""
    grid = [{"t_train": t, "mitigations": cfg.mitigations and t == min(cfg.train_lens)} for t in cfg.train_lens]
    return grid_points(grid, cfg.seeds, recipe(cfg, grid_fields=("train_lens", "mitigations")))


def by_t_train(cfg: DemoConfig, results: dict[str, dict]) -> dict[int, list[dict]]:
    """T_train -> the per-seed results in seed order."""
    out: dict[int, list[dict]] = {t: [] for t in cfg.train_lens}
    for p in demo_points(cfg):
        out[p.coords["t_train"]].append({"seed": p.coords["seed"], **results[p.key]})
    return out


def check_eval_length(length: int, t_train: int) -> None:
    if length <= 2 * t_train:
        raise ValueError(f"the evaluation length {length} must exceed 2 x T_train = {2 * t_train} (the mean "
                         f"criterion reads positions [2T, l)): raise --eval_length or --eval_mult")


def run_demo(cfg: DemoConfig) -> dict:
    check_eval_length(cfg.eval_len, max(cfg.train_lens))
    results = run_sweep(cfg, demo_points(cfg), run_point, "collapse", eval_len=cfg.eval_len)
    return report(by_t_train(cfg, results), Path(cfg.out_dir))


# ----------------------------------------------------------------------------------------------
# 7. The report: k/N verdicts, mechanism means, mitigations
# ----------------------------------------------------------------------------------------------

SUMMARY_PREFIX = "state_collapse"


def report(groups: dict[int, list[dict]], out: Path) -> dict:
    """summary.json / summary.md / figures of per-seed analyses grouped by T_train (T -> [entry per
    seed]); the mitigations are read from the shortest T_train's entries."""
    summary: dict = {"criteria": {"paper": f"max_(t >= T) loss > {PAPER_COLLAPSE_FACTOR} x max_(t < T) loss",
                                  "mean": f"mean_[2T, l) loss > {MEAN_COLLAPSE_RATIO} x mean_[0, T) loss"},
                     "t_train": {}}
    for t, entries in groups.items():
        probes = list(entries[0]["base"])
        n = len(entries)
        summary["t_train"][str(t)] = {
            "seeds": [e["seed"] for e in entries],
            "verdicts": {c: {**proportion(sum(e["verdicts"][c]["collapsed"] for e in entries), n),
                             "seeds_collapsed": [e["seed"] for e in entries if e["verdicts"][c]["collapsed"]]}
                         for c in CRITERIA},
            "per_probe": {p: {c: proportion(sum(e["base"][p]["criteria"][c]["collapsed"] for e in entries), n)
                              for c in CRITERIA} for p in probes},
            "ratios": {p: {c: mean_ci(e["base"][p]["criteria"][c]["ratio"] for e in entries) for c in CRITERIA}
                       for p in probes},
            "in_window": {p: mean_ci(e["base"][p]["in_window"] for e in entries) for p in probes},
            "mechanism": {p: {"retention_at": {k: mean_ci(e["trace"][p]["retention_at"][k] for e in entries)
                                               for k in entries[0]["trace"][p]["retention_at"]},
                              "norm_growth": mean_ci(e["trace"][p]["norm_growth"] for e in entries)}
                          for p in probes}}
    t_min = min(groups)
    mitigated = [e for e in groups[t_min] if "mitigations" in e]
    if mitigated:
        summary["mitigations"] = {"t_train": t_min, "methods": {}}
        for name in mitigated[0]["mitigations"]:
            m = {"description": mitigated[0]["mitigations"][name]["description"], "fixed": {}, "in_window_cost": {}}
            for c in CRITERIA:
                base_collapsed = [e for e in mitigated if e["verdicts"][c]["collapsed"]]
                fixed = [e["seed"] for e in base_collapsed if not e["mitigations"][name]["verdicts"][c]["collapsed"]]
                m["fixed"][c] = {**proportion(len(fixed), len(base_collapsed)), "seeds_fixed": fixed}
            for p in mitigated[0]["base"]:
                m["in_window_cost"][p] = mean_ci(e["mitigations"][name]["probes"][p]["in_window"]
                                                 - e["base"][p]["in_window"] for e in mitigated)
            summary["mitigations"]["methods"][name] = m
    atomic_write_json(out / f"{SUMMARY_PREFIX}_summary.json", summary)
    text = summary_markdown(summary)
    atomic_write_text(out / f"{SUMMARY_PREFIX}_summary.md", text)
    print(text)
    plot(groups, out)
    return summary


def summary_markdown(summary: dict) -> str:
    md = [f"Criteria (fixed before any multi-seed run): paper = {summary['criteria']['paper']}; "
          f"mean = {summary['criteria']['mean']}. A model collapses under a criterion if it fires on any probe. "
          "k/N seeds with Wilson 95% intervals; means with 95% t intervals over seeds.", "",
          "| T_train | seeds | collapsed (paper) | collapsed (mean) | per probe, paper / mean | "
          "max first-token retention at k x T (newline) | state-norm growth past T (newline) |",
          "|---|---|---|---|---|---|---|"]
    for t, s in summary["t_train"].items():
        per_probe = "; ".join(f"{p} {fmt_ci(v['paper'])} / {fmt_ci(v['mean'])}" for p, v in s["per_probe"].items())
        mech = s["mechanism"].get("newline") or next(iter(s["mechanism"].values()))
        ret = ", ".join(f"{k}T: {fmt_ci(v)}" for k, v in mech["retention_at"].items())
        md.append(f"| {t} | {','.join(map(str, s['seeds']))} | {fmt_ci(s['verdicts']['paper'])} | "
                  f"{fmt_ci(s['verdicts']['mean'])} | {per_probe} | {ret} | {fmt_ci(mech['norm_growth'])} |")
    if "mitigations" in summary:
        mit = summary["mitigations"]
        md += ["", f"Mitigations on the T_train = {mit['t_train']} models: k/N = seeds fixed (the criterion no longer "
               "fires) among the seeds whose model collapses; in-window cost = in-window mean loss with minus "
               "without, mean +- sd over seeds.", "",
               "| mitigation | fixed (paper) | fixed (mean) | in-window cost (nats/byte) |", "|---|---|---|---|"]
        for name, m in mit["methods"].items():
            cost = "; ".join(f"{p} {v['mean']:+.3f}" + (f" +- {v['sd']:.3f}" if v["sd"] is not None else "")
                             for p, v in m["in_window_cost"].items())
            md.append(f"| {m['description']} | {fmt_ci(m['fixed']['paper'])} | {fmt_ci(m['fixed']['mean'])} | {cost} |")
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------------------------
# 8. Figures (each seed a thin line, the mean over seeds a thick one)
# ----------------------------------------------------------------------------------------------

METHOD_ORDER = ("base",) + MITIGATIONS
PROBE_TITLES = {"text": "held-out text (stdlib source)", "copy": "stream of copy episodes",
                "newline": 'newline prompt "\\n" * l'}


def _seed_lines(ax, curves: list[tuple[list, list]], color, label: str) -> None:
    """One thin line per seed and their mean (the positions are the same for every seed)."""
    for xs, ys in curves:
        ax.plot(xs, ys, color=color, lw=0.6, alpha=0.45)
    xs = curves[0][0]
    ax.plot(xs, np.mean([ys for _, ys in curves], axis=0), color=color, lw=1.8, label=label)


def plot(groups: dict[int, list[dict]], out: Path) -> list[Path]:
    """state_collapse_loss.png, state_collapse_mitigations.png, state_collapse_state.png."""
    lens = sorted(groups)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    present = list(groups[lens[0]][0]["base"])
    probes = [p for p in PROBES if p in present]
    written = []

    # 1. loss vs position per training length
    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.8), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        for i, t in enumerate(lens):
            es = groups[t]
            k = sum(e["verdicts"]["paper"]["collapsed"] for e in es)
            _seed_lines(ax, [(e["base"][probe]["curve"]["position"], e["base"][probe]["curve"]["loss"]) for e in es],
                        colors[i % len(colors)], f"T_train={t} ({k}/{len(es)} collapsed, paper)")
            ax.axvline(t, color=colors[i % len(colors)], ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(PROBE_TITLES[probe], fontsize=10)
        ax.set_xlabel("position (tokens; dashed: T_train)")
        ax.set_ylabel("loss (nats/byte)")
        ax.legend(fontsize=8)
    fig.suptitle("Per-position loss with the state carried (thin: one seed; thick: mean over seeds)", fontsize=11)
    fig.tight_layout()
    written.append(out / "state_collapse_loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 2. mitigations on the shortest-T models
    es = [e for e in groups[lens[0]] if "mitigations" in e]
    if es:
        fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.8), squeeze=False)
        for ax, probe in zip(axes[0], probes):
            for i, name in enumerate(METHOD_ORDER):
                per = [e["base"] if name == "base" else e["mitigations"][name]["probes"] for e in es]
                label = "none" if name == "base" else es[0]["mitigations"][name]["description"]
                _seed_lines(ax, [(p[probe]["curve"]["position"], p[probe]["curve"]["loss"]) for p in per],
                            colors[i % len(colors)], label)
            ax.axvline(lens[0], color="gray", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(PROBE_TITLES[probe], fontsize=10)
            ax.set_xlabel(f"position (dashed: T_train={lens[0]})")
            ax.set_ylabel("loss (nats/byte)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.suptitle(f"Training-free mitigations on the T_train={lens[0]} models ({len(es)} seeds)", fontsize=11)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        written.append(out / "state_collapse_mitigations.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 3. state statistics over time on the paper's probe (newlines)
    probe = "newline" if "newline" in probes else probes[0]
    n_layer = len(groups[lens[0]][0]["trace"][probe]["rms_max_head"])
    fig, axes = plt.subplots(2, n_layer, figsize=(4.5 * n_layer, 6.5), squeeze=False)
    for i, t in enumerate(lens):
        for layer in range(n_layer):
            for row, key in ((0, "rms_max_head"), (1, "retention_max_head")):
                _seed_lines(axes[row][layer], [(e["trace"][probe]["positions"], e["trace"][probe][key][layer])
                                               for e in groups[t]], colors[i % len(colors)], f"T_train={t}")
                axes[row][layer].axvline(t, color=colors[i % len(colors)], ls="--", lw=0.8)
    for layer in range(n_layer):
        axes[0][layer].set_title(f"layer {layer}: largest per-head state RMS", fontsize=10)
        axes[1][layer].set_title(f"layer {layer}: largest first-token retention", fontsize=10)
        axes[1][layer].set_yscale("log")
        for row in (0, 1):
            axes[row][layer].set_xscale("log")
            axes[row][layer].set_xlabel("position (tokens)")
            axes[row][layer].legend(fontsize=8)
    fig.suptitle(f"State over time on the {PROBE_TITLES[probe]}", fontsize=11)
    fig.tight_layout()
    written.append(out / "state_collapse_state.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figures of a finished run folder (or a committed results folder), from its
    points alone (seconds; nothing is trained). out: where to write them (default: run_dir)."""
    recorded, cfg = read_run_record(run_dir), load_run_config(run_dir, DemoConfig)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "checkpoint" in recorded:
        point = checkpoint_point(cfg, recorded)
        return report({recorded["t_train"]: [{"seed": None, **stored_results(run_dir, [point])[point.key]}]}, out)
    return report(by_t_train(cfg, stored_results(run_dir, demo_points(cfg))), out)


# ----------------------------------------------------------------------------------------------
# 9. Any checkpoint (e.g. the official state-spaces/mamba2-130m, downloaded by the user)
# ----------------------------------------------------------------------------------------------

def checkpoint_point(cfg: DemoConfig, recorded: dict) -> Point:
    """The single point of a checkpoint analysis."""
    coords = {k: recorded[k] for k in ("checkpoint", "t_train", "newline_id")}
    return Point("checkpoint", coords, {**recipe(cfg, ("train_lens",)), **coords})


def run_checkpoint(path: str, cfg: DemoConfig, t_train: int, newline_id: int = -1) -> dict:
    """Newline-prompt (and, for byte models, held-out text) collapse analysis of a checkpoint.

    The state is carried in chunks of cfg.chunk_len tokens, so memory is bounded by one chunk's
    logits (b x chunk_len x vocab) whatever the length: 20K tokens of the 130m model fit a laptop.
    """
    t0 = time.perf_counter()
    model = load_for_eval(path, cfg.device)
    vocab = model.config.vocab_size
    if newline_id < 0:
        newline_id = BYTE_NEWLINE_ID if vocab == 256 else GPT_NEOX_NEWLINE_ID
    if not 0 <= newline_id < vocab:
        raise ValueError(f"--newline_id {newline_id} is outside the checkpoint's vocabulary of {vocab}")
    l = cfg.eval_len
    check_eval_length(l, t_train)
    probes = {"newline": torch.full((1, l + 1), newline_id, dtype=torch.long)}
    if vocab == 256:  # byte-level: our corpus is already tokenized
        probes["text"] = Corpus.load().heldout_windows(cfg.eval_prompts, l)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {"checkpoint": str(path), "t_train": t_train, "newline_id": newline_id}
    print(f"{path}: evaluating {list(probes)} to {l} tokens (T_train {t_train})", file=sys.stderr)
    point = checkpoint_point(cfg, recorded)
    result = {"state_size": M.state_size(model.config),
              **analyse_model(model, probes, t_train, cfg.chunk_len, cfg.trace_prompts,
                              cfg.mitigation_settings if cfg.mitigations else None)}
    PointStore(out).put(point, result, time.perf_counter() - t0)
    write_run_config(out, dataclasses.asdict(cfg), wall_s=time.perf_counter() - t0, eval_len=l, **recorded)
    return report({t_train: [{"seed": None, **result}]}, out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(DemoConfig, args, QUICK)
    if args.checkpoint and cfg.out_dir == DemoConfig.out_dir:
        cfg = dataclasses.replace(cfg, out_dir=DemoConfig.out_dir + "_checkpoint")
    if args.replot:
        replot(cfg.out_dir)
    elif args.checkpoint:
        run_checkpoint(args.checkpoint, cfg, args.t_train, args.newline_id)
    else:
        run_demo(cfg)
    print(f"wrote {cfg.out_dir}/: config.json points/ {SUMMARY_PREFIX}_summary.md state_collapse_*.png",
          file=sys.stderr)


if __name__ == "__main__":
    main()
