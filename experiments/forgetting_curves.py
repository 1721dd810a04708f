"""Forgetting curves of small Mamba-2 models and a tiny Transformer trained on the same bytes, per seed.

The question: do small Mamba-2 models show ZERO fine-grained memory, as the forgetting-curve
paper found for large RNNs (Mamba-2.8B, RWKV, GLA), while Transformers copy perfectly up to a length?

Commands (run from the repository root)
    # CPU-sized: 2 Mamba-2 state sizes + the Transformer, T_train = 64, 3 seeds (about 9 min per seed on a
    # busy 2-core box; the 3000 training steps per model dominate)
    python -m experiments.forgetting_curves --quick --seeds 0,1,2
    # rerun after a kill: finished (model, seed) points are reused, a half-measured curve resumes
    python -m experiments.forgetting_curves --quick --seeds 0,1,2
    # redraw the figures and the summary of a finished run folder (seconds, no training)
    python -m experiments.forgetting_curves --quick --replot
    # a language model trained on stdlib text only, its curve on held-out text to L = 64K (what the
    # former forgetting_curve_demo.py made; about 10 min of training per seed on one CPU thread)
    python -m experiments.forgetting_curves --task lm --states 64x16 --train_lens 256 --transformer false \
        --modes text --mitigations none --steps 600 --tokens_per_step 4096 --lr 3e-3 \
        --lengths 8,16,32,64,128,256,512,1024,2048,4096,8192,16384,65536 --out_dir runs/fcurves_lm
    # the default sweep (more state sizes and training lengths; meant for a GPU or a long CPU run)
    python -m experiments.forgetting_curves --seeds 0,1,2
    # one curve of any checkpoint: the evaluator's own command line
    python -m experiments.measure_curve --checkpoint DIR --lengths 16,64,256 --out_dir runs/fc

Papers
    Forgetting Curve (arXiv 2410.04727): copy vs LM accuracy over dependency lengths L;
        fine-grained memory = copy accuracy >= 99%, coarse-grained = copy clearly above LM.
    Stuffed Mamba (arXiv 2410.07145): the training-free mitigations (RRI, sliding window) applied
        to the same models, to see what they do to memory.

Protocol (numbered as the code below)
    1. Train one Mamba-2 per (state size, T_train, seed) and one TinyTransformer per (T_train, seed)
       on the SAME rows (a pure function of (seed, step)) with experiments/train.py (same optimizer,
       schedule and loss; each architecture its own peak lr):
       --task copymix (default): even rows stdlib text, odd rows back-to-back copy episodes in the
           forgetting-curve layout [SEP] x [SEP] x, loss on the second x only (data.copymix_batch
           says why: a toy model trained on text alone learns no copying, which would make "zero
           fine-grained memory" say nothing).
       --task mix: train.py's "mix" task (fixed 8-byte episodes).
       --task lm: the corpus only (a plain language model).
    2. For every model (Mamba: every mitigation) and both data modes - random bytes and held-out
       stdlib text - measure the forgetting curve with experiments.measure_curve (resumable; n samples
       per L, BOS = the corpus' document separator byte, the state carried across chunks for Mamba).
    3. Read the fine- and coarse-grained memory lengths of each curve with forgetting_curve.py's rules
       (ForgettingCurve.summary: per-length pass / inconclusive / fail verdicts), per seed; over
       seeds their mean and 95% t interval; one figure per data mode.

Glossary
    L  dependency length (tokens in the copied span x)     n  samples per L
    T  T_train, the training length                         N_S  Mamba-2 state size (mitigations.state_size)

Outputs (run folder, default runs/fcurves[_quick]/)
    config.json, points/*.json (one per (model, seed): its training facts and every curve's per-sample
    accuracies), models/<point>/ (train.py runs), curves/<point>_<mitigation>_<mode>.json
    (forgetting_curve JSON; a killed measurement resumes from it), fcurves_summary.json,
    fcurves_summary.md, fcurves_random.png, fcurves_text.png
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import forgetting_curve as fc
import mitigations as M

from experiments.common import add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag
from experiments.data import DOC_SEP, VOCAB_SIZE, Corpus
from experiments.collapse_v1 import MitigationSettings, load_for_eval, mitigation_context
from experiments.measure_curve import measure_curve
from experiments.sweep import (Point, check_seeds_and_workers, final_train_loss, finished_run, fmt_ci, grid_points,
                               mean_ci, parse_states, point_key, point_train_config, recipe, run_sweep,
                               train_point_model, workers_flag)
from experiments.tiny_transformer import TinyTransformer

MODES = ("random", "text")
TASKS = ("copymix", "mix", "lm")
MITIGATIONS = ("none", "rri", "sliding_window")
FIGURE_PREFIX = "fcurves"


@dataclass(frozen=True)
class FCurvesConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    out_dir: str = flag("runs/fcurves", "run folder")
    # --- models ---
    d_model: int = flag(64, "d, residual width (channels), for Mamba-2 and the Transformer")
    n_layer: int = flag(2, "blocks, for Mamba-2 and the Transformer")
    states: tuple[str, ...] = flag(("32x16", "64x16", "128x32", "256x32"), "Mamba-2 per-head states d_state x headdim")
    transformer: bool = flag(True, "also train the TinyTransformer baseline")
    n_head: int = flag(2, "Transformer heads; head size d_model / n_head (see tf_lr)")
    # --- training (identical rows for every model of a T_train and seed) ---
    train_lens: tuple[int, ...] = flag((32, 64, 128), "T_train values (tokens)")
    seeds: tuple[int, ...] = flag((0,), "seeds of the models and their rows (and of the curves' samples)")
    task: str = flag("copymix", "copymix | mix | lm (see the protocol above)")
    copy_len: int = flag(8, "random bytes per copy episode of --task mix")
    tokens_per_step: int = flag(1024, "tokens per optimizer step; rows = tokens_per_step / T_train")
    steps: int = flag(3000, "optimizer steps per model")
    lr: float = flag(3e-3, "Mamba-2's peak learning rate")
    # The Transformer's own peak learning rate. Same rows, same optimizer and schedule, but not the
    # same lr: at Mamba's 1e-2 (and at 3e-3 with 8 rows per step) the Transformer never left the
    # plateau that precedes induction heads (README, forgetting curves); each model gets its own.
    tf_lr: float = flag(1e-3, "the Transformer's peak learning rate")
    # --- forgetting curve ---
    lengths: tuple[int, ...] = flag((2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), "dependency lengths L (tokens)")
    n_samples: int = flag(10, "samples per L (paper: 10)")
    modes: tuple[str, ...] = flag(MODES, "data of the spans: random bytes and/or held-out stdlib text")
    mitigations: tuple[str, ...] = flag(MITIGATIONS, "applied to the Mamba-2 models (none = as trained)")
    rri_horizon: float = flag(4.0, "RRI lambda_a = 1 - 1 / (rri_horizon * T_train) ([SC] rule of thumb)")
    rri_lambda_b: float = flag(0.75, "RRI insertion scale lambda_B ([SC] 370M value)")
    window_mult: int = flag(1, "sliding window r = window_mult * T_train tokens")
    tf_max_len: int = flag(2048, "largest L for the Transformer (full attention is O(L^2))")
    chunk_size: int = flag(1024, "tokens per Mamba-2 call during the curves, state carried")
    # --- machine ---
    device: str = flag("cpu", "cpu | cuda | auto")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values")

    def __post_init__(self):
        parse_states(self.states)
        for name, allowed in (("modes", MODES), ("mitigations", MITIGATIONS)):
            bad = [m for m in getattr(self, name) if m not in allowed]
            if bad:
                raise ValueError(f"--{name}: unknown {bad}; choose from {allowed}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.n_samples < 5:
            raise ValueError(f"--n_samples must be >= 5 (the paired test cannot reach p < 0.05 below), "
                             f"got {self.n_samples}")
        check_seeds_and_workers(self)


# 16 rows of 64 tokens per step: with 8 rows (half of them copy rows) the Transformer had too few
# copy targets per step to form induction heads within 3000 steps.
QUICK = dict(out_dir="runs/fcurves_quick", states=("32x16", "256x32"), train_lens=(64,), tokens_per_step=1024,
             steps=3000, lr=1e-2, lengths=(2, 4, 8, 16, 32, 64, 128, 256, 512), tf_max_len=512)
DESCRIPTION = "Forgetting curves of Mamba-2 and a Transformer, per seed (see the module docstring)."


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(FCurvesConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the figures and the summary from out_dir's points (no training)")
    return p


# ----------------------------------------------------------------------------------------------
# 1. Models
# ----------------------------------------------------------------------------------------------

def model_specs(cfg: FCurvesConfig) -> list[dict]:
    """One dict per model to train (without its seed): kind, T_train and sizes."""
    specs = []
    for t in cfg.train_lens:
        specs += [{"kind": "mamba2", "t_train": t, "d_state": n, "headdim": p} for n, p in parse_states(cfg.states)]
        if cfg.transformer:
            specs.append({"kind": "transformer", "t_train": t, "n_head": cfg.n_head})
    return specs


def model_label(spec: dict) -> str:
    if spec["kind"] == "mamba2":
        return f"Mamba-2 n={spec['d_state']} p={spec['headdim']} T={spec['t_train']}"
    return f"Transformer T={spec['t_train']}"


def train_config(cfg: FCurvesConfig, point: Point):
    """Step 1's train.py config of one (model, seed)."""
    c = point.coords
    model = (dict(arch="mamba2", d_state=c["d_state"], headdim=c["headdim"], lr=cfg.lr) if c["kind"] == "mamba2"
             else dict(arch="transformer", n_head=c["n_head"], lr=cfg.tf_lr))
    return point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=c["t_train"],
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=c["seed"], device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, task=cfg.task, copy_len=cfg.copy_len, **model)


