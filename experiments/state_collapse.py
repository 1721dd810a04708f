"""State collapse measured for what it is: does carrying more than the training window hurt, and what fixes it?

Commands (run from the repository root)
    # the README demo at CPU size (2 cores: see the README for its wall time)
    python -m experiments.state_collapse --quick
    # the reported run (PREREGISTRATION.md: T 64, d_state 16 and 64, seeds 0-2, never used for tuning)
    python -m experiments.state_collapse --workers 2
    # redraw the summary and the figures of a finished run folder (seconds, no training)
    python -m experiments.state_collapse --quick --replot
    # publish a finished run into experiments/results/state_collapse/ (refused from a dirty tree)
    python -m experiments.state_collapse --publish runs/state_collapse
    # the GPU size (one H200, <= 10 minutes): experiments/state_collapse_gpu.py

Question
    Stuffed Mamba (arXiv 2410.07145) reports that a Mamba-2 trained on length-T_train sequences breaks
    down beyond T_train (state collapse) and gives training-free fixes; Buitrago Ruiz & Gu (arXiv
    2507.02782) trace it to states never met in training and give training-side fixes. Here both kinds
    of fixes run side by side on the same models, seeds counted, on a probe where the question can be
    asked at all (experiments/recipe.py: models must use their whole window).

Protocol (frozen in PREREGISTRATION.md before any reported run)
    1. train: per (T_train, d_state, seed) a base model on the repeat-span process with max_lag = T_train
       (experiments/recipe.py, experiments/train.py); on the fix cell, also the training-side variants
       at the same token budget: longer T_train (4T), TBPTT (4 chained segments of T), State Passing,
       noise and fitted-noise initial states
    2. gate: far-repeat accuracy inside the window minus the same reading only T/8 bytes (recipe.copy_margin)
       >= GATE
    3. probe: held-out rows of the same process, l = 32 T, the state carried (measure.per_position_loss)
    4. horizon (precondition): measure.horizon over [T, 8T); untestable if <= T * UNTESTABLE_FRACTION
    5. E(k) = loss(full) - loss(window T) over [kT, 2kT), k = 2, 4, 8, 16, bootstrap over prompts;
       collapsed (excess criterion) if the lower bound of E(16) > E_MIN
    6. [SC]'s criterion on bucketed loss against [T/2, T) (measure.bucketed_criterion)
    7. mechanism (measure.mechanism): norm and top-channel growth, histograms, retention
    8. training-free fixes on the base models (RRI, Delta scaling, state norm, sliding window r in {T, 2T}),
       each tuned per model on validation rows at 4T, scored on the test probe: gain over [16T, 32T)
       and in-window cost over [0, T), both with bootstrap intervals over prompts
    9. training-side fixes: the same gain and cost against the base model of the same seed

Reading order: 1 config -> 2 the fixes and their tuning -> 3 one point -> 4 report -> 5 figure -> 6 main

Glossary
    T  T_train = the process's max_lag     n  d_state     k  E(k)'s multiple     r  window
    k/N  k of N seeds (N counts every seed, failed runs included)

Outputs (one run folder, default runs/state_collapse[_quick]/)
    config.json, points/<key>.json (one per model), state_collapse_summary.md / .json,
    state_collapse_fixes.png (every fix side by side), state_collapse_loss.png (the excess per position),
    state_collapse_state.png (state norm over time, the largest head's entries at T vs 16 T), models/
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import mitigations as M

from experiments import measure as ME
from experiments import recipe as R
from experiments.common import REPO, add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag, git_commit
from experiments.data import Corpus
from experiments.publish import prereg_commit, publish_run, run_record
from experiments.sweep import (Point, check_seeds_and_workers, finished_run, grid_points, point_train_config,
                               recipe, run_sweep, train_point_model, workers_flag)

# ----------------------------------------------------------------------------------------------
# 1. Verdict constants (PREREGISTRATION.md) and the config
# ----------------------------------------------------------------------------------------------
GATE = 0.05  # recipe.copy_margin: far-repeat accuracy must exceed that of the same model reading T/8 bytes by this
UNTESTABLE_FRACTION = 0.25  # a verdict is "untestable" when the horizon is <= T / 4 (far below T)
E_MIN = 0.01  # nats/byte: collapsed when the 95% lower bound of E(16) exceeds this
PRIMARY_K = 16  # E(k)'s k of the verdict and of every fix's gain ([16T, 32T))
LONG_MULT = 32  # the probe is 32 T long
TUNE_MULT = 4  # fixes are tuned on validation rows of 4 T
VARIANTS = ("base", "longer_t", "tbptt", "state_passing", "noise", "fitted_noise")  # training-side
TRAINING_FACTOR = 4  # longer_t trains at 4T; tbptt chains 4 segments of T (same tokens per step)
FREE_FIXES = ("rri", "delta_scaling", "state_norm", "sliding_window")  # training-free
TUNING_GRIDS = {  # each fix's settings, tuned per model on the validation rows (mean loss over [0, 4T))
    "rri": [(c, lb) for c in (1, 2, 4, 8, 16) for lb in (1.0, 0.75)],  # lambda_a = 1 - 1/(c T), lambda_B
    "delta_scaling": [0.5, 0.75, 1.25, 1.5, 2.0],  # Delta x factor (LongMamba)
    "state_norm": [1.0, 1.5, 2.0],  # tau = factor x the largest norm on calibration rows of T
    "sliding_window": [1, 2],  # r = m T
}


@dataclass(frozen=True)
class DemoConfig:
    """Models on a T_train x d_state grid; the training-side variants on the fix cell. Each field is a flag."""

    out_dir: str = flag("runs/state_collapse", "run folder")
    # --- the process (experiments/recipe.py) ---
    span_len: int = flag(16, "S, bytes per span of the repeat-span process")
    p_repeat: float = flag(0.5, "probability that a span repeats one from up to T_train back")
    # --- the models ---
    d_model: int = flag(64, "d, residual width")
    n_layer: int = flag(2, "Mamba-2 blocks")
    headdim: int = flag(16, "p, channels per head")
    train_lens: tuple[int, ...] = flag((64,), "T_train grid (tokens; also the process's max_lag)")
    d_states: tuple[int, ...] = flag((16, 64), "d_state grid (n; the per-head state is headdim x n)")
    fix_cell: tuple[int, ...] = flag((64, 64), "(T_train, d_state) of the training-side variants; empty = none")
    seeds: tuple[int, ...] = flag((0, 1, 2), "training seeds (PREREGISTRATION.md: 0-4 reported, 1000+ tuning)")
    tokens_per_step: int = flag(2048, "tokens per optimizer step (every variant: the same token budget)")
    steps: int = flag(800, "optimizer steps per model")
    lr: float = flag(3e-3, "peak learning rate")
    # --- evaluation ---
    eval_prompts: int = flag(16, "test rows of the probe (the bootstrap resamples them)")
    val_prompts: int = flag(8, "validation rows (tuning the fixes; disjoint seed)")
    chunk_len: int = flag(128, "tokens per forward call with the state carried")
    free_fixes: bool = flag(True, "tune and score the training-free fixes on the base models")
    # --- machine ---
    device: str = flag("auto", "auto | cpu | cuda")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values (the README demo)")

    def __post_init__(self):
        check_seeds_and_workers(self)
        for t in self.train_lens:
            if t % self.span_len or self.tokens_per_step % (TRAINING_FACTOR * t):
                raise ValueError(f"each T_train must be a multiple of --span_len {self.span_len} and divide "
                                 f"--tokens_per_step / {TRAINING_FACTOR} = {self.tokens_per_step // TRAINING_FACTOR}; "
                                 f"got {t}")
        if self.fix_cell and (len(self.fix_cell) != 2 or self.fix_cell[0] not in self.train_lens
                              or self.fix_cell[1] not in self.d_states):
            raise ValueError(f"--fix_cell must be one (T_train, d_state) of the grid {self.train_lens} x "
                             f"{self.d_states}, got {self.fix_cell}")


# The README demo: one cell, two seeds, every fix (2 cores).
QUICK = dict(out_dir="runs/state_collapse_quick", train_lens=(32,), d_states=(64,), fix_cell=(32, 64),
             seeds=(0, 1), steps=300, eval_prompts=12, val_prompts=6, workers=2)
DESCRIPTION = "State collapse: E(k) over an exact window, the horizon, and every fix (module docstring)."


# ----------------------------------------------------------------------------------------------
# 2. The training-free fixes, tuned per model
# ----------------------------------------------------------------------------------------------

def fix_context(name: str, setting, model, t_train: int, calib: torch.Tensor):
    """(description, context manager) of one training-free fix at one setting of its grid."""
    if name == "rri":
        c, lam_b = setting
        lam_a = 1.0 - 1.0 / (c * t_train)  # [SC] rule of thumb: 1 / (1 - lambda_a) = c T tokens of horizon
        return f"RRI lambda_a=1-1/({c}T) lambda_B={lam_b}", M.rri(model, lambda_a=lam_a, lambda_B=lam_b)
    if name == "delta_scaling":
        return f"Delta x {setting}", M.delta_scaling(model, setting)
    if name == "state_norm":  # thresholds from separate in-distribution rows of T tokens (calib), never the probe
        every = max(1, t_train // 4)
        taus = M.calibrate_state_norm(model, calib, every=every) * setting
        return f"state norm tau x {setting}", M.state_norm(model, taus, every=every)
    if name == "sliding_window":
        return f"sliding window r={setting}T", M.sliding_window(model, setting * t_train)
    raise ValueError(f"unknown fix {name!r}; expected one of {FREE_FIXES}")


def tune_and_score(model, name: str, t_train: int, val: torch.Tensor, test: torch.Tensor, calib: torch.Tensor,
                   chunk_len: int) -> tuple[str, dict, torch.Tensor]:
    """Pick the setting with the lowest validation loss over [0, 4T); return (its description, every
    setting's validation loss, its per-prompt test losses (b, l))."""
    scores = {}
    for setting in TUNING_GRIDS[name]:
        desc, ctx = fix_context(name, setting, model, t_train, calib)
        with ctx:
            scores[desc] = (ME.per_position_loss(model, val, chunk_len).mean().item(), setting)
    best = min(scores, key=lambda d: scores[d][0])
    _, ctx = fix_context(name, scores[best][1], model, t_train, calib)
    with ctx:
        test_loss = ME.per_position_loss(model, test, chunk_len)
    return best, {d: v for d, (v, _) in scores.items()}, test_loss


# ----------------------------------------------------------------------------------------------
# 3. One point: train one model, measure it
# ----------------------------------------------------------------------------------------------

def demo_points(cfg: DemoConfig) -> list[Point]:
    """Base models on the grid; the training-side variants on the fix cell. Seeds innermost."""
    grid = [{"t_train": t, "d_state": n, "variant": "base"} for t in cfg.train_lens for n in cfg.d_states]
    if cfg.fix_cell:
        grid += [{"t_train": cfg.fix_cell[0], "d_state": cfg.fix_cell[1], "variant": v} for v in VARIANTS[1:]]
    return grid_points(grid, cfg.seeds, recipe(cfg, grid_fields=("train_lens", "d_states", "fix_cell")))


def process(cfg: DemoConfig, t_train: int) -> R.RecipeConfig:
    return R.RecipeConfig(max_lag=t_train, span_len=cfg.span_len, p_repeat=cfg.p_repeat)


def variant_fields(variant: str, t_train: int) -> dict:
    """train.py fields of a training-side variant (same tokens per step as the base model)."""
    return {"base": {}, "longer_t": {"seq_len": TRAINING_FACTOR * t_train},
            "tbptt": {"n_segments": TRAINING_FACTOR}, "state_passing": {"init_state": "state_passing"},
            "noise": {"init_state": "noise"}, "fitted_noise": {"init_state": "fitted_noise"}}[variant]


def range_means(loss: torch.Tensor, t_train: int) -> dict:
    """Per-prompt mean loss over [0, T) and over [kT, 2kT) for each k (lists of b floats)."""
    out = {"in_window": loss[:, :t_train].mean(1).tolist()}
    for k in ME.EXCESS_KS:
        out[str(k)] = loss[:, k * t_train:2 * k * t_train].mean(1).tolist()
    return out


def run_point(cfg: DemoConfig, point: Point) -> dict:
    """Train (or reuse) one model and measure it: gate, horizon, E(k), bucketed criterion, mechanism,
    per-prompt range losses, and on base models the tuned training-free fixes."""
    t_train, n, variant, seed = (point.coords[k] for k in ("t_train", "d_state", "variant", "seed"))
    corpus, rc = Corpus.load(), process(cfg, t_train)
    fields = variant_fields(variant, t_train)
    seq_len, n_seg = fields.pop("seq_len", t_train), fields.get("n_segments", 1)
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=seq_len * n_seg,
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=seed, device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=n, headdim=cfg.headdim, lr=cfg.lr,
                              task="custom", **fields)
    tcfg = dataclasses.replace(tcfg, seq_len=seq_len, chunk_size=min(64, seq_len))
    batches = R.RecipeBatches(corpus, rc, seed=seed, batch_size=tcfg.batch_size, row_len=seq_len * n_seg + 1)
    t0 = time.perf_counter()
    try:
        model = ME.load_for_eval(train_point_model(tcfg, batches), cfg.device)
    except Exception as e:  # noqa: BLE001 - a failed run is counted, not dropped
        return {"failed": f"{type(e).__name__}: {e}", "train_s": time.perf_counter() - t0}
    train_s = time.perf_counter() - t0
    test = R.probe_rows(corpus, rc, cfg.eval_prompts, LONG_MULT * t_train)
    val = R.probe_rows(corpus, rc, cfg.val_prompts, TUNE_MULT * t_train, seed=R.VALIDATION_SEED).ids
    calib = R.probe_rows(corpus, rc, cfg.val_prompts, t_train, seed=R.CALIBRATION_SEED, split="train").ids[:, :-1]
    device = next(model.parameters()).device
    with torch.no_grad():
        window = test.ids[:, :t_train].to(device)
        seen = model(window)[0]
        with M.sliding_window(model, max(1, t_train // R.GATE_BLIND_FRACTION)):
            blind = model(window)[0]
        far, far_blind = (R.repeat_copy_accuracy(x, test, rc, stop=t_train) for x in (seen, blind))
    loss_of = ME.model_loss_fn(model, cfg.chunk_len)
    full, window = loss_of(test.ids, None), loss_of(test.ids, t_train)
    hz = ME.horizon(loss_of, test.ids, t_train)
    result = {"failed": None, "train_s": train_s, "gate": far - far_blind, "far_repeat_accuracy": far,
              "far_repeat_accuracy_blind": far_blind, "state_size": M.state_size(model.config),
              "horizon": dataclasses.asdict(hz),
              "excess": [dataclasses.asdict(e) for e in ME.excess(full, window, t_train)],
              "bucketed": dataclasses.asdict(ME.bucketed_criterion(full, t_train)),
              "mechanism": dataclasses.asdict(ME.mechanism(model, test.ids[:4, :-1], t_train)),
              "losses": {"full": range_means(full, t_train), "window": range_means(window, t_train)},
              "curve": log_binned(full), "window_curve": log_binned(window), "fixes": {}}
    if variant == "base" and cfg.free_fixes:
        for name in FREE_FIXES:
            best, scores, loss = tune_and_score(model, name, t_train, val, test.ids, calib, cfg.chunk_len)
            result["fixes"][name] = {"setting": best, "validation": scores, "losses": range_means(loss, t_train),
                                     "curve": log_binned(loss)}
    result["eval_s"] = time.perf_counter() - t0 - train_s
    return result


def log_binned(loss: torch.Tensor, n_points: int = 40) -> dict:
    """The prompt-mean curve averaged over geometric bins (for log-x figures)."""
    c = loss.mean(0)
    edges = sorted({int(round(e)) for e in np.geomspace(1, c.numel(), n_points)} | {0})
    return {"position": [math.sqrt(max(a, 1) * b) for a, b in zip(edges, edges[1:])],
            "loss": [c[a:b].mean().item() for a, b in zip(edges, edges[1:])]}


# ----------------------------------------------------------------------------------------------
# 4. The report: per seed, then k/N and medians
# ----------------------------------------------------------------------------------------------

def paired_gain(before: list[float], after: list[float]) -> ME.Interval:
    """Mean over prompts of before - after (positive: the fix lowers the loss), bootstrap interval."""
    return ME.bootstrap_mean(np.asarray(before) - np.asarray(after))


def verdict(r: dict, t_train: int) -> str:
    """failed | gate-failed | untestable | collapsed | not collapsed (the preregistered order)."""
    if r["failed"]:
        return "failed"
    if not r["gate"] >= GATE:
        return "gate-failed"
    h = r["horizon"]["value"]
    if h is not None and h <= UNTESTABLE_FRACTION * t_train:
        return "untestable"
    e = next(x for x in r["excess"] if x["k"] == PRIMARY_K)["excess"]
    return "collapsed" if e["lo"] > E_MIN else "not collapsed"


def seed_rows(cfg: DemoConfig, results: dict[str, dict]) -> list[dict]:
    """One row per point: its verdict and numbers, and each fix's gain and cost against its base model."""
    rows = []
    base_of = {(p.coords["t_train"], p.coords["d_state"], p.coords["seed"]): results[p.key]
               for p in demo_points(cfg) if p.coords["variant"] == "base"}
    for p in demo_points(cfg):
        t, n, v, s = (p.coords[k] for k in ("t_train", "d_state", "variant", "seed"))
        r = results[p.key]
        row = {"t_train": t, "d_state": n, "variant": v, "seed": s, "verdict": verdict(r, t)}
        if r["failed"]:
            rows.append({**row, "error": r["failed"]})
            continue
        row.update(gate=r["gate"], horizon=r["horizon"]["value"], bucketed=r["bucketed"]["collapsed"],
                   bucketed_ratio=r["bucketed"]["ratio"], E={str(e["k"]): e["excess"] for e in r["excess"]},
                   norm_growth=r["mechanism"]["norm_growth"], channel_growth=r["mechanism"]["channel_growth"],
                   share_never_forget=r["mechanism"]["share_never_forget"],
                   in_window=float(np.mean(r["losses"]["full"]["in_window"])),
                   long=float(np.mean(r["losses"]["full"][str(PRIMARY_K)])))
        base = base_of.get((t, n, s))
        fixes = {}
        if v == "base":
            for name, f in r["fixes"].items():
                fixes[name] = {"setting": f["setting"],
                               "gain": dataclasses.asdict(paired_gain(r["losses"]["full"][str(PRIMARY_K)],
                                                                      f["losses"][str(PRIMARY_K)])),
                               "cost": dataclasses.asdict(paired_gain(f["losses"]["in_window"],
                                                                      r["losses"]["full"]["in_window"]))}
        elif base is not None and not base["failed"]:
            fixes[v] = {"setting": v,
                        "gain": dataclasses.asdict(paired_gain(base["losses"]["full"][str(PRIMARY_K)],
                                                               r["losses"]["full"][str(PRIMARY_K)])),
                        "cost": dataclasses.asdict(paired_gain(r["losses"]["full"]["in_window"],
                                                               base["losses"]["full"]["in_window"]))}
        row["fixes"] = fixes
        rows.append(row)
    return rows


def fmt(iv: dict) -> str:
    return f"{iv['value']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def summary_markdown(cfg: DemoConfig, rows: list[dict], commit: str, prereg: str | None) -> str:
    md = [f"State collapse on the repeat-span process (run at commit {commit}; pre-registration {prereg}). Criteria x probes: 2 x 1 "
          f"(the excess criterion: 95% lower bound of E({PRIMARY_K}) > {E_MIN} nats/byte; [SC]'s 2x criterion "
          f"on bucketed loss against [T/2, T)), on one probe (held-out rows, l = {LONG_MULT} T). Verdicts are "
          f"reported only where the gate (far-repeat accuracy minus that with only T/8 bytes visible >= {GATE}) holds and the horizon is above "
          f"T/{int(1 / UNTESTABLE_FRACTION)}. Intervals: 95% percentile bootstrap over {cfg.eval_prompts} prompts.", "",
          "| T | n | variant | seed | verdict | gate (copy margin) | horizon | E(2) | E(4) | E(8) | E(16) | bucketed (ratio) | "
          "norm growth 16T/T | heads retention>0.99 over T |", "|" + "---|" * 14]
    for r in rows:
        if r["verdict"] == "failed":
            md.append(f"| {r['t_train']} | {r['d_state']} | {r['variant']} | {r['seed']} | failed: {r['error'][:60]} |"
                      + " |" * 9)
            continue
        md.append(f"| {r['t_train']} | {r['d_state']} | {r['variant']} | {r['seed']} | {r['verdict']} | "
                  f"{r['gate']:.2f} | {r['horizon'] if r['horizon'] is not None else '> 4T'} | "
                  + " | ".join(fmt(r["E"][str(k)]) for k in ME.EXCESS_KS)
                  + f" | {'fires' if r['bucketed'] else 'no'} ({r['bucketed_ratio']:.2f}) | {r['norm_growth']:.2f} | "
                  f"{r['share_never_forget']:.2f} |")
    md += ["", "Counts per cell (k/N over every seed, failed runs included in N):", "",
           "| T | n | variant | collapsed | not collapsed | untestable | gate-failed | failed | bucketed fires | "
           "median E(16) | median horizon |", "|" + "---|" * 11]
    cells = sorted({(r["t_train"], r["d_state"], r["variant"]) for r in rows},
                   key=lambda c: (c[0], c[1], VARIANTS.index(c[2])))
    for c in cells:
        rs = [r for r in rows if (r["t_train"], r["d_state"], r["variant"]) == c]
        N = len(rs)
        count = lambda v: sum(r["verdict"] == v for r in rs)  # noqa: E731
        ok = [r for r in rs if r["verdict"] != "failed"]
        med_e = ME.median_of([r["E"][str(PRIMARY_K)]["value"] for r in ok])
        med_h = ME.median_of([r["horizon"] for r in ok])  # censored (> 4T) horizons left out, counted below
        censored = sum(r["horizon"] is None for r in ok)
        md.append(f"| {c[0]} | {c[1]} | {c[2]} | {count('collapsed')}/{N} | {count('not collapsed')}/{N} | "
                  f"{count('untestable')}/{N} | {count('gate-failed')}/{N} | {count('failed')}/{N} | "
                  f"{sum(r['bucketed'] for r in ok)}/{N} | {'-' if med_e is None else f'{med_e:+.3f}'} | "
                  f"{'-' if med_h is None else med_h:}" + (f" ({censored} > 4T)" if censored else "") + " |")
    md += ["", f"Fixes: gain = loss without - with over [{PRIMARY_K}T, {2 * PRIMARY_K}T) (positive helps), cost = "
           "in-window loss [0, T) with - without (positive hurts); training-free fixes tuned per model on "
           "validation rows at 4T; training-side fixes against the base model of the same seed (same token budget).",
           "", "| T | n | seed | fix | setting | gain (nats/byte) | cost (nats/byte) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, f in r.get("fixes", {}).items():
            md.append(f"| {r['t_train']} | {r['d_state']} | {r['seed']} | {name} | {f['setting']} | "
                      f"{fmt(f['gain'])} | {fmt(f['cost'])} |")
    return "\n".join(md) + "\n"


def report(cfg: DemoConfig, results: dict[str, dict], out: Path, record: dict) -> dict:
    """summary.json / summary.md / figures into out; record: the run's config.json (commits, prereg)."""
    rows = seed_rows(cfg, results)
    commits = sorted({i.get("git_commit", "unknown") for i in record.get("invocations", [])})
    commit = ", ".join(commits) if commits else f"{git_commit()} (now; no invocation recorded)"
    summary = {"commit": commit, "prereg_commit": record.get("prereg_commit"), "constants": {"GATE": GATE, "UNTESTABLE_FRACTION": UNTESTABLE_FRACTION,
                                               "E_MIN": E_MIN, "PRIMARY_K": PRIMARY_K}, "rows": rows}
    atomic_write_json(out / "state_collapse_summary.json", summary)
    text = summary_markdown(cfg, rows, commit, record.get("prereg_commit"))
    atomic_write_text(out / "state_collapse_summary.md", text)
    print(text)
    plot(cfg, results, rows, out)
    return summary


# ----------------------------------------------------------------------------------------------
# 5. Figures: every fix side by side; loss vs position
# ----------------------------------------------------------------------------------------------

def plot(cfg: DemoConfig, results: dict[str, dict], rows: list[dict], out: Path) -> list[Path]:
    written = []
    fixes = [f for f in FREE_FIXES] + list(VARIANTS[1:])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "gain", f"gain over [{PRIMARY_K}T, {2 * PRIMARY_K}T) (nats/byte; > 0 helps)"),
                           (axes[1], "cost", "in-window cost over [0, T) (nats/byte; > 0 hurts)")):
        for i, name in enumerate(fixes):
            vals = [r["fixes"][name][key]["value"] for r in rows if name in r.get("fixes", {})]
            if vals:
                ax.scatter([i] * len(vals), vals, s=14, alpha=0.7, color="C0" if name in FREE_FIXES else "C1")
                ax.hlines(np.median(vals), i - 0.3, i + 0.3, color="k", lw=1.5)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(fixes)), [f.replace("_", " ") for f in fixes], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Fixes side by side (blue: training-free, tuned per model; orange: training-side, same tokens). "
                 "Dots: seeds; bar: median", fontsize=9)
    fig.tight_layout()
    written.append(out / "state_collapse_fixes.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))  # the loss, and the excess of the full state over the window
    variants = [v for v in VARIANTS if any(p.coords["variant"] == v for p in demo_points(cfg))]
    for p in demo_points(cfg):
        r = results[p.key]
        if r["failed"]:
            continue
        t, n, v = p.coords["t_train"], p.coords["d_state"], p.coords["variant"]
        if v == "base":
            ax, i = axes[0], cfg.train_lens.index(t) * len(cfg.d_states) + cfg.d_states.index(n)
            label = f"base T={t} n={n}"
        else:
            ax, i = axes[1], len(cfg.train_lens) * len(cfg.d_states) + variants.index(v)
            label = f"{v} T={t} n={n}"
        x = np.asarray(r["curve"]["position"]) / t
        diff = np.asarray(r["curve"]["loss"]) - np.asarray(r["window_curve"]["loss"])
        ax.plot(x, diff, color=f"C{i % 10}", lw=0.9, label=label if p.coords["seed"] == cfg.seeds[0] else None)
    for ax, title in zip(axes, ("base models", "training-side variants (same tokens)")):
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(1, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("position / T_train")
        ax.set_ylabel("loss(full state) - loss(window T) (nats/byte)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Excess of the full carried state over an exact window of T bytes, held-out repeat-span text "
                 "(one line per seed; E(k) averages it over [kT, 2kT))", fontsize=9)
    fig.tight_layout()
    written.append(out / "state_collapse_loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # the mechanism of the base models: state norm over time, and the largest head's entries at T vs 16 T
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p in demo_points(cfg):
        r = results[p.key]
        if r["failed"] or p.coords["variant"] != "base":
            continue
        t, n = p.coords["t_train"], p.coords["d_state"]
        color = f"C{(cfg.train_lens.index(t) * len(cfg.d_states) + cfg.d_states.index(n)) % 10}"
        label = f"T={t} n={n}" if p.coords["seed"] == cfg.seeds[0] else None
        m = r["mechanism"]
        axes[0].plot(np.asarray(m["positions"]) / t, m["norm"], color=color, lw=0.9, label=label)
        centres = (np.asarray(m["hist_edges"][:-1]) + np.asarray(m["hist_edges"][1:])) / 2
        axes[1].plot(centres, m["hist_at_t"], color=color, lw=0.9, ls=":")
        axes[1].plot(centres, m["hist_at_16t"], color=color, lw=0.9, label=label)
    axes[0].set(xscale="log", xlabel="position / T_train", ylabel="largest per-head ||h||_F")
    axes[0].axvline(1, color="gray", ls="--", lw=0.8)
    axes[1].set(xlabel="log10 |h entry| of the largest head", ylabel="entries (dotted: at T; solid: at 16 T)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("State mechanism of the base models (one line per seed)", fontsize=9)
    fig.tight_layout()
    written.append(out / "state_collapse_state.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figures of a finished run folder or committed results folder (no training)."""
    cfg, results, out = finished_run(run_dir, out, DemoConfig, demo_points)
    return report(cfg, results, out, run_record(Path(run_dir)))


# ----------------------------------------------------------------------------------------------
# 6. Publishing (clean tree only) and main
# ----------------------------------------------------------------------------------------------
RESULTS = REPO / "experiments" / "results" / "state_collapse"


def publish(run_dir: str | Path) -> Path:
    """Copy a finished run's points and record into experiments/results/state_collapse/ with a manifest
    (the run's commits and the publishing commit), and its figures into figures/ (publish.publish_run:
    clean tree only; every invocation of the run must itself come from a clean commit)."""
    return publish_run(run_dir, RESULTS, "state_collapse", DemoConfig, demo_points, replot,
                       figures=("state_collapse_fixes.png", "state_collapse_loss.png", "state_collapse_state.png"))


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(DemoConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the summary and figures from out_dir's points (no training)")
    add_flag(p, "publish", str, "", "publish this finished run folder into experiments/results/state_collapse/")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.publish:
        print(f"published into {publish(args.publish)}", file=sys.stderr)
        return
    cfg = config_from_args(DemoConfig, args, QUICK)
    if args.replot:
        replot(cfg.out_dir)
        return
    t0 = time.perf_counter()
    results = run_sweep(cfg, demo_points(cfg), run_point, "collapse", prereg_commit=prereg_commit())
    report(cfg, results, Path(cfg.out_dir), run_record(Path(cfg.out_dir)))
    print(f"wrote {cfg.out_dir}/ in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
