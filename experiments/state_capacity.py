"""State capacity at toy scale: the training length a Mamba-2 needs to learn to forget, vs state size.

Commands (run from the repository root)
    # CPU-sized: 2 state sizes x 2 training lengths x 3 seeds (about 10 minutes per point on a busy 2-core box)
    python -m experiments.state_capacity --quick --seeds 0,1,2
    # rerun after a kill: finished points are reused (and a killed training resumes from its checkpoint)
    python -m experiments.state_capacity --quick --seeds 0,1,2
    # redraw the figure and the summary of a finished run folder (seconds, no training)
    python -m experiments.state_capacity --quick --replot
    # widen a finished sweep: new points only are computed (same --out_dir)
    python -m experiments.state_capacity --quick --states 64x16,128x32,256x32,512x32 --train_lens 16,32,64
    # the default sweep (meant for a GPU or a long CPU run)
    python -m experiments.state_capacity --seeds 0,1,2,3,4

Paper
    Stuffed Mamba (arXiv 2410.07145), section "State capacity": for each state size, the smallest
    training length at which the model no longer collapses ("learns to forget"). Criterion: on long
    prompts, a model fails if the loss at any position beyond T_train exceeds 2x the maximum loss
    within the first T_train tokens. Finding: T_forget = 5.172 N_S - 4.469 (K tokens, M elements),
    R^2 > 0.999, i.e. about 5 tokens of training length per 1K state elements.

Protocol (numbered as the code below)
    1. For every state size (d_state x headdim, n_layer), training length T and seed, train a Mamba-2
       with experiments/train.py (the "mix" task: half stdlib text, half copy episodes - the regime
       where experiments/LOG.md found collapse at T_train = 16; the same number of tokens for every T).
    2. Per-position loss with the state carried (state_collapse.per_position_loss) on the demo's three
       probes (newline prompt, held-out text, a stream of copy episodes), to eval_length tokens; both
       criteria of state_collapse.py (the paper's 2x on maxima, our 1.5x on means) per probe. A point
       collapses under a criterion if it fires on any probe. A third rule reads the mechanism: the
       largest first-token retention over heads at t = RETENTION_AT x T_train on the newline prompt
       above RETENTION_LIMIT means the model did not learn to forget.
    3. Per (state, seed) and rule, T_forget = the shortest tested T after which no longer T
       collapses. Censored cases are kept as such: "> max T" (collapses at the longest tested T) and
       "<= min T" (never collapses). Over seeds: the mean and 95% t interval of the uncensored values,
       and how many seeds were censored.
    4. A least-squares line of T_forget against N_S over every uncensored (state, seed), with the
       slope's 95% t interval, next to the paper's slope (5.172 tokens per 1K state elements).

Outputs (run folder, default runs/capacity[_quick]/)
    config.json, points/*.json (one per (state, T, seed)), models/<point>/ (train.py runs),
    capacity_summary.json, capacity_summary.md, capacity.png

Glossary
    N_S  state size in elements, mitigations.state_size (SSM + conv state, [SC] Table 2's count)
    T    T_train;  n d_state;  p headdim;  l evaluation length
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import mitigations as M

from experiments.common import add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag
from experiments.data import Corpus, copy_batch, newline_probe
from experiments.collapse_v1 import CRITERIA, EVAL_SEED, EVAL_STEP, criteria, load_for_eval, per_position_loss, trace
from experiments.sweep import (PAPER_FORGET_INTERCEPT, PAPER_FORGET_SLOPE, Point, check_seeds_and_workers,
                               final_train_loss, finished_run, fmt_ci, grid_points, linear_fit, mean_ci, parse_states,
                               point_key, point_train_config, recipe, run_sweep, train_point_model, workers_flag)

PROBES = ("newline", "text")
FIGURE_NAME = "capacity.png"
SUMMARY_PREFIX = "capacity"


@dataclass(frozen=True)
class CapacityConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    out_dir: str = flag("runs/capacity", "run folder")
    d_model: int = flag(64, "d, residual width (channels)")
    layers: tuple[int, ...] = flag((2,), "n_layer values (part of the state size)")
    states: tuple[str, ...] = flag(("32x16", "64x16", "128x16", "256x16"), "per-head states d_state x headdim "
                                   "(headdim 16: 8 heads per layer at d_model 64, as the demo)")
    train_lens: tuple[int, ...] = flag((8, 16, 32, 64, 128), "T_train values searched (tokens)")
    seeds: tuple[int, ...] = flag((0, 1, 2), "training seeds, comma-separated; T_forget is reported per seed and over seeds")
    task: str = flag("mix", "train.py task (see LOG.md)")
    copy_len: int = flag(8, "random bytes per copy episode")
    tokens_per_step: int = flag(512, "tokens per optimizer step; rows = tokens_per_step / T_train")
    steps: int = flag(3000, "optimizer steps per model")
    lr: float = flag(3e-3, "peak learning rate (warmup + cosine, train.py)")
    eval_length: int = flag(4096, "tokens of each probe (the paper: 1M)")
    eval_prompts: int = flag(8, "held-out text windows averaged per position (the newline prompt is one)")
    chunk_len: int = flag(128, "tokens per forward call with the state carried (the official k = 128)")
    device: str = flag("cpu", "cpu | cuda | auto")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values")

    def __post_init__(self):
        parse_states(self.states)
        if not self.train_lens or any(t < 2 for t in self.train_lens):
            raise ValueError(f"--train_lens must be ints >= 2, got {self.train_lens}")
        if self.eval_length <= 2 * max(self.train_lens):
            raise ValueError(f"--eval_length {self.eval_length} must exceed 2 x the largest T_train "
                             f"({max(self.train_lens)}): the mean criterion reads [2T, l)")
        if any(self.tokens_per_step % t for t in self.train_lens):
            raise ValueError(f"--tokens_per_step {self.tokens_per_step} must be a multiple of every T_train "
                             f"{self.train_lens}")
        check_seeds_and_workers(self)


# The CPU demo: the regime where experiments/state_collapse.py --quick collapses (d_state 256 x headdim
# 32, mix task, 3000 steps of 512 tokens, T_train 16 vs 64) plus a 4x smaller state. With 1500 steps
# the same sizes did not meet 2x anywhere (newline ratio <= 1.02, text <= 1.74): see README.
QUICK = dict(out_dir="runs/capacity_quick", states=("64x16", "256x16"), train_lens=(16, 64), steps=3000,
             eval_length=1024, eval_prompts=8)
DESCRIPTION = "State capacity: T_forget vs state size, per seed (see the module docstring)."
# The retention rule (fixed 2026-12-02 before the capacity runs): a model has not learned to forget if some head
# still keeps more than RETENTION_LIMIT of the first token at t = RETENTION_AT x T_train on the newline prompt
# ([SC]: collapsing heads keep alpha_{1:t} near 1 far beyond T_train). Needs eval_length >= RETENTION_AT x T.
RETENTION_AT = 4  # k in t = k * T_train (a power of two: state_collapse records retention at 1, 2, 4, ... x T)
RETENTION_LIMIT = 0.5
RULES = (*CRITERIA, "retention")  # T_forget is read under each


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(CapacityConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the figure and the summary from out_dir's points (no training)")
    return p


# ----------------------------------------------------------------------------------------------
# 1-2. One point: train, then both criteria on each probe
# ----------------------------------------------------------------------------------------------

def run_point(cfg: CapacityConfig, point: Point) -> dict:
    c = point.coords
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=c["t_train"],
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=c["seed"], device=cfg.device,
                              d_model=cfg.d_model, n_layer=c["n_layer"], d_state=c["d_state"], headdim=c["headdim"],
                              lr=cfg.lr, task=cfg.task, copy_len=cfg.copy_len)
    t0 = time.perf_counter()
    model = load_for_eval(train_point_model(tcfg), cfg.device)
    t1 = time.perf_counter()
    probes = {"newline": newline_probe(cfg.eval_length),  # the demo's three probes (state_collapse.make_probes)
              "text": Corpus.load().heldout_windows(cfg.eval_prompts, cfg.eval_length),
              "copy": copy_batch(EVAL_STEP, seed=EVAL_SEED, batch_size=cfg.eval_prompts, seq_len=cfg.eval_length,
                                 copy_len=cfg.copy_len)}
    res = {"state_size": M.state_size(model.config), "n_params": sum(q.numel() for q in model.parameters()),
           "final_loss": final_train_loss(tcfg.out_dir), "train_seconds": t1 - t0, "probes": {}}
    for name, ids in probes.items():
        loss = per_position_loss(model, ids, cfg.chunk_len)  # (l,)
        res["probes"][name] = criteria(loss, c["t_train"])
    res["collapsed"] = {k: any(pr[k]["collapsed"] for pr in res["probes"].values()) for k in CRITERIA}
    # the mechanism as a third rule: the model still keeps the first token at t = RETENTION_AT x T_train
    res["retention_at"] = trace(model, probes["newline"][:, :-1], c["t_train"])["retention_at"]
    res["collapsed"]["retention"] = res["retention_at"][str(RETENTION_AT)] > RETENTION_LIMIT
    res["eval_seconds"] = time.perf_counter() - t1
    return res


def capacity_points(cfg: CapacityConfig) -> list[Point]:
    grid = [{"n_layer": L, "d_state": n, "headdim": p, "t_train": t}
            for L in cfg.layers for n, p in parse_states(cfg.states) for t in cfg.train_lens]
    return grid_points(grid, cfg.seeds, recipe(cfg, grid_fields=("layers", "states", "train_lens")))


# ----------------------------------------------------------------------------------------------
# 3-4. T_forget per seed, over seeds, and the fit
# ----------------------------------------------------------------------------------------------

def t_forget(collapsed: dict[int, bool]) -> dict:
    """The training length from which on the model no longer collapses: the tested T after the last
    one that collapses. {"value", "censored", "non_monotone"}: censored "above" = the longest T
    still collapses (value = max T, truth > it); "at_or_below" = none collapses (truth <= min T).
    non_monotone = some T below the last collapse did not collapse: at toy scale one seed can pass at
    T and fail at a longer T; reading the first pass as T_forget would then claim a model that
    collapses at a longer training length had learned to forget."""
    lens = sorted(collapsed)
    bad = [t for t in lens if collapsed[t]]
    if not bad:
        return {"value": lens[0], "censored": "at_or_below", "non_monotone": False}
    last = bad[-1]
    non_monotone = any(not collapsed[t] for t in lens if t < last)
    if last == lens[-1]:
        return {"value": last, "censored": "above", "non_monotone": non_monotone}
    return {"value": lens[lens.index(last) + 1], "censored": None, "non_monotone": non_monotone}


def fit_capacity(pairs: list[tuple[int, dict]]) -> dict:
    """Least-squares T_forget (tokens) against N_S (elements) over the uncensored (N_S, T_forget) pairs
    (one per state and seed), with the slope's 95% interval, in tokens per 1K elements."""
    pts = [(x, tf["value"]) for x, tf in pairs if tf["censored"] is None]
    if len({x for x, _ in pts}) < 2:
        return {"fit": None, "note": f"{len(pts)} uncensored (state, seed) pair(s) over {len({x for x, _ in pts})} "
                                     f"state size(s): no fit (needs >= 2 state sizes)"}
    f = linear_fit([x for x, _ in pts], [y for _, y in pts])
    per_k = {"slope": 1e3 * f.slope, "low": None if f.slope_low is None else 1e3 * f.slope_low,
             "high": None if f.slope_high is None else 1e3 * f.slope_high}
    note = "2 points: R^2 = 1 by construction, no interval" if f.n == 2 else ""
    if len({y for _, y in pts}) == 1:
        note = "every pair has the same T_forget: the grid of T_train is too coarse to see a slope"
    return {"fit": dataclasses.asdict(f), "tokens_per_K_elements": per_k,
            "paper_tokens_per_K_elements": PAPER_FORGET_SLOPE, "note": note}