# ----------------------------------------------------------------------------------------------
# 2. One (model, seed): train, then every curve
# ----------------------------------------------------------------------------------------------

def run_point(cfg: FCurvesConfig, point: Point) -> dict:
    """Steps 1-2 for one (model, seed). Returns the model's facts and each curve's accuracies."""
    c = point.coords
    tcfg = train_config(cfg, point)
    t0 = time.perf_counter()
    model_dir = train_point_model(tcfg)
    mamba = c["kind"] == "mamba2"
    model = load_for_eval(model_dir, cfg.device) if mamba else TinyTransformer.from_pretrained(model_dir)
    result = {"n_params": sum(q.numel() for q in model.parameters()),
              "state_size": M.state_size(model.config) if mamba else None,
              "final_loss": final_train_loss(tcfg.out_dir), "train_seconds": time.perf_counter() - t0, "curves": {}}
    heldout = torch.from_numpy(Corpus.load().heldout.astype(np.int64))  # (N,) held-out bytes
    lengths = [L for L in cfg.lengths if mamba or L <= cfg.tf_max_len]
    settings = MitigationSettings(rri_horizon=cfg.rri_horizon, rri_lambda_b=cfg.rri_lambda_b,
                                  window_mult=cfg.window_mult)
    for mit in (cfg.mitigations if mamba else ("none",)):
        for mode in cfg.modes:
            desc, ctx = mitigation_context(mit, model, c["t_train"], settings)
            with ctx:
                curve = measure_curve(model, lengths=lengths, tokens=heldout if mode == "text" else None,
                                      vocab_size=VOCAB_SIZE, n_samples=cfg.n_samples, bos_id=DOC_SEP,
                                      eos_id=DOC_SEP, seed=c["seed"], batch_size=2 * cfg.n_samples,
                                      chunk_size=cfg.chunk_size if mamba else None,
                                      out=Path(cfg.out_dir) / "curves" / f"{point.key}_{mit}_{mode}.json",
                                      resume=True, progress=False,
                                      meta={"model": model_label(c), "mitigation": desc, "mode": mode})
            result["curves"][f"{mit}|{mode}"] = {"mitigation": desc, "lengths": curve.lengths.tolist(),
                                                 "copy_acc": curve.copy_acc.tolist(), "lm_acc": curve.lm_acc.tolist(),
                                                 "errors": {str(k): v for k, v in curve.errors.items()}}
    return result


