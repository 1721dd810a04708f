"""State capacity at toy scale: the training length a Mamba-2 needs to learn to forget, vs state size.

Commands (run from the repository root)
    # CPU-sized: 2 state sizes x 2 training lengths (20 min measured on a busy shared 2-core box, 1 thread)
    python -m experiments.state_capacity --quick
    # the default sweep (meant for a GPU or a long CPU run)
    python -m experiments.state_capacity
    # rerun after a kill: finished points are reused (and a killed training resumes from its checkpoint)
    python -m experiments.state_capacity --quick
    # widen a finished sweep: new points only are computed (same --out_dir)
    python -m experiments.state_capacity --quick --states 64x16,128x32,256x32,512x32 --train_lens 16,32,64

Paper
    Stuffed Mamba (arXiv 2410.07145), section "State capacity": for each state size, the smallest
    training length at which the model no longer collapses ("learns to forget"). Criterion: on long
    prompts, a model fails if the loss at any position beyond T_train exceeds 2x the maximum loss
    within the first T_train tokens. Finding: T_forget = 5.172 N_S - 4.469 (K tokens, M elements),
    R^2 > 0.999, i.e. about 5 tokens of training length per 1K state elements.

Protocol (numbered as the code below)
    1. For every state size (d_state x headdim, n_layer) and training length T, train a Mamba-2 with
       experiments/train.py (the "mix" task: half stdlib text, half copy episodes - the regime where
       experiments/LOG.md found collapse at T_train = 16; the same number of tokens for every T).
    2. Per-position loss with the state carried (experiments/state_collapse.per_position_loss) on
       the newline prompt and on held-out text, to eval_length tokens; the collapse ratio
       max_{t >= T} loss_t / max_{t < T} loss_t per probe.
    3. A point collapses at factor f if its ratio exceeds f on any probe (f = 2 is the paper's).
       T_forget(state) = the smallest tested T that does not collapse. Censored cases are kept as
       such: "> max T" (collapses at every tested T) and "<= min T" (never collapses).
    4. A linear fit of T_forget against N_S (uncensored states only) with R^2, plotted with the
       paper's slope (5.172 K tokens per M elements = 0.005172 tokens per element).
    Because toy models collapse weakly (LOG.md: ratios of 1.8 at T = 16), the summary also reports
    T_forget under a relaxed factor (--relaxed_factor, default 1.5). That is our addition, labelled
    as such, never a substitute for the paper's 2x.

Outputs (run folder, default runs/capacity[_quick]/)
    config.json, points/*.json (one finished point each), models/<key>/ (train.py runs),
    summary.json, summary.md, capacity.png (ratio per point; T_forget vs N_S), copied to figures/.

Glossary
    N_S  state size in elements, mitigations.state_size (SSM + conv state, [SC] Table 2's count)
    T    T_train;  n d_state;  p headdim;  l evaluation length
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

from experiments.common import atomic_write_json, atomic_write_text  # noqa: E402
from experiments.sweep import (PAPER_FORGET_INTERCEPT, PAPER_FORGET_SLOPE, final_train_loss,  # noqa: E402
                               linear_fit, mamba_train_config, parse_config, parse_ints, parse_states,
                               point_key, start_run, train_or_reuse_mamba, write_run_config)

PAPER_FACTOR = 2.0  # [SC] criterion
PROBES = ("newline", "text")
FIGURE_NAME = "capacity.png"


@dataclass(frozen=True)
class CapacityConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    out_dir: str = "runs/capacity"
    d_model: int = 64
    layers: str = "2"  # n_layer values (part of the state size)
    states: str = "32x16,64x16,128x32,256x32"  # d_state x headdim
    train_lens: str = "8,16,32,64,128"  # T_train values searched
    task: str = "mix"  # train.py task (see LOG.md)
    copy_len: int = 8
    tokens_per_step: int = 512
    steps: int = 3000
    lr: float = 3e-3
    seed: int = 0
    eval_length: int = 4096  # tokens of each probe (the paper: 1M)
    eval_prompts: int = 8  # held-out text windows averaged per position (the newline prompt is one)
    chunk_len: int = 128  # tokens per forward call with the state carried (the official k = 128)
    factor: float = PAPER_FACTOR  # the collapse criterion's factor
    relaxed_factor: float = 1.5  # our addition for weakly collapsing toy models (reported separately)
    device: str = "cpu"
    threads: int = 1
    figures: bool = True
    quick: bool = False

    def __post_init__(self):
        parse_states(self.states)
        lens = parse_ints(self.train_lens, "train_lens")
        parse_ints(self.layers, "layers")
        if max(lens) * 2 > self.eval_length:
            raise ValueError(f"--eval_length {self.eval_length} must be >= 2 x the largest T_train ({max(lens)})")
        if any(self.tokens_per_step % t for t in lens):
            raise ValueError(f"--tokens_per_step {self.tokens_per_step} must be a multiple of every T_train {lens}")
        if self.factor <= 1 or self.relaxed_factor <= 1:
            raise ValueError("--factor and --relaxed_factor must be > 1")


# The CPU demo: the regime where experiments/state_collapse.py --quick collapses (d_state 256 x headdim
# 32, mix task, 3000 steps of 512 tokens, T_train 16 vs 64) plus a 4x smaller state. With 1500 steps
# the same sizes did not meet 2x anywhere (newline ratio <= 1.02, text <= 1.74): see README.
QUICK = dict(out_dir="runs/capacity_quick", states="64x16,256x32", train_lens="16,64", steps=3000,
             eval_length=1024, eval_prompts=8)


# ----------------------------------------------------------------------------------------------
# 1-2. One point: train, then the collapse ratio on each probe
# ----------------------------------------------------------------------------------------------

def collapse_ratio(loss: torch.Tensor, t_train: int) -> dict:
    """max loss beyond T_train / max loss within it, with both maxima ([SC] criterion's quantities)."""
    from experiments.state_collapse import collapse_criterion
    cr = collapse_criterion(loss, t_train, PAPER_FACTOR)
    half = max(1, t_train // 2)
    return {"max_within": cr.max_within, "max_beyond": cr.max_beyond, "ratio": cr.max_beyond / cr.max_within,
            "in_window": loss[half:t_train].mean().item(), "beyond": loss[2 * t_train:].mean().item(),
            "first_position_2x": cr.first_position}


def run_point(cfg: CapacityConfig, n_layer: int, n: int, p: int, t: int, out: Path, probes: dict) -> dict:
    from minimamba import Mamba2LM
    from mitigations import state_size
    from experiments.state_collapse import per_position_loss
    key = point_key(L=n_layer, n=n, p=p, T=t)
    tcfg = mamba_train_config(out_dir=out / "models" / key, d_model=cfg.d_model, n_layer=n_layer, d_state=n,
                              headdim=p, t_train=t, tokens_per_step=cfg.tokens_per_step, steps=cfg.steps,
                              lr=cfg.lr, task=cfg.task, copy_len=cfg.copy_len, seed=cfg.seed, device=cfg.device,
                              threads=cfg.threads)
    t0 = time.perf_counter()
    model = Mamba2LM.from_pretrained(train_or_reuse_mamba(tcfg)).eval()
    t1 = time.perf_counter()
    res = {"state_size": state_size(model.config), "n_params": sum(q.numel() for q in model.parameters()),
           "final_loss": final_train_loss(tcfg.out_dir), "train_seconds": t1 - t0, "probes": {}}
    for name, ids in probes.items():
        loss = per_position_loss(model, ids, cfg.chunk_len)  # (l,)
        res["probes"][name] = collapse_ratio(loss, t)
    res["eval_seconds"] = time.perf_counter() - t1
    return res


# ----------------------------------------------------------------------------------------------
# 3-4. T_forget and the fit
# ----------------------------------------------------------------------------------------------

def point_ratio(res: dict) -> float:
    """The worst collapse ratio over the probes of one point."""
    return max(pr["ratio"] for pr in res["probes"].values())


def t_forget(ratios: dict[int, float], factor: float) -> dict:
    """The training length from which on the model no longer collapses: the tested T after the last
    one whose ratio > factor. {"value", "censored", "non_monotone"}: censored "above" = the longest T
    still collapses (value = max T, truth > it); "at_or_below" = none collapses (truth <= min T).
    non_monotone = some T below the last collapse did not collapse: at toy scale the criterion is a
    maximum over noisy positions, so one seed can pass at T and fail at a longer T; reading the first
    pass as T_forget would then claim a model that collapses at a longer training length had learned
    to forget."""
    lens = sorted(ratios)
    collapsed = [t for t in lens if ratios[t] > factor]
    if not collapsed:
        return {"value": lens[0], "censored": "at_or_below", "non_monotone": False}
    last = collapsed[-1]
    non_monotone = any(ratios[t] <= factor for t in lens if t < last)
    if last == lens[-1]:
        return {"value": last, "censored": "above", "non_monotone": non_monotone}
    return {"value": lens[lens.index(last) + 1], "censored": None, "non_monotone": non_monotone}


def fit_capacity(states: list[dict], factor_key: str) -> dict:
    """Linear fit of T_forget (tokens) against N_S (elements) over the uncensored states."""
    pts = [(s["state_size"], s[factor_key]["value"]) for s in states if s[factor_key]["censored"] is None]
    if len({x for x, _ in pts}) < 2:
        return {"fit": None, "note": f"{len(pts)} uncensored state size(s): no fit (needs >= 2)"}
    f = linear_fit([x for x, _ in pts], [y for _, y in pts])
    if abs(f.slope) < 1e-12:  # equal T_forget everywhere: an exact 0, not round-off
        f = dataclasses.replace(f, slope=0.0)
    note = ""
    if len({y for _, y in pts}) == 1:
        note = "every state has the same T_forget: slope 0, R^2 undefined (the grid is too coarse)"
    elif f.n == 2:
        note = "2 points: R^2 = 1 by construction"
    return {"fit": dataclasses.asdict(f), "note": note,
            "slope_tokens_per_K_elements": 1e3 * f.slope, "paper_tokens_per_K_elements": PAPER_FORGET_SLOPE}


def run(cfg: CapacityConfig) -> dict:
    from experiments.data import Corpus, newline_probe
    t0 = time.perf_counter()
    out, store = start_run(cfg)
    corpus = Corpus.load()
    probes = {"newline": newline_probe(cfg.eval_length),
              "text": corpus.heldout_windows(cfg.eval_prompts, cfg.eval_length)}
    lens = parse_ints(cfg.train_lens, "train_lens")
    states = []
    for n_layer in parse_ints(cfg.layers, "layers"):
        for n, p in parse_states(cfg.states):
            ratios, entry = {}, {"n_layer": n_layer, "d_state": n, "headdim": p, "points": {}}
            for t in lens:
                print(f"[capacity] n_layer={n_layer} d_state={n} headdim={p} T_train={t}", file=sys.stderr)
                res = store.run(point_key(L=n_layer, n=n, p=p, T=t),
                                {"n_layer": n_layer, "d_state": n, "headdim": p, "t_train": t,
                                 "steps": cfg.steps, "tokens_per_step": cfg.tokens_per_step,
                                 "eval_length": cfg.eval_length, "task": cfg.task},
                                lambda: run_point(cfg, n_layer, n, p, t, out, probes))
                entry["points"][t] = res
                entry["state_size"] = res["state_size"]
                ratios[t] = point_ratio(res)
                print(f"[capacity]   N_S={res['state_size']} ratios "
                      + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in res["probes"].items()), file=sys.stderr)
            entry["ratios"] = ratios
            entry["t_forget"] = t_forget(ratios, cfg.factor)
            entry["t_forget_relaxed"] = t_forget(ratios, cfg.relaxed_factor)
            states.append(entry)
    summary = {"factor": cfg.factor, "relaxed_factor": cfg.relaxed_factor, "train_lens": lens, "states": states,
               "fit": fit_capacity(states, "t_forget"), "fit_relaxed": fit_capacity(states, "t_forget_relaxed"),
               "paper": {"slope_K_per_M": PAPER_FORGET_SLOPE, "intercept_K": PAPER_FORGET_INTERCEPT}}
    atomic_write_json(out / "summary.json", summary)
    md = write_table(cfg, summary, out)
    fig = plot(cfg, summary, out)
    wall = time.perf_counter() - t0
    write_run_config(out, dataclasses.asdict(cfg), wall, store.computed)
    if cfg.figures:
        (REPO / "figures").mkdir(exist_ok=True)
        shutil.copyfile(fig, REPO / "figures" / fig.name)
        shutil.copyfile(out / "summary.md", REPO / "figures" / "capacity_summary.md")
    print(md)
    print(f"[capacity] wall {wall:.0f}s, run folder {out}", file=sys.stderr)
    return summary


def _fmt_tf(tf: dict) -> str:
    text = {"above": f"> {tf['value']}", "at_or_below": f"<= {tf['value']}", None: str(tf["value"])}[tf["censored"]]
    return text + (" (non-monotone)" if tf.get("non_monotone") else "")


def write_table(cfg: CapacityConfig, summary: dict, out: Path) -> str:
    lens = summary["train_lens"]
    md = ["| n_layer | d_state x headdim | N_S | " + " | ".join(f"ratio T={t} (newline / text)" for t in lens)
          + f" | T_forget ({cfg.factor}x) | T_forget ({cfg.relaxed_factor}x, relaxed) |",
          "|---" * (5 + len(lens)) + "|"]
    for s in summary["states"]:
        cells = [f"{s['points'][t]['probes']['newline']['ratio']:.2f} / {s['points'][t]['probes']['text']['ratio']:.2f}"
                 for t in lens]
        md.append(f"| {s['n_layer']} | {s['d_state']}x{s['headdim']} | {s['state_size']} | " + " | ".join(cells)
                  + f" | {_fmt_tf(s['t_forget'])} | {_fmt_tf(s['t_forget_relaxed'])} |")
    for name in ("fit", "fit_relaxed"):
        f = summary[name]
        label = f"{cfg.factor}x" if name == "fit" else f"{cfg.relaxed_factor}x (relaxed)"
        if f["fit"] is None:
            md.append(f"\nFit at {label}: {f['note']}.")
        else:
            ff = f["fit"]
            md.append(f"\nFit at {label}: T_forget = {ff['slope']:.4g} N_S + {ff['intercept']:.4g} tokens "
                      f"({1e3 * ff['slope']:.3g} tokens per 1K elements; paper {PAPER_FORGET_SLOPE}), "
                      f"R^2 = {ff['r2']:.4f}, n = {ff['n']}. {f['note']}")
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "summary.md", text)
    return text


