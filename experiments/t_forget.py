"""T_forget against state size: the shortest training length at which a Mamba-2 learns to forget.

Commands (run from the repository root)
    # the reported CPU grid (PREREGISTRATION.md section 8): d_state 4, 16, 64 x T_train 16-256, seeds 0-2:
    # 45 models, 64 min on 2 cores shared with other runs (the pre-registered reading uses T 16-128)
    python -m experiments.t_forget --quick
    # redraw the summary and figures of a finished run folder (seconds, no training)
    python -m experiments.t_forget --quick --replot
    # publish a finished run into experiments/results/t_forget/ (refused from a dirty tree)
    python -m experiments.t_forget --publish runs/t_forget_quick
    # the GPU size (one H200, <= 10 minutes, throughput calibrated first): experiments/capacity_gpu.py

Question
    Stuffed Mamba (arXiv 2410.07145) trains Mamba-2 models of several state sizes at several training
    lengths and finds the shortest length at which a model no longer collapses beyond it, T_forget,
    proportional to the state size: T_forget ~= 5.172 K tokens per M state elements (a slope of b = 1 on
    log-log axes). Its explanation: a state larger than what T_train tokens fill never has to forget,
    so it never learns to. Here: does T_forget grow with N_S when only d_state changes (width, depth and
    heads fixed, so nothing else grows with the state), and with which exponent b in T_forget ~ N_S^b?

Protocol (frozen in PREREGISTRATION.md before any reported run; numbered as the code below)
    1. process: the recall stream (experiments/recall_stream.py): 2-byte slots [key, value]; half the
       slots ask for the value of a key mentioned within the last T bytes, the others bind a key not
       mentioned within T to a new value. Everything predictable lies within T bytes, and a key reused
       after T has a new value: beyond T, a model that keeps old bindings holds two values for one key.
       (The repeat-span process of issue 21 is not learned at this size: experiments/LOG.md.)
    2. train one model per (d_state, T_train, seed) (experiments/train.py, same token budget for all)
    3. gate: on GATE_ROWS in-distribution rows of T bytes, argmax accuracy on query values bound in the
       far half of the window minus the same reading only T/8 bytes >= GATE (the model learned the task
       across its window; a model that recalls nothing cannot show collapse, nor that it forgets)
    4. probe: held-out rows of the process, l = 32 T, the state carried; E(k) = loss(full state) -
       loss(exact window of T) over [kT, 2kT) (experiments/measure.py), bootstrap over prompts.
       A model that drops what it no longer needs has E = 0; one that keeps stale bindings, E > 0
    5. verdict per model: failed | gate-failed | collapsed (95% lower bound of E(16) > E_MIN) | not collapsed
    6. T_forget per (d_state, seed): the interval (lo, hi] its verdicts over the grid allow
       (experiments/scaling.verdict_interval): lo = the largest T that collapsed, hi = the smallest
       T above it that did not; censored at either end of the grid
    7. the exponent b of T_forget ~ a N_S^b: interval-censored maximum likelihood over every
       (d_state, seed) (experiments/scaling.fit_intervals), with its 95% profile-likelihood interval;
       the paper's proportional line (b = 1) drawn beside it.
    Reported beside it, never a verdict: the same intervals and fit without the gate (every trained
    model read by E(16) alone), since a state too small for its window may forget without recalling it.

Reading order: 1 constants and config -> 2 one point -> 3 T_forget and the fit -> 4 report, figure -> 5 main

Glossary
    T  T_train (tokens = bytes) = the process's max_lag      n  d_state (the paper's N)
    N_S  state elements of the whole model (mitigations.state_size: SSM + conv state, all layers)
    E(k)  excess loss of the full state over the window T, nats/byte      k/N  k of N seeds

Outputs (one run folder, default runs/t_forget[_quick]/)
    config.json, points/<key>.json (one per model), t_forget_summary.md / .json, t_forget.png, models/
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
from matplotlib.ticker import NullFormatter
import numpy as np
import torch

import mitigations as M
from minimamba import Mamba2Config

from experiments import measure as ME
from experiments import recall_stream as RS
from experiments import scaling as SCL
from experiments.common import REPO, add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag
from experiments.publish import prereg_commit, publish_run, run_record, run_commits
from experiments.sweep import (Point, check_seeds_and_workers, finished_run, grid_points, point_train_config,
                               recipe, run_sweep, train_point_model, workers_flag)

# ----------------------------------------------------------------------------------------------
# 1. Verdict constants (PREREGISTRATION.md, section 8) and the config
# ----------------------------------------------------------------------------------------------
GATE = 0.25  # far-query accuracy (values bound in [T/2, T] back) minus the same reading only T/8 bytes:
#             the model recalls across its window (a guess gets 1/64; PREREGISTRATION.md section 8)
E_MIN = 0.02  # nats/byte: collapsed when the 95% lower bound of E(16) exceeds this
PRIMARY_K = 16  # E(k) of the verdict: [16T, 32T)
GATE_ROWS = 64  # rows of T bytes the gate reads (from the zero state, as in training)
GATE_SEED = RS.PROBE_SEED + 1  # the gate's rows: a stream apart from the probe's and every training run's
BLIND_FRACTION = 8  # the gate's blind reference reads the last T / 8 bytes: no far binding is in it
LONG_MULT = 32  # the probe is 32 T long
VERDICTS = ("failed", "gate-failed", "collapsed", "not collapsed")
PREREGISTERED_LENS = (16, 32, 64, 128)  # PREREGISTRATION.md section 8's T_train grid. The config committed with it
#   trained T 256 too (its default grid disagreed with the text); the summary reads both grids and puts
#   the pre-registered one first (experiments/LOG.md, 2026-12-06 evening)


@dataclass(frozen=True)
class TForgetConfig:
    """Models on a d_state x T_train grid. Each field is also a command-line flag."""

    out_dir: str = flag("runs/t_forget", "run folder")
    # --- the process (experiments/recall_stream.py) ---
    p_query: float = flag(0.5, "probability that a slot asks for the value of a key mentioned within T_train")
    # --- the models: only d_state changes across the grid ---
    d_model: int = flag(64, "d, residual width")
    n_layer: int = flag(2, "Mamba-2 blocks")
    headdim: int = flag(16, "p, channels per head")
    d_states: tuple[int, ...] = flag((4, 16, 64), "d_state grid (n; the only size that changes)")
    train_lens: tuple[int, ...] = flag((16, 32, 64, 128, 256), "T_train grid (tokens; also the process's max_lag)")
    seeds: tuple[int, ...] = flag((0, 1, 2), "training seeds (PREREGISTRATION.md: 0-4 reported, 1000+ tuning)")
    tokens_per_step: int = flag(2048, "tokens per optimizer step (every model: the same token budget)")
    steps: int = flag(1500, "optimizer steps per model")
    lr: float = flag(1e-2, "peak learning rate")
    # --- evaluation ---
    eval_prompts: int = flag(16, "test rows of the probe (the bootstrap resamples them)")
    chunk_len: int = flag(128, "tokens per forward call with the state carried")
    # --- machine ---
    device: str = flag("auto", "auto | cpu | cuda")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values (the reported CPU grid)")

    def __post_init__(self):
        check_seeds_and_workers(self)
        if len(self.d_states) < 2 or len(self.train_lens) < 2:
            raise ValueError(f"a slope needs >= 2 d_states and >= 2 training lengths, got {self.d_states}, "
                             f"{self.train_lens}")
        if list(self.train_lens) != sorted(set(self.train_lens)):
            raise ValueError(f"--train_lens must increase, got {self.train_lens}")
        for t in self.train_lens:
            if self.tokens_per_step % t:
                raise ValueError(f"each T_train must divide --tokens_per_step {self.tokens_per_step}; got {t}")
            RS.StreamConfig(max_lag=t, p_query=self.p_query)  # raises on a T the process cannot make


QUICK = dict(out_dir="runs/t_forget_quick", workers=2)  # the reported CPU grid is the default grid
DESCRIPTION = "T_forget against state size on the recall stream (module docstring)."


def process(cfg: TForgetConfig, t_train: int) -> RS.StreamConfig:
    return RS.StreamConfig(max_lag=t_train, p_query=cfg.p_query)


def grid(cfg: TForgetConfig) -> list[Point]:
    """Every (d_state, T_train) model, seeds innermost."""
    cells = [{"d_state": n, "t_train": t} for n in cfg.d_states for t in cfg.train_lens]
    return grid_points(cells, cfg.seeds, recipe(cfg, grid_fields=("d_states", "train_lens")))


# ----------------------------------------------------------------------------------------------
# 2. One point: train one model, measure its gate, E(k) and retention
# ----------------------------------------------------------------------------------------------

def run_point(cfg: TForgetConfig, point: Point) -> dict:
    """Train (or reuse) one model and measure it (protocol steps 2-4)."""
    n, t_train, seed = (point.coords[k] for k in ("d_state", "t_train", "seed"))
    rc = process(cfg, t_train)
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=t_train,
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=seed, device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=n, headdim=cfg.headdim, lr=cfg.lr,
                              task="custom")
    tcfg = dataclasses.replace(tcfg, chunk_size=min(64, t_train), eval_every=0)
    batches = RS.StreamBatches(rc, seed=seed, batch_size=tcfg.batch_size, row_len=t_train + 1)
    t0 = time.perf_counter()
    try:
        model = ME.load_for_eval(train_point_model(tcfg, batches), cfg.device)
    except Exception as e:  # noqa: BLE001 - a failed run is counted, not dropped
        return {"failed": f"{type(e).__name__}: {e}", "train_s": time.perf_counter() - t0}
    train_s = time.perf_counter() - t0
    test = RS.probe_rows(rc, cfg.eval_prompts, LONG_MULT * t_train)
    gate_rows = RS.probe_rows(rc, GATE_ROWS, t_train, seed=GATE_SEED)  # in-distribution rows of T bytes
    device = next(model.parameters()).device
    with torch.no_grad():  # 3. the gate
        window = gate_rows.ids[:, :t_train].to(device)
        seen = model(window)[0]
        with M.sliding_window(model, max(1, t_train // BLIND_FRACTION)):
            blind = model(window)[0]
        far, far_blind = (RS.query_accuracy(x, gate_rows, rc) for x in (seen, blind))
    loss_of = ME.model_loss_fn(model, cfg.chunk_len)  # 4. the probe
    full, win = loss_of(test.ids, None), loss_of(test.ids, t_train)
    mech = ME.mechanism(model, test.ids[:4, :-1], t_train)
    return {"failed": None, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s,
            "state_size": M.state_size(model.config), "gate": far - far_blind, "far_query_accuracy": far,
            "far_query_accuracy_blind": far_blind,
            "excess": [dataclasses.asdict(e) for e in ME.excess(full, win, t_train)],
            "in_window_loss": full[:, :t_train].mean().item(),
            "far_loss": {"full": full[:, 16 * t_train:].mean().item(), "window": win[:, 16 * t_train:].mean().item()},
            "share_never_forget": mech.share_never_forget, "norm_growth": mech.norm_growth,
            "retention_over_t": list(mech.retention_over_t), "curve": binned(full), "window_curve": binned(win)}


def binned(loss: torch.Tensor, n_points: int = 32) -> dict:
    """Mean loss over prompts in n_points log-spaced position bins (for the figure)."""
    lp = loss.mean(0)  # (l,)
    edges = np.unique(np.geomspace(1, lp.numel(), n_points + 1).astype(int))
    return {"pos": [int(e) for e in edges[:-1]],
            "loss": [lp[a - 1:b - 1].mean().item() for a, b in zip(edges[:-1], edges[1:])]}


def verdict(r: dict) -> str:
    """failed | gate-failed | collapsed | not collapsed (the preregistered order)."""
    if r["failed"]:
        return "failed"
    if not r["gate"] >= GATE:
        return "gate-failed"
    e = next(x for x in r["excess"] if x["k"] == PRIMARY_K)["excess"]
    return "collapsed" if e["lo"] > E_MIN else "not collapsed"


def ungated_verdict(r: dict) -> str:
    """The reading beside the verdict: E(16) alone, gate or no gate (failed runs say nothing)."""
    if r["failed"]:
        return "failed"
    e = next(x for x in r["excess"] if x["k"] == PRIMARY_K)["excess"]
    return "collapsed" if e["lo"] > E_MIN else "not collapsed"


# ----------------------------------------------------------------------------------------------
# 3. T_forget per (d_state, seed) and the exponent
# ----------------------------------------------------------------------------------------------

def t_forget_rows(cfg: TForgetConfig, results: dict[str, dict]) -> list[dict]:
    """One row per (d_state, seed): N_S, the verdict at each T_train, the T_forget interval."""
    rows = []
    for n in cfg.d_states:
        for s in cfg.seeds:
            pts = {p.coords["t_train"]: results[p.key] for p in grid(cfg)
                   if p.coords["d_state"] == n and p.coords["seed"] == s}
            verdicts = {t: verdict(r) for t, r in pts.items()}
            lo, hi, out_of_order = SCL.verdict_interval(verdicts)
            ungated = {t: ungated_verdict(r) for t, r in pts.items()}
            lo_u, hi_u, _ = SCL.verdict_interval(ungated)
            pre = [t for t in pts if t in PREREGISTERED_LENS] or list(pts)  # the pre-registered grid's points
            lo_p, hi_p, _ = SCL.verdict_interval({t: verdicts[t] for t in pre})
            lo_pu, hi_pu, _ = SCL.verdict_interval({t: ungated[t] for t in pre})
            sizes = [r["state_size"] for r in pts.values() if r.get("state_size")]
            rows.append({"d_state": n, "seed": s, "state_size": sizes[0] if sizes else state_size_of(cfg, n),
                         "verdicts": {str(t): v for t, v in verdicts.items()}, "t_forget": [lo, hi],
                         "t_forget_ungated": [lo_u, hi_u], "t_forget_prereg": [lo_p, hi_p],
                         "t_forget_prereg_ungated": [lo_pu, hi_pu],
                         "out_of_order": out_of_order,
                         "e16": {str(t): excess_at(r) for t, r in pts.items()},
                         "gate": {str(t): r.get("gate") for t, r in pts.items()}})
    return rows


def state_size_of(cfg: TForgetConfig, n: int) -> int:
    """N_S of the grid's model at d_state n (for rows whose every run failed)."""
    return M.state_size(Mamba2Config(d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=n, headdim=cfg.headdim,
                                     vocab_size=256))