def fcurve_points(cfg: FCurvesConfig) -> list[Point]:
    return grid_points(model_specs(cfg), cfg.seeds, recipe(cfg, grid_fields=("states", "train_lens", "transformer")))


# ----------------------------------------------------------------------------------------------
# 3. Memory lengths per seed and over seeds; figures
# ----------------------------------------------------------------------------------------------

def read_curve(stored: dict) -> dict:
    """forgetting_curve.py's reading of one stored curve: its summary (memory lengths and per-length
    verdicts, by the rules of the forgetting_curve.py at hand) and the mean accuracies."""
    curve = fc.ForgettingCurve(lengths=stored["lengths"], copy_acc=stored["copy_acc"], lm_acc=stored["lm_acc"],
                               errors=stored.get("errors", {}))
    return {**curve.summary(), "copy_mean": curve.copy_acc.mean(1).tolist(), "lm_mean": curve.lm_acc.mean(1).tolist()}


def summarize(cfg: FCurvesConfig, results: dict[str, dict]) -> dict:
    """Per model: per seed its facts and each curve's memory lengths; over seeds the fine and coarse
    lengths' mean and 95% interval per (mitigation, mode)."""
    models = []
    for spec in model_specs(cfg):
        per_seed = {str(s): results[point_key(**spec, seed=s)] for s in cfg.seeds}
        curves = {}
        for name in next(iter(per_seed.values()))["curves"]:
            reads = {s: read_curve(r["curves"][name]) for s, r in per_seed.items()}
            curves[name] = {"mitigation": next(iter(per_seed.values()))["curves"][name]["mitigation"],
                            "per_seed": reads,
                            "fine": mean_ci(v["fine_grained_length"] for v in reads.values()),
                            "coarse": mean_ci(v["coarse_grained_length"] for v in reads.values()
                                              if v["coarse_grained_length"] is not None)}
        models.append({**spec, "label": model_label(spec), "curves": curves,
                       "facts": {s: {k: r[k] for k in ("n_params", "state_size", "final_loss")}
                                 for s, r in per_seed.items()}})
    return {"seeds": list(cfg.seeds), "models": models}