def plot(cfg: CapacityConfig, summary: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, s in enumerate(summary["states"]):
        ts = sorted(s["points"])
        for probe, ls in (("newline", "-o"), ("text", "--s")):
            a1.plot(ts, [s["points"][t]["probes"][probe]["ratio"] for t in ts], ls, color=f"C{i}", ms=4,
                    label=f"L={s['n_layer']} n={s['d_state']} p={s['headdim']} ({probe})")
    a1.axhline(cfg.factor, color="r", lw=1, label=f"paper criterion {cfg.factor}x")
    a1.axhline(cfg.relaxed_factor, color="r", lw=0.8, ls=":", label=f"relaxed {cfg.relaxed_factor}x")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("T_train (tokens)")
    a1.set_ylabel("max loss beyond T / max within T")
    a1.set_title(f"collapse ratio (eval to {cfg.eval_length} tokens)", fontsize=9)
    a1.legend(fontsize=6)
    # relaxed first, then the paper's 2x as larger hollow markers on top (they often coincide)
    for key, mk, lab in (("t_forget_relaxed", "s", f"{cfg.relaxed_factor}x"), ("t_forget", "o", f"{cfg.factor}x")):
        for s in summary["states"]:
            tf = s[key]
            style = {"above": "^", "at_or_below": "v", None: mk}[tf["censored"]]
            a2.plot(s["state_size"] / 1e3, tf["value"], style, color="C0" if key == "t_forget" else "C1",
                    mfc="none" if (tf["censored"] or key == "t_forget") else None,
                    ms=11 if key == "t_forget" else 6, mew=1.5)
        f = summary["fit" if key == "t_forget" else "fit_relaxed"]["fit"]
        xs = np.array([s["state_size"] for s in summary["states"]], float)
        if f is not None:
            grid = np.linspace(xs.min(), xs.max(), 50)
            a2.plot(grid / 1e3, f["slope"] * grid + f["intercept"], color="C0" if key == "t_forget" else "C1",
                    label=f"fit {lab}: {1e3 * f['slope']:.3g} tok/K elem, R^2={f['r2']:.3f}")
        else:
            a2.plot([], [], mk, color="C0" if key == "t_forget" else "C1", label=f"{lab}: no fit")
    xs = np.array([s["state_size"] for s in summary["states"]], float)
    grid = np.linspace(0, xs.max() * 1.1, 50)
    a2.plot(grid / 1e3, PAPER_FORGET_SLOPE * 1e-3 * grid, "k:",
            label=f"paper's slope, {PAPER_FORGET_SLOPE} tok/K elem, drawn through 0\n(its law, "
                  f"{PAPER_FORGET_SLOPE} N_S[M] {PAPER_FORGET_INTERCEPT} [K], is < 0 below N_S = 864K)")
    a2.set_ylim(0, 1.5 * max(summary["train_lens"]))
    a2.set_xlabel("state size N_S (K elements)")
    a2.set_ylabel("T_forget (tokens)")
    a2.set_title("T_forget vs N_S (hollow ^: collapses at every T; v: at none)", fontsize=9)
    a2.legend(fontsize=6)
    fig.tight_layout()
    p = out / FIGURE_NAME
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> None:
    run(parse_config(CapacityConfig, argv, QUICK, __doc__.split("\n")[0]))


if __name__ == "__main__":
    main()
