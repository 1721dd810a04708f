"""Capacity that binds: the most key-value pairs a Mamba-2 recalls, against its state size.

Commands (run from the repository root)
    # the reported CPU run (PREREGISTRATION.md section 9): d_state 4, 16, 64, seeds 0-2, k up to 32 at T 128:
    # 9 models, 43 min on 2 cores shared with other runs
    python -m experiments.mqar_capacity --quick
    # redraw the summary and figure of a finished run folder (seconds, no training)
    python -m experiments.mqar_capacity --quick --replot
    # publish a finished run into experiments/results/mqar_capacity/ (refused from a dirty tree)
    python -m experiments.mqar_capacity --publish runs/mqar_capacity_quick
    # the GPU size (k up to 128 at T 1024; one H200, <= 10 minutes): experiments/capacity_gpu.py

Question
    Stuffed Mamba (arXiv 2410.07145) reads a state's capacity off passkey retrieval; one 5-digit key
    (about 17 bits) never strains a state of thousands of floats, so that readout measures decay, not
    capacity. Multi-query associative recall (MQAR; Zoology, arXiv 2312.04927) asks for k pairs at once:
    with k large enough any fixed state must fail. How many pairs k does a model recall at >= 95%, and
    does that number grow with the state size N_S when only d_state changes?

Protocol (frozen in PREREGISTRATION.md before any reported run)
    1. task: experiments/recall.py's rows of T bytes: k pairs, filler, the k keys queried again in a
       random order (each query at least the filler's length from its pair); the loss on the values only
    2. train one model per (d_state, seed) on a mixture of k in TRAIN_KS, an equal share of every batch's
       rows per k (experiments/train.py, the same token budget for every model)
    3. evaluate: value accuracy per k on EVAL rows (recall.accuracy_by_k: a stream no training run draws)
    4. readout: the largest k recalled (recall.largest_k_recalled: it and every smaller k at >= 95%);
       verdicts: failed (training raised) | never learned (k = 1 below 95%: the model did not learn the
       task, which says nothing about capacity) | capacity k* (the largest k recalled; k* = the largest
       k swept means "at least", right-censored)
    5. per d_state: per-seed k* and their median (grid values: no mean, no t interval); failed and
       never-learned seeds counted in N, never dropped

Reading order: 1 constants and config -> 2 batches -> 3 one point -> 4 report, figure -> 5 main

Glossary
    k  key-value pairs per row      k*  the largest k recalled      T  row length (inputs)
    n  d_state      N_S  state elements (mitigations.state_size)      k/N  k of N seeds
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
import torch

import mitigations as M

from experiments import measure as ME
from experiments import recall as RC
from experiments.common import REPO, add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag
from experiments.publish import prereg_commit, publish_run, run_commits, run_record
from experiments.sweep import (Point, check_seeds_and_workers, finished_run, grid_points, point_train_config,
                               recipe, run_sweep, train_point_model, workers_flag)

# ----------------------------------------------------------------------------------------------
# 1. Constants (PREREGISTRATION.md, section 9) and the config
# ----------------------------------------------------------------------------------------------
THRESHOLD = RC.RECALL_THRESHOLD  # 0.95: accuracy on the values that counts as "k recalled"
EVAL_ROWS = 128  # evaluation rows per k (recall.EVAL_SEED)


@dataclass(frozen=True)
class CapacityConfig:
    """One model per (d_state, seed). Each field is also a command-line flag."""

    out_dir: str = flag("runs/mqar_capacity", "run folder")
    # --- the models: only d_state changes ---
    d_model: int = flag(64, "d, residual width")
    n_layer: int = flag(2, "Mamba-2 blocks")
    headdim: int = flag(16, "p, channels per head")
    d_states: tuple[int, ...] = flag((4, 16, 64), "d_state grid (n; the only size that changes)")
    seeds: tuple[int, ...] = flag((0, 1, 2), "training seeds (PREREGISTRATION.md: 0-4 reported, 1000+ tuning)")
    # --- the task ---
    seq_len: int = flag(128, "T, inputs per row (pairs + filler + queries)")
    train_ks: tuple[int, ...] = flag((1, 2, 4, 8, 16, 32), "k values mixed in every training batch")
    eval_ks: tuple[int, ...] = flag((1, 2, 4, 8, 16, 32), "k values of the readout (must lie within train_ks' range)")
    tokens_per_step: int = flag(2048, "tokens per optimizer step")
    steps: int = flag(3000, "optimizer steps per model")
    lr: float = flag(1e-2, "peak learning rate")
    # --- machine ---
    device: str = flag("auto", "auto | cpu | cuda")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values (the reported CPU run)")

    def __post_init__(self):
        check_seeds_and_workers(self)
        if self.tokens_per_step % self.seq_len:
            raise ValueError(f"--seq_len {self.seq_len} must divide --tokens_per_step {self.tokens_per_step}")
        rows = self.tokens_per_step // self.seq_len
        if rows < len(self.train_ks):
            raise ValueError(f"{rows} rows per step cannot hold one row for each of the {len(self.train_ks)} "
                             f"train_ks; raise --tokens_per_step")
        for k in set(self.train_ks) | set(self.eval_ks):
            RC.MQARConfig(n_pairs=k, seq_len=self.seq_len)  # raises if a row cannot hold k pairs
        if sorted(self.eval_ks) != list(self.eval_ks) or max(self.eval_ks) > max(self.train_ks):
            raise ValueError(f"--eval_ks must increase and stay within the trained range (max {max(self.train_ks)}), "
                             f"got {self.eval_ks}")


QUICK = dict(out_dir="runs/mqar_capacity_quick", workers=2)  # the reported CPU run is the default grid
DESCRIPTION = "The largest k of multi-query associative recall against state size (module docstring)."


def grid(cfg: CapacityConfig) -> list[Point]:
    return grid_points([{"d_state": n} for n in cfg.d_states], cfg.seeds,
                       recipe(cfg, grid_fields=("d_states",)))


# ----------------------------------------------------------------------------------------------
# 2. Training batches: every k of train_ks in every batch
# ----------------------------------------------------------------------------------------------

class MixedKBatches:
    """batch(step) -> (rows (b, T + 1), value mask (b, T)): rows split as evenly as possible over
    train_ks (the first b mod |ks| k values get one row more); a pure function of (seed, step)."""

    def __init__(self, cfg: CapacityConfig, seed: int):
        self.ks, self.seed, self.T = cfg.train_ks, seed, cfg.seq_len
        self.b = cfg.tokens_per_step // cfg.seq_len

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        per, extra = divmod(self.b, len(self.ks))
        parts = [RC.mqar_batch(step, seed=self.seed, batch_size=per + (i < extra),
                               cfg=RC.MQARConfig(n_pairs=k, seq_len=self.T)) for i, k in enumerate(self.ks)]
        return torch.cat([t for t, _ in parts]), torch.cat([m for _, m in parts])


# ----------------------------------------------------------------------------------------------
# 3. One point
# ----------------------------------------------------------------------------------------------

def run_point(cfg: CapacityConfig, point: Point) -> dict:
    n, seed = point.coords["d_state"], point.coords["seed"]
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=cfg.seq_len,
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=seed, device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=n, headdim=cfg.headdim, lr=cfg.lr,
                              task="custom")
    tcfg = dataclasses.replace(tcfg, chunk_size=min(64, cfg.seq_len), eval_every=0)
    t0 = time.perf_counter()
    try:
        model = ME.load_for_eval(train_point_model(tcfg, MixedKBatches(cfg, seed)), cfg.device)
    except Exception as e:  # noqa: BLE001 - a failed run is counted, not dropped
        return {"failed": f"{type(e).__name__}: {e}", "train_s": time.perf_counter() - t0}
    train_s = time.perf_counter() - t0
    acc = RC.accuracy_by_k(model, cfg.eval_ks, seq_len=cfg.seq_len, n_rows=EVAL_ROWS)
    return {"failed": None, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s,
            "state_size": M.state_size(model.config), "accuracy": {str(k): v for k, v in acc.items()},
            "k_star": RC.largest_k_recalled(acc, THRESHOLD)}


def verdict(r: dict, cfg: CapacityConfig) -> str:
    """failed | never learned | k* = ... (at least, when every swept k is recalled)."""
    if r["failed"]:
        return "failed"
    if r["k_star"] == 0:
        return "never learned"
    return f"k* >= {r['k_star']}" if r["k_star"] == max(cfg.eval_ks) else f"k* = {r['k_star']}"


# ----------------------------------------------------------------------------------------------
# 4. Report and figure
# ----------------------------------------------------------------------------------------------

def rows_of(cfg: CapacityConfig, results: dict[str, dict]) -> list[dict]:
    return [{"d_state": p.coords["d_state"], "seed": p.coords["seed"], "state_size": results[p.key].get("state_size"),
             "verdict": verdict(results[p.key], cfg), "k_star": results[p.key].get("k_star"),
             "accuracy": results[p.key].get("accuracy")} for p in grid(cfg)]


def summary_markdown(cfg: CapacityConfig, rows: list[dict], record: dict) -> str:
    lines = ["# Capacity that binds: MQAR k* against state size (experiments/mqar_capacity.py)", "",
             f"commit(s) {', '.join(run_commits(record)) or 'unknown'}; prereg {record.get('prereg_commit')}; "
             f"T {cfg.seq_len}; trained on k in {list(cfg.train_ks)}; {cfg.steps} steps x {cfg.tokens_per_step} "
             f"bytes; threshold {THRESHOLD}; {EVAL_ROWS} rows per k", "",
             "| d_state | N_S | seed | " + " | ".join(f"k {k}" for k in cfg.eval_ks) + " | verdict |",
             "|" + "---|" * (len(cfg.eval_ks) + 4)]
    for r in rows:
        accs = [f"{r['accuracy'][str(k)]:.3f}" if r["accuracy"] else "-" for k in cfg.eval_ks]
        lines.append(f"| {r['d_state']} | {r['state_size']} | {r['seed']} | " + " | ".join(accs) + f" | {r['verdict']} |")
    lines.append("")
    for n in cfg.d_states:
        sub = [r for r in rows if r["d_state"] == n]
        ks = [r["k_star"] for r in sub if r["k_star"] is not None]
        lines.append(f"- d_state {n}: k* per seed {[r['k_star'] for r in sub]}; median {np.median(ks) if ks else 'none'}"
                     f"; never learned {sum(r['verdict'] == 'never learned' for r in sub)}/{len(sub)}, failed "
                     f"{sum(r['verdict'] == 'failed' for r in sub)}/{len(sub)}")
    return "\n".join(lines) + "\n"


def report(cfg: CapacityConfig, results: dict[str, dict], out: Path, record: dict) -> dict:
    rows = rows_of(cfg, results)
    summary = {"commits": run_commits(record), "prereg_commit": record.get("prereg_commit"),
               "constants": {"THRESHOLD": THRESHOLD, "EVAL_ROWS": EVAL_ROWS}, "rows": rows}
    atomic_write_json(out / "mqar_capacity_summary.json", summary)
    text = summary_markdown(cfg, rows, record)
    atomic_write_text(out / "mqar_capacity_summary.md", text)
    print(text)
    plot(cfg, rows, out)
    return summary


def plot(cfg: CapacityConfig, rows: list[dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(cfg.d_states):
        for r in (r for r in rows if r["d_state"] == n and r["accuracy"]):
            axes[0].plot(cfg.eval_ks, [r["accuracy"][str(k)] for k in cfg.eval_ks], "o-", color=colors[i % len(colors)],
                         alpha=0.7, label=f"d_state {n} (N_S {r['state_size']})" if r["seed"] == cfg.seeds[0] else None)
    axes[0].axhline(THRESHOLD, color="gray", ls="--", lw=1)
    axes[0].set(xscale="log", xlabel="k (pairs per row)", ylabel="value accuracy", title=f"recall at T {cfg.seq_len}, every seed")
    axes[0].set_xticks(cfg.eval_ks, [str(k) for k in cfg.eval_ks])
    axes[0].legend(fontsize=8)
    for i, n in enumerate(cfg.d_states):
        for r in (r for r in rows if r["d_state"] == n and r["k_star"] is not None):
            x = r["state_size"] * (1 + 0.05 * (r["seed"] - np.mean(cfg.seeds)))
            axes[1].plot(x, max(r["k_star"], 0.5), "^" if r["k_star"] == max(cfg.eval_ks) else "o",
                         color=colors[i % len(colors)])
    axes[1].set(xscale="log", yscale="log", xlabel="N_S (state elements)", ylabel="k* (largest k at >= 95%)",
                title="k* per seed (0 drawn at 0.5; ^: every swept k recalled)")
    fig.tight_layout()
    path = out / "mqar_capacity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    cfg, results, out = finished_run(run_dir, out, CapacityConfig, grid)
    return report(cfg, results, out, run_record(Path(run_dir)))


# ----------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------
RESULTS = REPO / "experiments" / "results" / "mqar_capacity"


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(CapacityConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the summary and figure from out_dir's points (no training)")
    add_flag(p, "publish", str, "", "publish this finished run folder into experiments/results/mqar_capacity/")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.publish:
        publish_run(args.publish, RESULTS, "mqar_capacity", CapacityConfig, grid, replot,
                    figures=("mqar_capacity.png",))
        print(f"published into {RESULTS}", file=sys.stderr)
        return
    cfg = config_from_args(CapacityConfig, args, QUICK)
    if args.replot:
        replot(cfg.out_dir)
        return
    t0 = time.perf_counter()
    results = run_sweep(cfg, grid(cfg), run_point, "mqar_capacity", prereg_commit=prereg_commit())
    report(cfg, results, Path(cfg.out_dir), run_record(Path(cfg.out_dir)))
    print(f"wrote {cfg.out_dir}/ in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