def run(cfg: FCurvesConfig) -> dict:
    results = run_sweep(cfg, fcurve_points(cfg), run_point, "fcurves")
    return report(cfg, summarize(cfg, results), Path(cfg.out_dir))


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figures of a finished run folder (or a committed results folder), from its
    points alone. out: where to write them (default: run_dir)."""
    cfg, results, out = finished_run(run_dir, out, FCurvesConfig, fcurve_points)
    return report(cfg, summarize(cfg, results), out)


def report(cfg: FCurvesConfig, summary: dict, out: Path) -> dict:
    md = ["Memory lengths by forgetting_curve.py's rules (fine: copy >= 0.99; coarse: copy - LM >= 0.05 and "
          "significant), per seed, then the mean [95% t interval] over seeds.", "",
          "| model | params | N_S | train loss (mean over seeds) | mitigation | data | fine per seed | fine over seeds "
          "| coarse per seed | coarse over seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in summary["models"]:
        facts = list(m["facts"].values())
        for name, c in m["curves"].items():
            mit, mode = name.split("|")
            fine = ", ".join(str(v["fine_grained_length"]) for v in c["per_seed"].values())
            coarse = ", ".join(str(v["coarse_grained_length"]) for v in c["per_seed"].values())
            md.append(f"| {m['label']} | {facts[0]['n_params'] / 1e3:.0f}K | {facts[0]['state_size'] or '-'} | "
                      f"{np.mean([f['final_loss'] for f in facts]):.2f} | {mit} | {mode} | {fine} | "
                      f"{fmt_ci(c['fine'])} | {coarse} | {fmt_ci(c['coarse'])} |")
    text = "\n".join(md) + "\n"
    atomic_write_json(out / f"{FIGURE_PREFIX}_summary.json", summary)
    atomic_write_text(out / f"{FIGURE_PREFIX}_summary.md", text)
    print(text)
    plot(cfg, summary, out)
    return summary


def plot(cfg: FCurvesConfig, summary: dict, out: Path) -> list[Path]:
    """One figure per mode: a panel per model, copy (solid) and LM (dashed) per mitigation, the mean
    over seeds (thin: each seed's copy curve)."""
    paths = []
    colors = {"none": "C0", "rri": "C1", "sliding_window": "C2"}
    models = summary["models"]
    for mode in cfg.modes:
        fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), sharey=True, squeeze=False)
        for ax, m in zip(axes[0], models):
            for name, c in m["curves"].items():
                mit, curve_mode = name.split("|")
                if curve_mode != mode:
                    continue
                reads = list(c["per_seed"].values())
                lengths = reads[0]["lengths"]
                for r in reads:
                    ax.plot(r["lengths"], r["copy_mean"], color=colors[mit], lw=0.5, alpha=0.4)
                lab = "" if mit == "none" else f" +{mit}"
                ax.plot(lengths, np.mean([r["copy_mean"] for r in reads], 0), "-o", ms=3, color=colors[mit],
                        label=f"copy{lab} (fine {fmt_ci(c['fine'], 2)}, coarse {fmt_ci(c['coarse'], 2)})")
                ax.plot(lengths, np.mean([r["lm_mean"] for r in reads], 0), "--", color=colors[mit], alpha=0.6,
                        label=f"LM{lab}")
            ax.axvline(m["t_train"] / 2, color="gray", lw=0.8, ls=":")  # L = T/2: both copies fit in T
            ax.axhline(fc.DEFAULT_THRESHOLD, color="k", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("dependency length L (tokens)")
            ax.set_title(f"{m['label']}\n{next(iter(m['facts'].values()))['n_params'] / 1e3:.0f}K params", fontsize=9)
            ax.legend(fontsize=5, loc="upper right")
        axes[0][0].set_ylabel("accuracy (last half of the copy)")
        fig.suptitle(f"Forgetting curves, {mode} {'bytes' if mode == 'random' else 'held-out stdlib text'}, "
                     f"n={cfg.n_samples}/L, {len(summary['seeds'])} seed(s) (dotted: L = T_train/2; line: 0.99)",
                     fontsize=10)
        fig.tight_layout()
        p = out / f"{FIGURE_PREFIX}_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(FCurvesConfig, args, QUICK)
    replot(cfg.out_dir) if args.replot else run(cfg)
    print(f"[fcurves] run folder {cfg.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
