"""State collapse at toy scale: train Mamba-2 on short sequences, watch it break beyond them.

Commands (run from the repository root)
    # the README demo: 2 CPU cores, under 10 minutes (trains, then analyses; reuses finished runs)
    python -m experiments.state_collapse --quick
    # the default size (meant for one GPU; on a CPU it takes hours)
    python -m experiments.state_collapse
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
    pays: half of each batch is copy episodes (random bytes, then the same bytes again). Trained on
    one episode per row, the model never sees a reason to forget; beyond T_train its state keeps old
    content, a few channels grow, and the loss climbs on newlines, on text and on later episodes.
    A longer T_train (several episodes per row) teaches it to forget.
    At this scale the outcome depends on the seed: it needs a head whose initial decay is already
    slow (seed 0 draws one among the 8 heads; with --seed 1 nothing collapses). See LOG.md.

Probes (each prompt is locally in-distribution; only the amount of carried context grows)
    text     held-out standard-library source (documents never trained on)
    copy     a stream of fresh copy episodes [r1 r1 r2 r2 ...], copy_len random bytes each
    newline  the paper's "\\n" * l prompt

Reading order (the file's sections)
    1. collapse_criterion                    the paper's rule on a per-position loss curve
    2. per_position_loss, summarize          carried-state evaluation in bounded memory
    3. DemoConfig, QUICK                     sizes, training lengths, evaluation length, mitigations
    4. run_demo()                            train (or reuse) one model per T_train, analyse, mitigate;
                                             trace() uses mitigations.trace_states for the state stats
    5. plot()                                the three figures
    6. run_checkpoint()                      the same analysis for any from_pretrained directory

Glossary
    T  T_train, training length      l  evaluation length      k  chunk: tokens per forward call
    h  heads   p  headdim   n  d_state (per-head state is p x n)
    alpha_{1:t}  retention of the first token after t tokens = exp(sum_{j<=t} Delta_j A)  [SC eq. 2]

Outputs (one run folder, default runs/state_collapse[_quick]/)
    config.json      resolved config, versions, hardware, wall time
    metrics.json     per T_train and probe: loss curves (binned), criterion, state stats, mitigations
    metrics.csv      one row per (T_train, probe, method): in-window and beyond-window losses
    state_collapse_loss.png, state_collapse_mitigations.png, state_collapse_state.png
    T<T_train>/      the training run (train.py layout: checkpoints/, metrics.csv)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.common import ProgressBar, atomic_write_json, atomic_write_text, run_metadata

COLLAPSE_FACTOR = 2.0  # [SC] "fails to forget" if loss anywhere beyond T_train > 2x the max within it
GPT_NEOX_NEWLINE_ID = 187  # "\n" in the GPT-NeoX tokenizer of the official mamba2 checkpoints
BYTE_NEWLINE_ID = ord("\n")  # "\n" for our byte-level models
PLOT_POINTS = 60  # geometric bins per loss curve in figures and metrics.json
EVAL_SEED = 12345  # seed of the evaluation copy streams (never a training seed's stream: step EVAL_STEP)
EVAL_STEP = 10**9


# ----------------------------------------------------------------------------------------------
# 1. The collapse criterion
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollapseResult:
    collapsed: bool
    first_position: int | None  # first position >= T_train whose loss exceeds the threshold
    threshold: float  # factor * max_within
    max_within: float  # max loss over positions [0, T_train)
    max_beyond: float  # max loss over positions [T_train, l)


def collapse_criterion(loss: torch.Tensor, t_train: int, factor: float = COLLAPSE_FACTOR) -> CollapseResult:
    """The paper's failure criterion on a per-position loss curve (averaged over prompts).

    [SC] section "State capacity": a model fails to forget if
        max_{t >= T_train} loss_t  >  factor * max_{t < T_train} loss_t      (factor = 2)

    Args:
        loss: (l,) mean loss at each position, l > t_train.
        t_train: the training length T_train.
        factor: multiple of the in-window maximum that counts as collapse.
    """
    loss = torch.as_tensor(loss, dtype=torch.float64).flatten()
    if loss.numel() <= t_train:
        raise ValueError(f"the loss curve ({loss.numel()} positions) must be longer than t_train={t_train}")
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    max_within = loss[:t_train].max().item()
    beyond = loss[t_train:]
    threshold = factor * max_within
    over = torch.nonzero(beyond > threshold)
    first = int(over[0]) + t_train if over.numel() else None
    return CollapseResult(first is not None, first, threshold, max_within, beyond.max().item())


# ----------------------------------------------------------------------------------------------
# 2. Carried-state evaluation
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
        logits, state = model(x, state)  # (b, k, V_padded)
        loss = F.cross_entropy(logits[..., :vocab].float().transpose(1, 2), y, reduction="none")  # (b, k)
        losses.append(loss.double().mean(0).cpu())
        bar.update(1)
    bar.close()
    return torch.cat(losses)


def binned(loss: torch.Tensor, t_train: int) -> list[dict]:
    """Mean loss over geometric bins [0, T/2), [T/2, T), [T, 2T), [2T, 4T), ... (for tables and json)."""
    edges = [0, max(1, t_train // 2), t_train]
    while edges[-1] < loss.numel():
        edges.append(min(edges[-1] * 2, loss.numel()))
    return [{"from": a, "to": b, "loss": loss[a:b].mean().item()} for a, b in zip(edges, edges[1:]) if b > a]


def summarize(loss: torch.Tensor, t_train: int) -> dict:
    """The numbers a table needs: the criterion, in-window and far-beyond losses, binned curve.

    in_window: mean loss over [T/2, T) (the settled part of the window; position 0 is unconditional)
    beyond:    mean loss over [2T, l)  (well past the training length)
    excess:    beyond - in_window (> 0: the model got worse with more context)
    """
    cr = collapse_criterion(loss, t_train)
    half = max(1, t_train // 2)
    in_window = loss[half:t_train].mean().item()
    beyond = loss[min(2 * t_train, loss.numel() - 1):].mean().item()
    return {"collapsed": cr.collapsed, "first_position": cr.first_position, "threshold": cr.threshold,
            "max_within": cr.max_within, "max_beyond": cr.max_beyond, "in_window": in_window,
            "beyond": beyond, "excess": beyond - in_window, "bins": binned(loss, t_train)}


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


# ----------------------------------------------------------------------------------------------
# 3. Demo configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConfig:
    """One state size, several training lengths. Each field is a flag: --name value."""

    out_dir: str = "runs/state_collapse"
    # --- the model (the same for every T_train) ---
    d_model: int = 128  # d
    n_layer: int = 2
    d_state: int = 256  # n, per-head state is headdim x d_state: over-sized on purpose
    headdim: int = 32  # p
    # --- training (experiments/train.py) ---
    train_lens: str = "16,64,256"  # T_train values, comma-separated
    tokens_per_step: int = 1024  # batch rows per step = tokens_per_step / T_train (same tokens for every T)
    steps: int = 8000
    lr: float = 3e-3
    task: str = "mix"  # see train.py: half the rows corpus text, half copy episodes
    copy_len: int = 8  # random bytes per copy episode
    seed: int = 0
    # --- evaluation ---
    eval_mult: int = 64  # evaluation length = eval_mult * min(T_train)  (the issue asks >= 32)
    eval_length: int = 0  # evaluation length in tokens; 0 = eval_mult * min(T_train)
    eval_prompts: int = 32  # held-out windows / copy streams averaged per position
    trace_prompts: int = 4  # prompts for the state statistics
    chunk_len: int = 128  # tokens per forward call with the state carried (the official k = 128)
    # --- mitigations, applied to the shortest-T_train model ---
    mitigations: bool = True
    rri_horizon: float = 4.0  # lambda_a = 1 - 1 / (rri_horizon * T_train)  ([SC] rule of thumb)
    rri_lambda_B: float = 0.75  # [SC] 370M value
    delta_factor: float = 0.5  # LongMamba Delta scaling
    window_mult: int = 1  # sliding window r = window_mult * T_train
    norm_every: int = 0  # state-norm clamp period; 0 = min(T_train, 128)
    # --- machine ---
    device: str = "auto"
    threads: int = 0  # torch threads on CPU (0 = torch default)
    quick: bool = False  # the README demo size (overrides sizes, see QUICK)
    figures_dir: str = ""  # also write the figures here (the README's copies live in figures/)

    def __post_init__(self):
        lens = self.lens
        if not lens or any(t < 2 for t in lens):
            raise ValueError(f"--train_lens must be comma-separated ints >= 2, got {self.train_lens!r}")
        if any(self.tokens_per_step % t for t in lens):
            raise ValueError(f"--tokens_per_step {self.tokens_per_step} must be a multiple of every T_train {lens}")
        if self.eval_mult < 2:
            raise ValueError(f"--eval_mult must be >= 2, got {self.eval_mult}")

    @property
    def lens(self) -> list[int]:
        return sorted(int(t) for t in str(self.train_lens).split(",") if t.strip())

    @property
    def eval_len(self) -> int:
        return self.eval_length or self.eval_mult * min(self.lens)


# The README demo: small enough for 2 CPU cores in under 10 minutes (see LOG.md for why these values)
QUICK = dict(out_dir="runs/state_collapse_quick", d_model=64, n_layer=2, d_state=256, headdim=32,
             train_lens="16,64", tokens_per_step=512, steps=3000, eval_prompts=16, eval_mult=64)


def parse_demo_config(argv: list[str] | None = None) -> tuple[DemoConfig, dict]:
    hints = typing.get_type_hints(DemoConfig)
    p = argparse.ArgumentParser(description="State collapse at toy scale (see the module docstring).")
    p.add_argument("--checkpoint", default="", help="analyse this from_pretrained directory instead of training")
    p.add_argument("--replot", action="store_true", help="only redraw the figures from out_dir/metrics.json")
    p.add_argument("--t_train", type=int, default=8192, help="--checkpoint: its training length (official: 8K)")
    p.add_argument("--newline_id", type=int, default=-1, help="--checkpoint: token id of '\\n' "
                   "(default: 10 for byte vocabularies, 187 = GPT-NeoX otherwise)")
    for f in dataclasses.fields(DemoConfig):
        typ = hints[f.name]
        if typ is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?",
                           const=True, default=None)
        else:
            p.add_argument(f"--{f.name}", type=typ, default=None)
    args = vars(p.parse_args(argv))
    extra = {k: args.pop(k) for k in ("checkpoint", "t_train", "newline_id", "replot")}
    given = {k: v for k, v in args.items() if v is not None}
    base = dict(QUICK) if given.get("quick") else {}
    base.update(given)
    cfg = DemoConfig(**base)
    return cfg, extra


# ----------------------------------------------------------------------------------------------
# 4. The demo: train (or reuse) one model per T_train, analyse, mitigate, plot
# ----------------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def train_config(cfg: DemoConfig, t_train: int, device: torch.device):
    """The train.py config of the model for one T_train (same tokens per step for every T_train)."""
    from experiments.train import TrainConfig
    return TrainConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_state, headdim=cfg.headdim,
                       chunk_size=min(64, t_train),
                       task=cfg.task, copy_len=cfg.copy_len, seq_len=t_train, n_segments=1,
                       batch_size=cfg.tokens_per_step // t_train, steps=cfg.steps, lr=cfg.lr,
                       warmup_steps=min(100, cfg.steps // 10), out_dir=str(Path(cfg.out_dir) / f"T{t_train}"),
                       seed=cfg.seed, log_every=max(1, cfg.steps // 100), eval_every=0,
                       ckpt_every=max(1, cfg.steps // 5), resume=True, device=str(device), threads=cfg.threads)


def train_or_reuse(cfg: DemoConfig, t_train: int, device: torch.device) -> Path:
    """Train the T_train model (resuming a killed run), or reuse a finished one. Returns its model dir."""
    from experiments.train import latest_checkpoint, train
    tcfg = train_config(cfg, t_train, device)
    ckpt = latest_checkpoint(tcfg.out_dir)
    done = ckpt is not None and int(ckpt.name.split("_")[1]) >= tcfg.steps
    if done:
        print(f"T_train={t_train}: reusing {ckpt}", file=sys.stderr)
    else:
        print(f"T_train={t_train}: training {tcfg.steps} steps of {tcfg.batch_size} x {t_train} tokens "
              f"-> {tcfg.out_dir}", file=sys.stderr)
        train(tcfg)
        ckpt = latest_checkpoint(tcfg.out_dir)
    return ckpt / "model"


def make_probes(cfg: DemoConfig, corpus) -> dict[str, torch.Tensor]:
    """The evaluation inputs, each (prompts, eval_len + 1): held-out text, copy stream, newlines."""
    from experiments.data import copy_batch, newline_probe
    l = cfg.eval_len
    return {"text": corpus.heldout_windows(cfg.eval_prompts, l),
            "copy": copy_batch(EVAL_STEP, seed=EVAL_SEED, batch_size=cfg.eval_prompts, seq_len=l,
                               copy_len=cfg.copy_len),
            "newline": newline_probe(l)}


def evaluate(model, probes: dict[str, torch.Tensor], t_train: int, chunk_len: int, label: str) -> dict:
    """Per-probe summary and plotted curve of the carried-state loss."""
    out = {}
    for name, ids in probes.items():
        loss = per_position_loss(model, ids, chunk_len)
        xs, ys = log_curve(loss)
        out[name] = {**summarize(loss, t_train), "curve": {"position": xs, "loss": ys}}
        s = out[name]
        print(f"  {label:>14s} {name:>7s}: in-window {s['in_window']:.3f}  beyond 2T {s['beyond']:.3f}  "
              f"max within {s['max_within']:.2f} max beyond {s['max_beyond']:.2f}  "
              f"collapsed={s['collapsed']} (first at {s['first_position']})", file=sys.stderr)
    return out


def trace(model, ids: torch.Tensor, every: int) -> dict:
    """State statistics over time with mitigations.trace_states: per layer, the largest head's
    RMS and max |h|, and the largest first-token retention."""
    from mitigations import trace_states
    tr = trace_states(model, ids, every=every)
    return {"positions": tr.positions,
            "rms_max_head": tr.rms.amax(-1).T.tolist(),  # (n_layer, points)
            "max_abs": tr.max_abs.amax(-1).T.tolist(),
            "retention_max_head": tr.retention.amax(-1).T.tolist(),
            "state_size": tr.extra["state_size"]}


def mitigation_contexts(cfg: DemoConfig, model, t_train: int, calib: torch.Tensor) -> dict:
    """name -> (description, a callable returning the context manager) for each mitigation."""
    import mitigations as M
    lam_a = 1.0 - 1.0 / (cfg.rri_horizon * t_train)
    every = cfg.norm_every or min(t_train, 128)
    taus = M.calibrate_state_norm(model, calib, every=every)
    window = cfg.window_mult * t_train
    return {"rri": (f"RRI lambda_a={lam_a:.5f} lambda_B={cfg.rri_lambda_B}",
                    lambda: M.rri(model, lambda_a=lam_a, lambda_B=cfg.rri_lambda_B)),
            "state_norm": (f"state norm every {every} (tau calibrated on {calib.shape[1]}-token inputs)",
                           lambda: M.state_norm(model, taus, every=every)),
            "sliding_window": (f"sliding window r={window}", lambda: M.sliding_window(model, window)),
            "delta_scaling": (f"Delta x {cfg.delta_factor}", lambda: M.delta_scaling(model, cfg.delta_factor))}


def run_demo(cfg: DemoConfig) -> dict:
    from minimamba import Mamba2LM
    from experiments.data import Corpus
    t0 = time.perf_counter()
    device = _device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.load()
    probes = make_probes(cfg, corpus)
    results: dict = {"config": dataclasses.asdict(cfg), "eval_len": cfg.eval_len, "models": {}}
    every = max(1, cfg.eval_len // 64)
    # 1. one model per T_train
    for t_train in cfg.lens:
        model_dir = train_or_reuse(cfg, t_train, device)
        model = Mamba2LM.from_pretrained(model_dir).to(device).eval()
        print(f"T_train={t_train}: evaluating to {cfg.eval_len} tokens ({cfg.eval_len // t_train}x)", file=sys.stderr)
        entry = {"model_dir": str(model_dir), "base": evaluate(model, probes, t_train, cfg.chunk_len, "base"),
                 "trace": {name: trace(model, ids[:cfg.trace_prompts, :-1].to(device), every)
                           for name, ids in probes.items()}}
        # 2. mitigations on the shortest training length (the one that collapses first)
        if cfg.mitigations and t_train == min(cfg.lens):
            calib = torch.cat([probes["text"][:, :t_train], probes["copy"][:, :t_train]]).to(device)
            entry["mitigations"] = {}
            for name, (desc, ctx) in mitigation_contexts(cfg, model, t_train, calib).items():
                with ctx():
                    entry["mitigations"][name] = {"description": desc,
                                                  **evaluate(model, probes, t_train, cfg.chunk_len, name)}
        results["models"][str(t_train)] = entry
        atomic_write_json(out / "metrics.json", results)  # incremental: a killed run keeps what it had
    results["wall_s"] = time.perf_counter() - t0
    write_outputs(cfg, results, out)
    return results


def write_outputs(cfg: DemoConfig, results: dict, out: Path) -> None:
    """metrics.json, metrics.csv, config.json and the three figures."""
    import mitigations as M
    rows = ["t_train,probe,method,in_window,beyond,excess,max_within,max_beyond,collapsed,first_position"]
    for t, entry in results["models"].items():
        methods = {"base": entry["base"], **{k: v for k, v in entry.get("mitigations", {}).items()}}
        for method, per_probe in methods.items():
            for probe, s in per_probe.items():
                if probe == "description":
                    continue
                rows.append(f"{t},{probe},{method},{s['in_window']:.4f},{s['beyond']:.4f},{s['excess']:.4f},"
                            f"{s['max_within']:.4f},{s['max_beyond']:.4f},{s['collapsed']},{s['first_position']}")
    atomic_write_text(out / "metrics.csv", "\n".join(rows) + "\n")
    atomic_write_json(out / "metrics.json", results)
    from minimamba import Mamba2Config
    mcfg = Mamba2Config(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=256, d_state=cfg.d_state,
                        headdim=cfg.headdim)
    atomic_write_json(out / "config.json", {"demo": dataclasses.asdict(cfg), "eval_len": cfg.eval_len,
                                            "state_size_N_S": M.state_size(mcfg),
                                            "wall_s": results.get("wall_s"), "meta": run_metadata()})
    written = plot(results, out)
    if cfg.figures_dir:
        import shutil
        Path(cfg.figures_dir).mkdir(parents=True, exist_ok=True)
        for f in written:
            shutil.copyfile(f, Path(cfg.figures_dir) / f.name)


# ----------------------------------------------------------------------------------------------
# 5. Figures
# ----------------------------------------------------------------------------------------------

PROBE_ORDER = ("text", "copy", "newline")  # panel order (metrics.json stores keys sorted)
METHOD_ORDER = ("rri", "state_norm", "sliding_window", "delta_scaling")
PROBE_TITLES = {"text": "held-out text (stdlib source)", "copy": "stream of copy episodes",
                "newline": 'newline prompt "\\n" * l'}


def plot(results: dict, out: Path) -> list[Path]:
    """state_collapse_loss.png, state_collapse_mitigations.png, state_collapse_state.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = results["models"]
    lens = sorted(int(t) for t in models)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    present = list(next(iter(models.values()))["base"].keys())
    probes = [p for p in PROBE_ORDER if p in present] + [p for p in present if p not in PROBE_ORDER]
    written = []

    # 1. loss vs position per training length
    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.8), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        for i, t in enumerate(lens):
            s = models[str(t)]["base"][probe]
            ax.plot(s["curve"]["position"], s["curve"]["loss"], color=colors[i % len(colors)],
                    label=f"T_train={t}" + (" (collapsed)" if s["collapsed"] else ""))
            ax.axvline(t, color=colors[i % len(colors)], ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(PROBE_TITLES.get(probe, probe), fontsize=10)
        ax.set_xlabel("position (tokens; dashed: T_train)")
        ax.set_ylabel("loss (nats/byte)")
        ax.legend(fontsize=8)
    fig.suptitle("Per-position loss with the state carried (mean over prompts)", fontsize=11)
    fig.tight_layout()
    written.append(out / "state_collapse_loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 2. mitigations on the shortest-T model
    t0 = str(lens[0])
    if "mitigations" in models[t0]:
        fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.8), squeeze=False)
        mits = models[t0]["mitigations"]
        methods = {"base": models[t0]["base"], **{k: mits[k] for k in METHOD_ORDER if k in mits},
                   **{k: v for k, v in mits.items() if k not in METHOD_ORDER}}
        for ax, probe in zip(axes[0], probes):
            for i, (name, per) in enumerate(methods.items()):
                s = per[probe]
                ax.plot(s["curve"]["position"], s["curve"]["loss"], color=colors[i % len(colors)],
                        lw=2.0 if name == "base" else 1.2, label=per.get("description", name))
            ax.axvline(int(t0), color="gray", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(PROBE_TITLES.get(probe, probe), fontsize=10)
            ax.set_xlabel(f"position (dashed: T_train={t0})")
            ax.set_ylabel("loss (nats/byte)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.suptitle(f"Training-free mitigations on the T_train={t0} model", fontsize=11)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        written.append(out / "state_collapse_mitigations.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 3. state statistics over time on the paper's probe (newlines)
    probe = "newline" if "newline" in probes else probes[0]
    n_layer = len(models[str(lens[0])]["trace"][probe]["rms_max_head"])
    fig, axes = plt.subplots(2, n_layer, figsize=(4.5 * n_layer, 6.5), squeeze=False)
    for i, t in enumerate(lens):
        tr = models[str(t)]["trace"][probe]
        for layer in range(n_layer):
            axes[0][layer].plot(tr["positions"], tr["rms_max_head"][layer], color=colors[i % len(colors)],
                                label=f"T_train={t}")
            axes[1][layer].plot(tr["positions"], tr["retention_max_head"][layer], color=colors[i % len(colors)],
                                label=f"T_train={t}")
            for row in (0, 1):
                axes[row][layer].axvline(t, color=colors[i % len(colors)], ls="--", lw=0.8)
    for layer in range(n_layer):
        axes[0][layer].set_title(f"layer {layer}: largest per-head state RMS", fontsize=10)
        axes[1][layer].set_title(f"layer {layer}: largest first-token retention", fontsize=10)
        axes[1][layer].set_yscale("log")
        for row in (0, 1):
            axes[row][layer].set_xscale("log")
            axes[row][layer].set_xlabel("position (tokens)")
            axes[row][layer].legend(fontsize=8)
    fig.suptitle(f"State over time on the {PROBE_TITLES.get(probe, probe)}", fontsize=11)
    fig.tight_layout()
    written.append(out / "state_collapse_state.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------
# 6. Any checkpoint (e.g. the official state-spaces/mamba2-130m, downloaded by the user)
# ----------------------------------------------------------------------------------------------

def run_checkpoint(path: str, cfg: DemoConfig, t_train: int, newline_id: int = -1) -> dict:
    """Newline-prompt (and, for byte models, held-out text) collapse analysis of a checkpoint.

    The state is carried in chunks of cfg.chunk_len tokens, so memory is bounded by one chunk's
    logits (b x chunk_len x vocab) whatever the length: 20K tokens of the 130m model fit a laptop.
    """
    from minimamba import Mamba2LM
    from experiments.data import Corpus
    t0 = time.perf_counter()
    device = _device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model = Mamba2LM.from_pretrained(path).to(device).eval()
    vocab = model.config.vocab_size
    if newline_id < 0:
        newline_id = BYTE_NEWLINE_ID if vocab == 256 else GPT_NEOX_NEWLINE_ID
    if not 0 <= newline_id < vocab:
        raise ValueError(f"--newline_id {newline_id} is outside the checkpoint's vocabulary of {vocab}")
    l = cfg.eval_len
    if l <= t_train:
        raise ValueError(f"evaluation length {l} must exceed --t_train {t_train}: pass --eval_length")
    probes = {"newline": torch.full((1, l + 1), newline_id, dtype=torch.long)}
    if vocab == 256:  # byte-level: our corpus is already tokenized
        probes["text"] = Corpus.load().heldout_windows(cfg.eval_prompts, l)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{path}: evaluating {list(probes)} to {l} tokens (T_train {t_train})", file=sys.stderr)
    base = evaluate(model, probes, t_train, cfg.chunk_len, "base")
    every = max(1, l // 64)
    results = {"checkpoint": str(path), "t_train": t_train, "eval_len": l, "newline_id": newline_id,
               "models": {str(t_train): {"model_dir": str(path), "base": base,
                                          "trace": {n: trace(model, ids[:cfg.trace_prompts, :-1].to(device), every)
                                                    for n, ids in probes.items()}}}}
    if cfg.mitigations:
        calib = probes["text"][:, :t_train] if "text" in probes else probes["newline"][:, :t_train]
        mits = {}
        for name, (desc, ctx) in mitigation_contexts(cfg, model, t_train, calib.to(device)).items():
            with ctx():
                mits[name] = {"description": desc, **evaluate(model, probes, t_train, cfg.chunk_len, name)}
        results["models"][str(t_train)]["mitigations"] = mits
    results["wall_s"] = time.perf_counter() - t0
    write_outputs(cfg, results, out)
    return results


def main(argv: list[str] | None = None) -> None:
    cfg, extra = parse_demo_config(argv)
    if extra["replot"]:
        results = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
        written = plot(results, Path(cfg.out_dir))
        if cfg.figures_dir:
            import shutil
            for f in written:
                shutil.copyfile(f, Path(cfg.figures_dir) / f.name)
        print("redrew " + " ".join(str(f) for f in written), file=sys.stderr)
        return
    if extra["checkpoint"]:
        if cfg.out_dir == DemoConfig.out_dir:
            cfg = dataclasses.replace(cfg, out_dir=str(Path(DemoConfig.out_dir + "_checkpoint")))
        run_checkpoint(extra["checkpoint"], cfg, extra["t_train"], extra["newline_id"])
    else:
        run_demo(cfg)
    print(f"wrote {cfg.out_dir}/: config.json metrics.json metrics.csv state_collapse_*.png", file=sys.stderr)


if __name__ == "__main__":
    main()