def summarize(cfg: CapacityConfig, results: dict[str, dict]) -> dict:
    """Per state: the points per (T, seed), T_forget per seed and criterion, mean and interval over
    the uncensored seeds; per criterion: the fit."""
    states = []
    for L in cfg.layers:
        for n, p in parse_states(cfg.states):
            entry = {"n_layer": L, "d_state": n, "headdim": p, "per_seed": {}, "t_forget": {}}
            for s in cfg.seeds:
                pts = {t: results[point_key(n_layer=L, d_state=n, headdim=p, t_train=t, seed=s)]
                       for t in cfg.train_lens}
                entry["state_size"] = next(iter(pts.values()))["state_size"]
                entry["per_seed"][str(s)] = {"points": {str(t): r for t, r in pts.items()},
                                             "t_forget": {c: t_forget({t: r["collapsed"][c] for t, r in pts.items()})
                                                          for c in RULES}}
            for c in RULES:
                tfs = [v["t_forget"][c] for v in entry["per_seed"].values()]
                entry["t_forget"][c] = {**mean_ci(tf["value"] for tf in tfs if tf["censored"] is None),
                                        "censored_above": sum(tf["censored"] == "above" for tf in tfs),
                                        "censored_at_or_below": sum(tf["censored"] == "at_or_below" for tf in tfs),
                                        "non_monotone": sum(tf["non_monotone"] for tf in tfs)}
            states.append(entry)
    fits = {c: fit_capacity([(st["state_size"], v["t_forget"][c]) for st in states for v in st["per_seed"].values()])
            for c in RULES}
    return {"train_lens": list(cfg.train_lens), "seeds": list(cfg.seeds), "states": states, "fit": fits,
            "paper": {"slope_K_per_M": PAPER_FORGET_SLOPE, "intercept_K": PAPER_FORGET_INTERCEPT}}


