"""Forgetting curves of small Mamba-2 models and a tiny Transformer trained on the same bytes.

The question (issue 6): do small Mamba-2 models show ZERO fine-grained memory, as the forgetting-curve
paper found for large RNNs (Mamba-2.8B, RWKV, GLA), while Transformers copy perfectly up to a length?

Commands (run from the repository root)
    # CPU-sized: 2 Mamba-2 state sizes + the Transformer, T_train = 64 (9 min measured on a busy shared
    # 2-core box, 1 thread; 3 x 3000 training steps dominate)
    python -m experiments.forgetting_curves --quick
    # the default sweep (more state sizes and training lengths; meant for a GPU or a long CPU run)
    python -m experiments.forgetting_curves
    # rerun after a kill: finished models and curves are reused, the rest is computed
    python -m experiments.forgetting_curves --quick

Papers
    Forgetting Curve (arXiv 2410.04727): copy vs LM accuracy over dependency lengths L;
        fine-grained memory = copy accuracy >= 99%, coarse-grained = copy clearly above LM.
    Stuffed Mamba (arXiv 2410.07145): the training-free mitigations (RRI, sliding window) applied
        to the same models, to see what they do to memory.

Protocol (numbered as the code below)
    1. Train one Mamba-2 per (state size, T_train) and one TinyTransformer per T_train on the SAME
       rows (a pure function of (seed, step)), with the same optimizer, schedule and loss:
       --task copymix (default): even rows stdlib text, odd rows back-to-back copy episodes in the
           forgetting-curve layout [SEP] x [SEP] x with random bytes and a span length drawn per
           episode, L ~ U{1..L_max}, L_max growing from COPY_CURRICULUM_START to T_train/2 - 1 over
           the first half of training (so both copies of an episode fit in T_train). SEP is the
           corpus' document separator, which the curves use as BOS. The loss counts every text
           target and, in copy rows, only the targets that can be predicted: the second x of each
           episode (the random first half and the separators are masked out, as the forgetting
           curve scores only the second x).
           Why: the paper measures base LMs whose copying skill comes from web-scale text; a toy
           model trained for minutes on stdlib text learns no copying at all (our first --quick run
           with --task mix: copy = LM = ~0 for every model, the Transformer included), which would
           make "zero fine-grained memory" say nothing. Training on variable-length copy episodes
           gives every model the skill inside T_train; the curve then shows how far it reaches.
       --task mix: the project's train.py "mix" task (fixed 8-byte episodes; Mamba via train.py).
    2. For every model, (Mamba: every mitigation), and both data modes - random bytes and held-out
       stdlib text - measure forgetting_curve.forgetting_curve (n samples per L, BOS = the corpus'
       document separator byte, the state carried across chunks for Mamba).
    3. Read the fine- and coarse-grained memory lengths with forgetting_curve.py's rules
       (fine: mean copy >= 0.99; coarse: copy - LM >= 0.05 and paired sign-flip p < 0.05, contiguous
       from the smallest L), write a table, one figure per data mode.

Outputs (run folder, default runs/fcurves[_quick]/)
    config.json, points/*.json (one finished model or curve each; a rerun skips them),
    models/<model>/ (train.py run or TinyTransformer.save), curves/<key>.json (forgetting_curve JSON),
    summary.csv, summary.md, fcurves_random.png, fcurves_text.png (also copied to figures/)
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import forgetting_curve as fc  # noqa: E402
from experiments.common import atomic_write_text  # noqa: E402
from experiments.sweep import (final_train_loss, mamba_train_config, parse_config,  # noqa: E402
                               parse_ints, parse_states, point_key, start_run, train_model, train_or_reuse_mamba, write_run_config)

MODES = ("random", "text")
TASKS = ("copymix", "mix")
COPY_CURRICULUM_START = 4  # longest copy span at step 0 of --task copymix (tokens)
COPYMIX_STREAM_ID = 3  # keeps the copymix episodes' random stream apart from data.py's streams
MITIGATIONS = ("none", "rri", "sliding_window")
FIGURE_PREFIX = "fcurves"


@dataclass(frozen=True)
class FCurvesConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    out_dir: str = "runs/fcurves"
    # --- models ---
    d_model: int = 64  # d, for Mamba-2 and the Transformer
    n_layer: int = 2
    states: str = "32x16,64x16,128x32,256x32"  # Mamba-2 per-head states, d_state x headdim
    transformer: bool = True  # also train the TinyTransformer baseline
    n_head: int = 2  # Transformer heads; head size d_model / n_head = 32 (see tf_lr)
    # --- training (identical rows for every model of a T_train) ---
    train_lens: str = "32,64,128"  # T_train values
    task: str = "copymix"  # copymix | mix (see the protocol above)
    copy_len: int = 8  # random bytes per copy episode
    tokens_per_step: int = 1024
    steps: int = 3000
    lr: float = 3e-3  # Mamba-2's peak learning rate
    # The Transformer's own peak learning rate. Same rows, same optimizer and schedule, but not the
    # same lr: at Mamba's 1e-2 (and at 3e-3 with 8 rows per step) the Transformer never left the
    # plateau that precedes induction heads (README, forgetting curves); each model gets its own.
    tf_lr: float = 1e-3
    seed: int = 0
    # --- forgetting curve ---
    lengths: str = "2,4,8,16,32,64,128,256,512,1024,2048"  # dependency lengths L
    n_samples: int = 10  # per L (paper: 10)
    modes: str = "random,text"
    mitigations: str = "none,rri,sliding_window"  # applied to the Mamba-2 models
    rri_horizon: float = 4.0  # RRI lambda_a = 1 - 1 / (rri_horizon * T_train)  ([SC] rule of thumb)
    rri_lambda_B: float = 0.75  # [SC] 370M value
    window_mult: int = 1  # sliding window r = window_mult * T_train
    tf_max_len: int = 2048  # largest L for the Transformer (full attention is O(L^2))
    chunk_size: int = 1024  # tokens per Mamba-2 call, state carried
    # --- machine ---
    device: str = "cpu"
    threads: int = 1  # torch.set_num_threads (the project's CPUs are shared)
    figures: bool = True  # copy the figures and summary to figures/
    quick: bool = False

    def __post_init__(self):
        parse_states(self.states), parse_ints(self.train_lens, "train_lens"), parse_ints(self.lengths, "lengths")
        for name, allowed in (("modes", MODES), ("mitigations", MITIGATIONS)):
            bad = [m for m in getattr(self, name).split(",") if m not in allowed]
            if bad:
                raise ValueError(f"--{name}: unknown {bad}; choose from {allowed}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.n_samples < 5:
            raise ValueError(f"--n_samples must be >= 5 (the paired test cannot reach p < 0.05 below), "
                             f"got {self.n_samples}")


# 16 rows of 64 tokens per step: with 8 rows (half of them copy rows) the Transformer had too few
# copy targets per step to form induction heads within 3000 steps.
QUICK = dict(out_dir="runs/fcurves_quick", states="32x16,256x32", train_lens="64", tokens_per_step=1024,
             steps=3000, lr=1e-2, lengths="2,4,8,16,32,64,128,256,512", tf_max_len=512)


# ----------------------------------------------------------------------------------------------
# 1. Models
# ----------------------------------------------------------------------------------------------

def model_specs(cfg: FCurvesConfig) -> list[dict]:
    """One dict per model to train: kind, T_train, sizes and its point key."""
    specs = []
    for t in parse_ints(cfg.train_lens, "train_lens"):
        for n, p in parse_states(cfg.states):
            specs.append({"kind": "mamba2", "t_train": t, "d_state": n, "headdim": p})
        if cfg.transformer:
            specs.append({"kind": "transformer", "t_train": t, "n_head": cfg.n_head})
    for s in specs:
        s["key"] = point_key(**{k: v for k, v in s.items()})
    return specs


def copymix_rows(corpus, *, step: int, steps: int, seed: int, batch_size: int,
                 t_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """--task copymix (rows (b, T+1), loss mask (b, T)): even rows corpus text (all targets in the
    loss), odd rows copy episodes [SEP] x [SEP] x ... (only the second x's targets in the loss).

    Span lengths L ~ U{1..L_max(step)}, L_max = COPY_CURRICULUM_START + (T/2 - 1 - start) * min(1, 2 step /
    steps) (capped at T/2 - 1), bytes of x uniform in 1..255 (never SEP). A pure function of (seed, step).
    """
    from experiments.data import DOC_SEP, VOCAB_SIZE
    rows = corpus.batch(step, seed=seed, batch_size=batch_size, seq_len=t_train)  # (b, T+1)
    top = max(1, t_train // 2 - 1)
    l_max = min(top, int(COPY_CURRICULUM_START + (top - COPY_CURRICULUM_START) * min(1.0, 2 * step / steps)))
    rng = np.random.default_rng([seed, step, COPYMIX_STREAM_ID])
    mask = torch.ones(batch_size, t_train, dtype=torch.bool)  # (b, T): target t+1 counted?
    for i in range(1, batch_size, 2):
        row: list[int] = []
        scored: list[bool] = []  # per token of the row: is it predictable (in a second x)?
        while len(row) < t_train + 1:
            L = int(rng.integers(1, max(1, l_max) + 1))
            x = rng.integers(1, VOCAB_SIZE, L).tolist()
            row += [DOC_SEP] + x + [DOC_SEP] + x
            scored += [False] * (L + 2) + [True] * L
        rows[i] = torch.tensor(row[:t_train + 1], dtype=torch.long)
        mask[i] = torch.tensor(scored[1:t_train + 1])
    return rows, mask


def model_label(spec: dict) -> str:
    if spec["kind"] == "mamba2":
        return f"Mamba-2 n={spec['d_state']} p={spec['headdim']} T={spec['t_train']}"
    return f"Transformer T={spec['t_train']}"


def peak_lr(cfg: FCurvesConfig, spec: dict) -> float:
    return cfg.tf_lr if spec["kind"] == "transformer" else cfg.lr


def _tcfg(cfg: FCurvesConfig, spec: dict, out: Path):
    n, p = spec.get("d_state", 64), spec.get("headdim", 16)  # the Transformer reuses the row recipe only
    return mamba_train_config(out_dir=out / "models" / spec["key"], d_model=cfg.d_model, n_layer=cfg.n_layer,
                              d_state=n, headdim=p, t_train=spec["t_train"], tokens_per_step=cfg.tokens_per_step,
                              steps=cfg.steps, lr=peak_lr(cfg, spec), task="mix" if cfg.task == "mix" else "lm",
                              copy_len=cfg.copy_len, seed=cfg.seed,
                              device=cfg.device, threads=cfg.threads)


def train_point(cfg: FCurvesConfig, spec: dict, out: Path, corpus) -> dict:
    """Step 1 for one model. Returns {model_dir, n_params, state_size, final_loss, seconds}."""
    from experiments.tiny_transformer import TinyTransformer, TransformerConfig
    from experiments.train import task_batch
    from mitigations import state_size
    t0 = time.perf_counter()
    from minimamba import Mamba2LM
    tcfg = _tcfg(cfg, spec, out)
    if spec["kind"] == "mamba2" and cfg.task == "mix":  # the project's trainer, checkpoints and all
        model_dir = train_or_reuse_mamba(tcfg)
        model = Mamba2LM.from_pretrained(model_dir)
        return {"model_dir": str(model_dir), "n_params": sum(q.numel() for q in model.parameters()),
                "state_size": state_size(model.config), "final_loss": final_train_loss(tcfg.out_dir),
                "seconds": time.perf_counter() - t0}
    if cfg.task == "mix":
        batch_fn = lambda step: task_batch(corpus, tcfg, step)  # noqa: E731 (train.py's rows)
    else:
        batch_fn = lambda step: copymix_rows(corpus, step=step, steps=tcfg.steps, seed=tcfg.seed,  # noqa: E731
                                             batch_size=tcfg.batch_size, t_train=tcfg.seq_len)
    if spec["kind"] == "mamba2":
        model = Mamba2LM(tcfg.model_config())
    else:
        model = TinyTransformer(TransformerConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head))
    losses = train_model(model, batch_fn, steps=tcfg.steps, lr=tcfg.lr, warmup_steps=tcfg.warmup_steps,
                         seed=tcfg.seed, desc=f"train {model_label(spec)}")
    model_dir = Path(tcfg.out_dir) / "model"
    if spec["kind"] == "mamba2":
        from checkpoints import save_pretrained
        save_pretrained(model, str(model_dir))
    else:
        model.save_pretrained(model_dir)
    return {"model_dir": str(model_dir), "n_params": sum(q.numel() for q in model.parameters()),
            "state_size": state_size(model.config) if spec["kind"] == "mamba2" else None,
            "final_loss": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t0}


def load_model(spec: dict, trained: dict):
    if spec["kind"] == "mamba2":
        from minimamba import Mamba2LM
        return Mamba2LM.from_pretrained(trained["model_dir"]).eval()
    from experiments.tiny_transformer import TinyTransformer
    return TinyTransformer.from_pretrained(trained["model_dir"])


# ----------------------------------------------------------------------------------------------
# 2-3. Curves
# ----------------------------------------------------------------------------------------------

def mitigation_context(cfg: FCurvesConfig, model, name: str, t_train: int):
    """(description, context manager) for one mitigation on a Mamba2LM."""
    import contextlib
    import mitigations as M
    if name == "none":
        return "none", contextlib.nullcontext()
    if name == "rri":
        lam_a = 1.0 - 1.0 / (cfg.rri_horizon * t_train)
        return (f"RRI lambda_a={lam_a:.5f} lambda_B={cfg.rri_lambda_B}",
                M.rri(model, lambda_a=lam_a, lambda_B=cfg.rri_lambda_B))
    r = cfg.window_mult * t_train
    return f"sliding window r={r}", M.sliding_window(model, r)


def curve_point(cfg: FCurvesConfig, spec: dict, trained: dict, mitigation: str, mode: str, out: Path,
                heldout: torch.Tensor, key: str) -> dict:
    """Steps 2-3 for one (model, mitigation, mode). Returns the memory lengths and the mean curves."""
    from experiments.data import DOC_SEP, VOCAB_SIZE
    model = load_model(spec, trained)
    lengths = parse_ints(cfg.lengths, "lengths")
    if spec["kind"] == "transformer":
        lengths = [L for L in lengths if L <= cfg.tf_max_len]
    desc, ctx = mitigation_context(cfg, model, mitigation, spec["t_train"])
    chunk = cfg.chunk_size if spec["kind"] == "mamba2" else None
    t0 = time.perf_counter()
    with ctx:
        curve = fc.forgetting_curve(model, lengths=lengths, tokens=heldout if mode == "text" else None,
                                    vocab_size=VOCAB_SIZE, n_samples=cfg.n_samples, bos_id=DOC_SEP,
                                    eos_id=DOC_SEP, seed=cfg.seed, batch_size=2 * cfg.n_samples,
                                    chunk_size=chunk, out=out / "curves" / f"{key}.json", progress=False,
                                    meta={"model": model_label(spec), "mitigation": desc, "mode": mode})
    s = curve.summary()
    return {"fine": s["fine_grained_length"], "coarse": s["coarse_grained_length"], "mitigation": desc,
            "lengths": curve.lengths.tolist(), "copy": curve.copy_mean.tolist(), "lm": curve.lm_mean.tolist(),
            "copy_std": curve.copy_acc.std(1).tolist(), "seconds": time.perf_counter() - t0}


def plot(cfg: FCurvesConfig, specs: list[dict], curves: dict, trained: dict, out: Path) -> list[Path]:
    """One figure per mode: a panel per model, copy (solid) and LM (dashed) per mitigation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    colors = {"none": "C0", "rri": "C1", "sliding_window": "C2"}
    for mode in cfg.modes.split(","):
        fig, axes = plt.subplots(1, len(specs), figsize=(3.6 * len(specs), 3.4), sharey=True, squeeze=False)
        for ax, spec in zip(axes[0], specs):
            for mit in (cfg.mitigations.split(",") if spec["kind"] == "mamba2" else ["none"]):
                c = curves.get((spec["key"], mit, mode))
                if c is None:
                    continue
                lab = "" if mit == "none" else f" +{mit}"
                ax.plot(c["lengths"], c["copy"], "-o", ms=3, color=colors[mit],
                        label=f"copy{lab} (fine {c['fine']}, coarse {c['coarse']})")
                ax.plot(c["lengths"], c["lm"], "--", color=colors[mit], alpha=0.6, label=f"LM{lab}")
            ax.axvline(spec["t_train"] / 2, color="gray", lw=0.8, ls=":")  # L = T/2: both copies fit in T
            ax.axhline(fc.DEFAULT_THRESHOLD, color="k", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("dependency length L (tokens)")
            params = trained[spec["key"]]["n_params"]
            ax.set_title(f"{model_label(spec)}\n{params / 1e3:.0f}K params", fontsize=9)
            ax.legend(fontsize=6, loc="upper right")
        axes[0][0].set_ylabel("accuracy (last half of the copy)")
        fig.suptitle(f"Forgetting curves, {mode} {'bytes' if mode == 'random' else 'held-out stdlib text'}, "
                     f"n={cfg.n_samples}/L (dotted: L = T_train/2; line: 0.99)", fontsize=10)
        fig.tight_layout()
        p = out / f"{FIGURE_PREFIX}_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def run(cfg: FCurvesConfig) -> dict:
    from experiments.data import Corpus
    t0 = time.perf_counter()
    out, store = start_run(cfg)
    corpus = Corpus.load()
    heldout = torch.from_numpy(corpus.heldout.astype(np.int64))  # (N,) held-out bytes
    specs = model_specs(cfg)
    trained, curves = {}, {}
    for spec in specs:  # 1. models
        print(f"[fcurves] model {model_label(spec)}", file=sys.stderr)
        recipe = {"task": cfg.task, "steps": cfg.steps, "tokens_per_step": cfg.tokens_per_step,
                  "lr": peak_lr(cfg, spec)}
        trained[spec["key"]] = store.run(spec["key"], {**spec, **recipe},
                                         lambda: train_point(cfg, spec, out, corpus))
    for spec in specs:  # 2. curves
        for mit in (cfg.mitigations.split(",") if spec["kind"] == "mamba2" else ["none"]):
            for mode in cfg.modes.split(","):
                key = point_key(model=spec["key"], mit=mit, mode=mode)
                print(f"[fcurves] curve {model_label(spec)} {mit} {mode}", file=sys.stderr)
                curves[(spec["key"], mit, mode)] = store.run(
                    key, {"model": spec["key"], "mitigation": mit, "mode": mode},
                    lambda: curve_point(cfg, spec, trained[spec["key"]], mit, mode, out, heldout, key))
    # 3. table and figures
    rows = ["model,params,state_size,final_train_loss,mitigation,mode,fine_len,coarse_len,copy_at_min_L,lm_at_min_L"]
    md = ["| model | params | N_S | train loss | mitigation | data | fine | coarse | copy @ L=min | LM @ L=min |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for (mk, mit, mode), c in curves.items():
        spec = next(s for s in specs if s["key"] == mk)
        tr = trained[mk]
        rows.append(f"{model_label(spec)},{tr['n_params']},{tr['state_size']},{tr['final_loss']:.3f},{mit},{mode},"
                    f"{c['fine']},{c['coarse']},{c['copy'][0]:.3f},{c['lm'][0]:.3f}")
        md.append(f"| {model_label(spec)} | {tr['n_params'] / 1e3:.0f}K | {tr['state_size'] or '-'} | "
                  f"{tr['final_loss']:.2f} | {mit} | {mode} | {c['fine']} | {c['coarse']} | "
                  f"{c['copy'][0]:.2f} (L={c['lengths'][0]}) | {c['lm'][0]:.2f} |")
    atomic_write_text(out / "summary.csv", "\n".join(rows) + "\n")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    figs = plot(cfg, specs, curves, trained, out)
    wall = time.perf_counter() - t0
    write_run_config(out, dataclasses.asdict(cfg), wall, store.computed)
    if cfg.figures:
        fig_dir = REPO / "figures"
        fig_dir.mkdir(exist_ok=True)
        for p in figs:
            shutil.copyfile(p, fig_dir / p.name)
        shutil.copyfile(out / "summary.md", fig_dir / f"{FIGURE_PREFIX}_summary.md")
    print("\n".join(md))
    print(f"[fcurves] wall {wall:.0f}s, run folder {out}", file=sys.stderr)
    return {"trained": trained, "curves": {"|".join(k): v for k, v in curves.items()}}


def main(argv: list[str] | None = None) -> None:
    run(parse_config(FCurvesConfig, argv, QUICK, __doc__.split("\n")[0]))


if __name__ == "__main__":
    main()