def excess_at(r: dict) -> dict | None:
    """E(PRIMARY_K) of one point as {mean, lo, hi}, or None for a failed run."""
    if r.get("failed"):
        return None
    return next(x for x in r["excess"] if x["k"] == PRIMARY_K)["excess"]


def fit(cfg: TForgetConfig, rows: list[dict], key: str = "t_forget", lens: tuple[int, ...] | None = None) -> dict:
    """The censored fit of log2 T_forget on log2 N_S over every (d_state, seed) whose interval says
    something, and what it rests on. key: "t_forget" (the verdicts) or "t_forget_ungated" (E(16) alone)."""
    known = [r for r in rows if not (r[key][0] == 0 and math.isinf(r[key][1]))]  # (0, inf) says nothing
    out = {"n_points": len(known), "n_uninformative": len(rows) - len(known),
           "n_uncensored": sum(0 < r[key][0] and math.isfinite(r[key][1]) for r in known)}
    try:
        f = SCL.fit_intervals([r["state_size"] for r in known], [tuple(r[key]) for r in known],
                              [t for t in cfg.train_lens if lens is None or t in lens])
    except ValueError as e:
        return {**out, "error": str(e)}
    return {**out, "slope": f.slope, "slope_ci": list(f.slope_ci), "intercept": f.intercept, "sigma": f.sigma,
            "n_left_censored": f.n_left_censored, "n_right_censored": f.n_right_censored,
            "slope_bounded": f.slope_bounded}