def run(cfg: CapacityConfig) -> dict:
    results = run_sweep(cfg, capacity_points(cfg), run_point, "capacity")
    return report(cfg, summarize(cfg, results), Path(cfg.out_dir))


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figure of a finished run folder (or a committed results folder), from its
    points alone. out: where to write them (default: run_dir)."""
    cfg, results, out = finished_run(run_dir, out, CapacityConfig, capacity_points)
    return report(cfg, summarize(cfg, results), out)


def _fmt_tf(tf: dict) -> str:
    return {"above": f"> {tf['value']}", "at_or_below": f"<= {tf['value']}", None: str(tf["value"])}[tf["censored"]] \
        + ("*" if tf["non_monotone"] else "")


def report(cfg: CapacityConfig, summary: dict, out: Path) -> dict:
    lens = summary["train_lens"]
    md = ["Per state and seed: T_forget under the paper's criterion / the mean criterion (state_collapse.py) / the "
          f"retention rule (a head keeps > {RETENTION_LIMIT} of the first token at {RETENTION_AT} x T_train); "
          "'> T': fails at the longest tested T; '<= T': never fails; *: non-monotone. Over seeds: "
          "mean [95% t interval] of the uncensored seeds, then how many were censored (above / at or below).", "",
          "| n_layer | d_state x headdim | N_S | T_forget per seed (paper / mean / retention) | over seeds, paper | "
          "over seeds, mean | over seeds, retention |", "|---|---|---|---|---|---|---|"]
    for s in summary["states"]:
        per_seed = "; ".join(f"seed {k}: " + " / ".join(_fmt_tf(v["t_forget"][c]) for c in RULES)
                             for k, v in s["per_seed"].items())
        over = [f"{fmt_ci(s['t_forget'][c])}, censored {s['t_forget'][c]['censored_above']} / "
                f"{s['t_forget'][c]['censored_at_or_below']}" for c in RULES]
        md.append(f"| {s['n_layer']} | {s['d_state']}x{s['headdim']} | {s['state_size']} | {per_seed} | "
                  + " | ".join(over) + " |")
    for c in RULES:
        f = summary["fit"][c]
        if f["fit"] is None:
            md.append(f"\nFit ({c} criterion): {f['note']}.")
            continue
        k = f["tokens_per_K_elements"]
        ci = f" [{k['low']:.3g}, {k['high']:.3g}]" if k["low"] is not None else ""
        md.append(f"\nFit ({c} criterion): T_forget = {f['fit']['slope']:.4g} N_S + {f['fit']['intercept']:.4g} "
                  f"tokens: "
                  f"{k['slope']:.3g}{ci} tokens per 1K state elements (paper: {PAPER_FORGET_SLOPE}), "
                  f"R^2 = {f['fit']['r2']:.3f}, n = {f['fit']['n']} (state, seed) pairs. {f['note']}")
    text = "\n".join(md) + "\n"
    atomic_write_json(out / f"{SUMMARY_PREFIX}_summary.json", summary)
    atomic_write_text(out / f"{SUMMARY_PREFIX}_summary.md", text)
    print(text)
    plot(summary, lens, out)
    return summary


def plot(summary: dict, lens: list[int], out: Path) -> Path:
    """Left two panels: each criterion's ratio (worst probe) vs T_train, per state (thin: seeds; thick:
    mean). Right: T_forget vs N_S per seed (dots), mean over the uncensored seeds, the fits, the paper."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    limits = {"paper": 2.0, "mean": 1.5}
    for ax, c in zip(axes[:2], CRITERIA):
        for i, s in enumerate(summary["states"]):
            ratios = np.array([[max(pr[c]["ratio"] for pr in v["points"][str(t)]["probes"].values()) for t in lens]
                               for v in s["per_seed"].values()])  # (seeds, T)
            for r in ratios:
                ax.plot(lens, r, color=f"C{i}", lw=0.6, alpha=0.5)
            ax.plot(lens, ratios.mean(0), "-o", color=f"C{i}", ms=4,
                    label=f"L={s['n_layer']} n={s['d_state']} p={s['headdim']}")
        ax.axhline(limits[c], color="r", lw=1, label=f"collapse above {limits[c]}x")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T_train (tokens)")
        ax.set_ylabel("beyond / within (worst probe)")
        ax.set_title(f"{c} criterion ratio (thin: seeds)", fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[2]
    xs = np.array([s["state_size"] for s in summary["states"]], float)
    for j, c in enumerate(RULES):
        for s in summary["states"]:
            for v in s["per_seed"].values():
                tf = v["t_forget"][c]
                marker = {"above": "^", "at_or_below": "v", None: "o"}[tf["censored"]]
                ax.plot(s["state_size"] / 1e3 * (1 + 0.03 * (j - 1)), tf["value"], marker, color=f"C{j}", mfc="none",
                        ms=6, alpha=0.7)
            m = s["t_forget"][c]
            if m["mean"] is not None:
                ax.errorbar(s["state_size"] / 1e3, m["mean"], yerr=None if m["low"] is None else
                            [[m["mean"] - m["low"]], [m["high"] - m["mean"]]], fmt="s", color=f"C{j}", ms=7)
        f = summary["fit"][c]
        if f["fit"] is not None:
            grid = np.linspace(xs.min(), xs.max(), 50)
            ax.plot(grid / 1e3, f["fit"]["slope"] * grid + f["fit"]["intercept"], color=f"C{j}",
                    label=f"fit ({c}): {f['tokens_per_K_elements']['slope']:.3g} tok/K elem")
        else:
            ax.plot([], [], "s", color=f"C{j}", label=f"{c}: no fit")
    grid = np.linspace(0, xs.max() * 1.1, 50)
    ax.plot(grid / 1e3, PAPER_FORGET_SLOPE * 1e-3 * grid, "k:",
            label=f"paper's slope, {PAPER_FORGET_SLOPE} tok/K elem, through 0")
    ax.set_ylim(0, 1.5 * max(lens))
    ax.set_xlabel("state size N_S (K elements)")
    ax.set_ylabel("T_forget (tokens)")
    ax.set_title("T_forget vs N_S (hollow: seeds, ^ collapses at every T, v at none;\nsquares: mean of the "
                 "uncensored seeds with 95% interval)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    p = out / FIGURE_NAME
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(CapacityConfig, args, QUICK)
    replot(cfg.out_dir) if args.replot else run(cfg)
    print(f"[capacity] run folder {cfg.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