def median_interval(rows: list[dict]) -> list[float]:
    """Per d_state: the median of the interval ends over seeds (grid values; inf where censored)."""
    return [float(np.median([r["t_forget"][0] for r in rows])), float(np.median([r["t_forget"][1] for r in rows]))]


# ----------------------------------------------------------------------------------------------
# 4. Report and figure
# ----------------------------------------------------------------------------------------------

def fmt_interval(iv: list[float]) -> str:
    lo, hi = iv
    if lo == 0 and math.isinf(hi):
        return "unknown"
    if lo == 0:
        return f"<= {hi:g}"
    if math.isinf(hi):
        return f"> {lo:g}"
    return f"({lo:g}, {hi:g}]"


def summary_markdown(cfg: TForgetConfig, rows: list[dict], fitted: dict, record: dict) -> str:
    n_seeds = len(cfg.seeds)
    extra = not set(cfg.train_lens) <= set(PREREGISTERED_LENS)  # a second column: the pre-registered grid alone
    extra_head = f" (T <= {max(PREREGISTERED_LENS)}, pre-registered) | T_forget (whole grid)" if extra else ""
    lines = ["# T_forget against state size (experiments/t_forget.py)", "",
             f"commit(s) {', '.join(run_commits(record)) or 'unknown'}; prereg {record.get('prereg_commit')}; "
             f"GATE {GATE}, E_MIN {E_MIN} nats/byte on E({PRIMARY_K}); seeds {list(cfg.seeds)}; "
             f"{cfg.steps} steps x {cfg.tokens_per_step} bytes", "",
             "| d_state | N_S | seed | " + " | ".join(f"T {t}" for t in cfg.train_lens)
             + f" | T_forget{extra_head} | paper's T_forget |", "|" + "---|" * (len(cfg.train_lens) + 5 + bool(extra))]
    short = {"collapsed": "C", "not collapsed": "F", "gate-failed": "g", "failed": "x"}
    for r in rows:
        cells = []
        for t in cfg.train_lens:
            e = r["e16"][str(t)]
            cells.append(short[r["verdicts"][str(t)]] + (f" {e['value']:+.3f}" if e else "")
                         + (f" g{r['gate'][str(t)]:.2f}" if r["gate"][str(t)] is not None else ""))
        lines.append(f"| {r['d_state']} | {r['state_size']} | {r['seed']} | " + " | ".join(cells)
                     + (f" | {fmt_interval(r['t_forget_prereg'])}" if extra else "")
                     + f" | {fmt_interval(r['t_forget'])}"
                     + (f" ({r['out_of_order']} out of order)" if r["out_of_order"] else "")
                     + f" | {SCL.paper_prediction(r['state_size']):.0f} |")
    lines += ["", "C collapsed, F forgets (not collapsed), g gate-failed, x failed; the number is E(16) "
              "(nats/byte), then the gate's value.", ""]
    for n in cfg.d_states:
        sub = [r for r in rows if r["d_state"] == n]
        lines.append(f"- d_state {n} (N_S {sub[0]['state_size']}): T_forget per seed "
                     f"{', '.join(fmt_interval(r['t_forget']) for r in sub)}; median interval "
                     f"{fmt_interval(median_interval(sub))}; {sum(r['verdicts'][str(t)] == 'gate-failed' for r in sub for t in cfg.train_lens)}"
                     f" of {n_seeds * len(cfg.train_lens)} models gate-failed")
    for name, f in fitted.items():
        if "error" in f:
            lines.append(f"- exponent ({name}): no fit ({f['error']}; {f['n_uninformative']} uninformative)")
            continue
        lo, hi = f["slope_ci"]
        lines.append(f"- exponent b of T_forget ~ N_S^b ({name}): {f['slope']:.2f} [{lo:.2f}, {hi:.2f}] (95% profile "
                     f"likelihood; {f['n_points']} (state, seed) intervals, {f['n_left_censored']} left- and "
                     f"{f['n_right_censored']} right-censored, {f['n_uninformative']} uninformative left out); "
                     "the paper's b = 1")
    lines.append("- T_forget without the gate (E(16) alone) per (d_state, seed): "
                 + "; ".join(f"{r['d_state']}/{r['seed']} {fmt_interval(r['t_forget_ungated'])}" for r in rows))
    if not set(cfg.train_lens) <= set(PREREGISTERED_LENS):
        lines.append(f"- on the pre-registered grid alone (T {', '.join(map(str, PREREGISTERED_LENS))}), per (d_state, "
                     "seed), gated / ungated: " + "; ".join(
                         f"{r['d_state']}/{r['seed']} {fmt_interval(r['t_forget_prereg'])} / "
                         f"{fmt_interval(r['t_forget_prereg_ungated'])}" for r in rows))
    return "\n".join(lines) + "\n"


def report(cfg: TForgetConfig, results: dict[str, dict], out: Path, record: dict) -> dict:
    rows = t_forget_rows(cfg, results)
    fitted = {"gated": fit(cfg, rows), "ungated": fit(cfg, rows, "t_forget_ungated")}
    if not set(cfg.train_lens) <= set(PREREGISTERED_LENS):  # the run went beyond the pre-registered grid
        fitted = {"gated, pre-registered grid": fit(cfg, rows, "t_forget_prereg", PREREGISTERED_LENS),
                  "ungated, pre-registered grid": fit(cfg, rows, "t_forget_prereg_ungated", PREREGISTERED_LENS),
                  "gated, whole grid": fitted["gated"], "ungated, whole grid": fitted["ungated"]}
    summary = {"commits": run_commits(record), "prereg_commit": record.get("prereg_commit"),
               "constants": {"GATE": GATE, "E_MIN": E_MIN, "PRIMARY_K": PRIMARY_K}, "rows": rows, "fit": fitted}
    atomic_write_json(out / "t_forget_summary.json", summary)
    text = summary_markdown(cfg, rows, fitted, record)
    atomic_write_text(out / "t_forget_summary.md", text)
    print(text)
    plot(cfg, results, rows, fitted, out)
    return summary


def plot(cfg: TForgetConfig, results: dict[str, dict], rows: list[dict], fitted: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]  # E(16) against T_train per d_state, every seed
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(cfg.d_states):
        for r in (r for r in rows if r["d_state"] == n):
            ts = [t for t in cfg.train_lens if r["e16"][str(t)]]
            ax.plot(ts, [r["e16"][str(t)]["value"] for t in ts], "o-", color=colors[i % len(colors)], alpha=0.7,
                    label=f"d_state {n} (N_S {r['state_size']})" if r["seed"] == cfg.seeds[0] else None)
            for t in ts:
                if r["verdicts"][str(t)] == "gate-failed":
                    ax.plot(t, r["e16"][str(t)]["value"], "x", color="k")
    ax.axhline(E_MIN, color="gray", ls="--", lw=1, label=f"E_MIN {E_MIN}")
    ax.set(xscale="log", xlabel="T_train (bytes)", ylabel=f"E({PRIMARY_K}) (nats/byte)",
           title="E(16): full state minus a window of T_train (x: gate-failed)")
    ax.title.set_fontsize(10)
    ax.set_xticks(cfg.train_lens, [str(t) for t in cfg.train_lens])
    ax.legend(fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax = axes[1]  # T_forget intervals against N_S (the primary reading), its fit, the paper's line
    extra = not set(cfg.train_lens) <= set(PREREGISTERED_LENS)
    key, lens = ("t_forget_prereg", PREREGISTERED_LENS) if extra else ("t_forget", cfg.train_lens)
    top = max(t for t in cfg.train_lens if t in lens)
    for r in rows:
        lo, hi = r[key]
        if lo == 0 and math.isinf(hi):
            continue  # uninformative: no bar
        x = r["state_size"] * (1 + 0.04 * (r["seed"] - np.mean(cfg.seeds)))
        lo_p, hi_p = max(lo, cfg.train_lens[0] / 2), min(hi, top * 2)  # censored ends drawn to the frame
        ax.plot([x, x], [lo_p, hi_p], "-", color=colors[cfg.d_states.index(r["d_state"]) % len(colors)], lw=3)
    ns = np.geomspace(min(r["state_size"] for r in rows) / 1.5, max(r["state_size"] for r in rows) * 1.5, 50)
    ax.plot(ns, [SCL.paper_prediction(v) for v in ns], "k--", lw=1, label="Stuffed Mamba: 5.172 tokens per 1K (b = 1)")
    names = list(fitted)
    for name, style in ((names[0], "r-"), (names[-1], "r:")):  # the primary reading; the last, most inclusive one
        f = fitted[name]
        if "slope" in f:
            ax.plot(ns, 2 ** f["intercept"] * ns ** f["slope"], style, lw=1,
                    label=f"fit ({name}): b = {f['slope']:.2f} [{f['slope_ci'][0]:.2f}, {f['slope_ci'][1]:.2f}]")
        if len(names) == 1:
            break
    for t in lens:
        ax.axhline(t, color="gray", lw=0.5, alpha=0.5)
    ax.set(xscale="log", yscale="log", xlabel="N_S (state elements)", ylabel="T_forget (bytes)",
           ylim=(cfg.train_lens[0] / 2.5, top * 2.5),
           title=f"T_forget per (d_state, seed), {names[0]}")
    ax.title.set_fontsize(10)
    sizes = sorted({r["state_size"] for r in rows})
    ax.set_xticks(sizes, [f"{v:,}" for v in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "t_forget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figure of a finished run folder or committed results folder (no training)."""
    cfg, results, out = finished_run(run_dir, out, TForgetConfig, grid)
    return report(cfg, results, out, run_record(Path(run_dir)))


# ----------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------
RESULTS = REPO / "experiments" / "results" / "t_forget"


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(TForgetConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the summary and figure from out_dir's points (no training)")
    add_flag(p, "publish", str, "", "publish this finished run folder into experiments/results/t_forget/")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.publish:
        publish_run(args.publish, RESULTS, "t_forget", TForgetConfig, grid, replot, figures=("t_forget.png",))
        print(f"published into {RESULTS}", file=sys.stderr)
        return
    cfg = config_from_args(TForgetConfig, args, QUICK)
    if args.replot:
        replot(cfg.out_dir)
        return
    t0 = time.perf_counter()
    results = run_sweep(cfg, grid(cfg), run_point, "t_forget", prereg_commit=prereg_commit())
    report(cfg, results, Path(cfg.out_dir), run_record(Path(cfg.out_dir)))
    print(f"wrote {cfg.out_dir}/ in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
