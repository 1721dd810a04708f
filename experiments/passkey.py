"""Passkey retrieval at toy scale: how far back can a byte-level Mamba-2 fetch 5 digits, vs state size?

Commands (run from the repository root)
    # CPU-sized: 4 state sizes x 3 seeds, T_train = 128, contexts 128..4096 (~10 min per point on one busy thread)
    python -m experiments.passkey --quick --seeds 0,1,2
    # rerun after a kill: finished points are reused (a killed training resumes from its checkpoint)
    python -m experiments.passkey --quick --seeds 0,1,2
    # redraw the figures and the summary of a finished run folder (seconds, no training)
    python -m experiments.passkey --quick --replot
    # the default sweep (meant for a GPU or a long CPU run; its recipe is the quick one, untested at this size)
    python -m experiments.passkey --seeds 0,1,2

Paper
    Stuffed Mamba (arXiv 2410.07145), appendix "Passkey retrieval" and section "State capacity":
    filler text repeated to the target length, a needle "The passkey is XXXXX. Remember it. XXXXX is
    the passkey." at a depth, then "What is the passkey? The passkey is"; 5 random digits; greedy
    decoding of 5 tokens; correct iff the digits appear in the output. The paper's law for the
    longest context with >= 95% accuracy: T_recall = 4.756 (1.365^N_S - 1) - 0.742 (K tokens, N_S in
    M elements) - an exponential in the state size.

Protocol (numbered as the code below)
    1. make_prompt: filler cut to fill `length` bytes, the needle inserted at byte offset
       round(depth * filler_bytes), the question last (bytes = tokens: no tokenizer).
    2. Training rows (passkey_rows): passkey_share (3/4) of the rows are a passkey prompt of
       T_train + 1 - 5 bytes followed by its 5 answer digits (uniform random depth), the rest stdlib
       text (experiments/data.py): passkey examples mixed into language-model data at T_train. The
       loss of a passkey row is on its 5 answer bytes only, and those answers hold answer_loss_share
       (0.9) of the loss, the text the rest (passkey_rows says why; QUICK how the recipe was chosen).
    3. One Mamba-2 per state size and seed (Delta initialized in [1e-3, dt_max = 0.01]), trained by
       experiments/train.py with passkey_rows as its batch function (the loss weighted per target).
    4. evaluate: for every context length and depth, n prompts, greedy 5 bytes with the state
       carried; accuracy = share whose 5 output bytes contain the digits.
    5. T_recall(state, seed) = longest tested context such that it and every shorter one reach >= 95%
       mean accuracy over depths (0 if the shortest fails; censored, ">=", if the longest passes);
       over seeds the mean and 95% t interval of the uncensored values and the censored counts;
       exponential fit over the uncensored (N_S, T_recall) pairs when >= 3 state sizes have one
       (with exactly 3 points the 3-parameter fit is an exact interpolation, R^2 = 1, and tests
       nothing), shown next to the paper's law.

Outputs (run folder, default runs/passkey[_quick]/)
    config.json, points/*.json (one per (state, seed)), models/<point>/ (train.py runs),
    passkey_summary.json, passkey_summary.md, passkey_heatmap.png (accuracy over context length x
    depth per state size, mean over seeds), passkey_recall.png (T_recall vs N_S per seed, the fit
    and the paper's law).

Glossary
    C  context length of a prompt in bytes      d  needle depth in [0, 1] (0 = right after the start)
    N_S  state size (mitigations.state_size)    T  T_train
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
import matplotlib.ticker
import numpy as np
import torch

import mitigations as M

from experiments.common import add_flag, atomic_write_json, atomic_write_text, config_from_args, config_parser, flag
from experiments.data import Corpus
from experiments.measure import load_for_eval
from experiments.sweep import (PAPER_RECALL, ExpFit, Point, check_seeds_and_workers, exp_fit, final_train_loss,
                               finished_run, fmt_ci, grid_points, mean_ci, parse_states, point_key,
                               point_train_config, recipe, run_sweep, train_point_model, workers_flag)
from experiments.train import TrainConfig

# [SC] appendix: the passkey prompt
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey. "
QUESTION = "What is the passkey? The passkey is "
KEY_DIGITS = 5  # [SC]: 5 random digits, greedy decoding of 5 tokens
RECALL_ACCURACY = 0.95  # [SC]: the longest context with >= 95% accuracy
PASSKEY_STREAM_ID = 2  # keeps the passkey rows' random stream apart from data.py's streams
EVAL_SEED = 4242  # seed of the evaluation prompts (never a training (seed, step) stream)
FIGURE_PREFIX = "passkey"
HEATMAP_COLUMNS = 2  # heatmap panels per row (one per state size)


def overhead_bytes() -> int:
    """Bytes of a prompt that are not filler: the needle and the question."""
    return len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUESTION)


# ----------------------------------------------------------------------------------------------
# 1. The prompt
# ----------------------------------------------------------------------------------------------

def make_prompt(length: int, depth: float, key: str) -> tuple[bytes, int]:
    """A passkey prompt of exactly `length` bytes and the byte offset where its needle starts.

    filler_bytes = length - len(needle) - len(question); the filler is FILLER repeated and cut to
    filler_bytes; the needle goes in at offset round(depth * filler_bytes) (depth 0: first, 1: right
    before the question). Raises if the length cannot hold the needle and the question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ValueError(f"key must be {KEY_DIGITS} digits, got {key!r}")
    n_fill = length - overhead_bytes()
    if n_fill < 0:
        raise ValueError(f"length={length} is shorter than the needle + question ({overhead_bytes()} bytes)")
    fill = (FILLER * (n_fill // len(FILLER) + 1))[:n_fill]
    pos = round(depth * n_fill)
    text = fill[:pos] + NEEDLE.format(key=key) + fill[pos:] + QUESTION
    return text.encode("ascii"), pos


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    return ["".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# 2. Training rows: passkey examples mixed into LM data
# ----------------------------------------------------------------------------------------------

def n_passkey_rows(batch_size: int, passkey_share: float) -> int:
    """Passkey rows per step: round(passkey_share * b), at least 1 (else an error)."""
    n_pk = round(passkey_share * batch_size)
    if not 0.0 < passkey_share <= 1.0 or n_pk < 1:
        raise ValueError(f"passkey_share must be in (0, 1] and give >= 1 of the {batch_size} rows per step, "
                         f"got {passkey_share}")
    return n_pk


def passkey_rows(corpus, *, step: int, seed: int, batch_size: int, t_train: int, passkey_share: float,
                 answer_loss_share: float, answer_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (b, T+1), loss weights (b, T) float) for one step. A pure function of (seed, step).

    Rows 0 .. n_pk-1 (n_pk = round(passkey_share * b)) are passkey examples: a prompt of T+1-5 bytes
    (needle at a uniform random depth) followed by its 5 answer digits. The other rows are corpus text.
    The weights sum to 1, so that train.py's loss sum(w * ce) / sum(w) is
        loss = s * mean CE over the scored passkey targets + (1 - s) * mean CE over the text targets,
    s = answer_loss_share (s = 1 when there is no text row).
    answer_only=True: a passkey row scores only its 5 answer targets (the retrieval itself).
        Why: with every byte of a passkey row in the loss, the answer is 5 of ~T targets, next to
        filler that is trivially predictable and a first key that is pure noise (ln 10 per digit);
        our earlier --quick runs (T = 128, passkey rows every byte scored, 1 or 2 of 4 rows; 1500-2000
        steps) learned the answer's format ("99955") and no lookup: 0% in every cell.
    answer_only=False: every target of a passkey row counts.
    Why s is set apart from the share of rows: when each text row weighs as much as a passkey row
    (s = passkey_share), the text loss, large and easy to lower, dominates the first hundreds of steps,
    and some initializations never leave the plateau "any digit" (answer loss ln 10); see QUICK.
    """
    n_pk = n_passkey_rows(batch_size, passkey_share)
    if not 0.0 < answer_loss_share <= 1.0:
        raise ValueError(f"answer_loss_share must be in (0, 1], got {answer_loss_share}")
    n_text = batch_size - n_pk
    share = answer_loss_share if n_text else 1.0
    rows = corpus.batch(step, seed=seed, batch_size=batch_size, seq_len=t_train)  # (b, T+1): text rows
    weights = torch.zeros(batch_size, t_train)  # (b, T): weight of target rows[:, 1:]
    if n_text:
        weights[n_pk:] = (1.0 - share) / (n_text * t_train)  # the text's 1 - s, every target alike
    scored = KEY_DIGITS if answer_only else t_train  # scored targets per passkey row (the last ones)
    rng = np.random.default_rng([seed, step, PASSKEY_STREAM_ID])
    for i in range(n_pk):
        key = random_keys(rng, 1)[0]
        prompt, _ = make_prompt(t_train + 1 - KEY_DIGITS, float(rng.uniform()), key)
        rows[i] = torch.tensor(list(prompt + key.encode("ascii")), dtype=torch.long)
        weights[i, t_train - scored:] = share / (n_pk * scored)  # answer_only: targets T-5..T-1 = the digits
    return rows, weights


# ----------------------------------------------------------------------------------------------
# 4. Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_bytes(model, prompts: torch.Tensor, n_new: int, chunk: int) -> torch.Tensor:
    """Greedy decoding: the prompt in chunks with the state carried, then one model.step per new
    byte (O(1) per token). prompts (b, C) -> (b, n_new) new bytes (on the CPU)."""
    state, logits = None, None
    prompts = prompts.to(next(model.parameters()).device)
    for s in range(0, prompts.shape[1], chunk):
        logits, state = model(prompts[:, s:s + chunk], state)  # (b, c, V)
    nxt = logits[:, -1, :256].argmax(-1)  # (b,)
    out = [nxt]
    for _ in range(n_new - 1):
        step_logits, state = model.step(nxt, state)  # (b, V)
        nxt = step_logits[:, :256].argmax(-1)
        out.append(nxt)
    return torch.stack(out, 1).cpu()  # (b, n_new)


def evaluate(model, lengths: list[int], depths: list[float], n: int, chunk: int) -> np.ndarray:
    """Accuracy (len(lengths), len(depths)) of greedy 5-byte answers containing the key."""
    rng = np.random.default_rng(EVAL_SEED)
    acc = np.zeros((len(lengths), len(depths)))
    for i, C in enumerate(lengths):
        keys, prompts = [], []
        for d in depths:
            for key in random_keys(rng, n):
                keys.append(key)
                prompts.append(list(make_prompt(C, d, key)[0]))
        out = greedy_bytes(model, torch.tensor(prompts, dtype=torch.long), KEY_DIGITS, chunk)  # (D*n, 5)
        ok = [key.encode("ascii") in bytes(row.tolist()) for key, row in zip(keys, out)]
        acc[i] = np.asarray(ok, float).reshape(len(depths), n).mean(1)
    return acc


EXAMPLE_KEYS = ("48213", "70956")  # fixed keys whose greedy answers summary.json shows (what the model says)


def example_answers(model, length: int, depths: list[float], chunk: int) -> dict[str, str]:
    """'key@depth' -> the model's greedy 5 bytes, at the shortest context (for eyeballing failures)."""
    out = {}
    for key in EXAMPLE_KEYS:
        for d in (depths[0], depths[-1]):
            ans = greedy_bytes(model, torch.tensor([list(make_prompt(length, d, key)[0])]), KEY_DIGITS, chunk)
            out[f"{key}@{d:g}"] = bytes(ans[0].tolist()).decode("latin-1")
    return out


def recall_length(lengths: list[int], acc: np.ndarray, threshold: float = RECALL_ACCURACY) -> int:
    """Longest tested context C with every tested C' <= C at mean accuracy (over depths) >= threshold."""
    ok = acc.mean(1) >= threshold
    bad = np.flatnonzero(~ok)
    end = ok.size if bad.size == 0 else int(bad[0])
    return int(lengths[end - 1]) if end > 0 else 0


FLAT_GROWTH = 1e-3  # exp_fit's b - 1 below this: the "exponential" has degenerated to a straight line


def growth_str(b: float) -> str:
    """The fitted growth rate b for printing: 1.02, or (1+1.4e-06) when it is too close to 1 for 4 digits."""
    return f"{b:.4g}" if b - 1 >= FLAT_GROWTH else f"(1+{b - 1:.1e})"


def fit_recall(state_sizes: list[int], t_recalls: list[int], max_length: int):
    """(ExpFit or None, note): [SC]'s law T_recall = a (b^(N_S/1K) - 1) + c fitted to the state sizes
    whose T_recall is measured, i.e. 0 < T_recall < max_length. T_recall = 0 (no tested context
    passes) and T_recall = max_length (every one passes: only a lower bound) are censored and left out.
    The note says how many were censored and why there is no fit, that 3 points leave the 3-parameter
    law nothing to be tested on, and when b -> 1 (FLAT_GROWTH): the points do not rise faster than a
    line, so the best "exponential" is a line (the fit finds no exponential growth).
    """
    pts = [(x, y) for x, y in zip(state_sizes, t_recalls) if 0 < y < max_length]
    n_zero = sum(y == 0 for y in t_recalls)
    n_top = sum(y >= max_length for y in t_recalls)
    censored = f"{n_zero} with T_recall = 0 (even the shortest context fails), {n_top} with T_recall >= {max_length} " \
               f"(the longest tested context passes: a lower bound)"
    if len({x for x, _ in pts}) < 3:
        return None, (f"no exponential fit: {len(pts)} state size(s) with a measured T_recall (needs >= 3 distinct "
                      f"N_S); censored: {censored}")
    fit = exp_fit([x / 1e3 for x, _ in pts], [y for _, y in pts])  # N_S in K elements, T in tokens
    notes = []
    if len(pts) == 3:
        notes.append("3 points for 3 parameters: even a perfect fit would test nothing.")
    if fit.b - 1 < FLAT_GROWTH:
        notes.append(f"The growth rate came out b = 1 + {fit.b - 1:.1e}: the points rise no faster than a straight "
                     f"line in N_S, so the best exponential is a line, T_recall ~ {fit.a * math.log(fit.b):.3g} "
                     f"tokens per 1K elements x N_S + {fit.c:.3g} - no exponential growth in these data.")
    if n_zero + n_top:
        notes.append(f"Censored and left out of the fit: {censored}.")
    return fit, " ".join(notes)


# ----------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PasskeyConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    out_dir: str = flag("runs/passkey", "run folder")
    d_model: int = flag(64, "d, residual width (channels)")
    n_layer: int = flag(2, "number of Mamba-2 blocks")
    states: tuple[str, ...] = flag(("16x16", "32x16", "64x16", "128x32", "256x32"), "per-head states d_state x headdim")
    t_train: int = flag(256, "T_train in tokens: passkey rows and text rows have this many tokens")
    tokens_per_step: int = flag(2048, "tokens per optimizer step; rows = tokens_per_step / T_train")
    passkey_share: float = flag(0.75, "share of the rows that are passkey examples (the rest: corpus text)")
    answer_loss_share: float = flag(0.9, "share of the loss on the passkey rows' scored bytes (passkey_rows)")
    answer_only: bool = flag(True, "passkey rows score only their 5 answer bytes (passkey_rows says why)")
    steps: int = flag(3000, "optimizer steps per model")
    lr: float = flag(5e-3, "peak learning rate (warmup + cosine, train.py); why 5e-3: see QUICK")
    dt_max: float = flag(0.01, "upper end of the Delta init range (train.py's default is the official 0.1); "
                               "why: see QUICK")
    seeds: tuple[int, ...] = flag((0,), "seeds of the initialization and the training rows, comma-separated")
    lengths: tuple[int, ...] = flag((256, 512, 1024, 2048, 4096, 8192), "evaluated context lengths C (bytes)")
    depths: tuple[float, ...] = flag((0.0, 0.25, 0.5, 0.75, 1.0), "needle depths in [0, 1] (0 = right after the start)")
    n_eval: int = flag(10, "prompts per (C, depth)")
    chunk: int = flag(1024, "tokens per forward call during evaluation (state carried)")
    device: str = flag("cpu", "cpu | cuda | auto")
    workers: int = workers_flag()
    quick: bool = flag(False, "start from the CPU-sized QUICK values")

    def __post_init__(self):
        parse_states(self.states)
        if self.t_train + 1 - KEY_DIGITS < overhead_bytes():
            raise ValueError(f"--t_train must be >= {overhead_bytes() + KEY_DIGITS - 1} to hold a passkey example")
        if self.tokens_per_step % self.t_train:
            raise ValueError(f"--tokens_per_step {self.tokens_per_step} must be a multiple of --t_train {self.t_train}")
        n_passkey_rows(self.tokens_per_step // self.t_train, self.passkey_share)
        if not 0 < self.answer_loss_share <= 1:
            raise ValueError(f"--answer_loss_share must be in (0, 1], got {self.answer_loss_share}")
        dt_min = TrainConfig.dt_min  # the init range's lower end stays train.py's
        if not dt_min <= self.dt_max <= 1:
            raise ValueError(f"--dt_max must be in [{dt_min} (train.py's dt_min), 1], got {self.dt_max}")
        if self.lr <= 0 or self.steps < 1 or self.n_eval < 1:
            raise ValueError(f"need --lr > 0, --steps >= 1, --n_eval >= 1; got {self.lr}, {self.steps}, {self.n_eval}")
        if min(self.lengths) < overhead_bytes():
            raise ValueError(f"--lengths must be >= {overhead_bytes()} (needle + question)")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"--depths must lie in [0, 1], got {self.depths}")
        check_seeds_and_workers(self)


# The CPU-sized recipe, chosen with throw-away probes (same optimizer, schedule and weighted loss; 1000-
# 2000 steps on one thread; 16x16, 64x16, 256x32 states, seeds 0-2; in-window accuracy every 500 steps):
# - answer-only loss (passkey_rows): every byte scored, 1-2 of 4 rows passkey, learned no lookup at all.
# - 8 rows of T = 128 per step, 6 of them passkey examples, 2 text rows.
# - answer_loss_share 0.9, not the rows' 0.75: with 0.75, 64x16 (seed 1) sat on the "any digit"
#   plateau (answer loss ln 10 = 2.30) for 1500 steps, also with 16 rows per step; with 0.9 the same
#   model and seed reached 100% in-window accuracy by step 1000 (and 1.0, no text at all, by step 500).
#   With 0.9, every probe (3 sizes, 2 seeds each) was at >= 94% in-window accuracy by step 1500.
# - lr 5e-3 (rows share 0.75): 3e-3 left 16x16 at 10% after 2000 steps; 1e-2 never left the plateau
#   on 256x32 in 1500 steps.
# - dt_max 0.01 (a slower initial decay: memory of ~100 tokens from the start): with the official
#   0.1, 256x32 (seed 1) sat on the plateau for 2000 steps at lr 3e-3 and 5e-3; with 0.01 it learned.
# - 2000 steps: the slowest probe reached 98% at step 1500.
QUICK = dict(out_dir="runs/passkey_quick", states=("16x16", "64x16", "128x32", "256x32"), t_train=128,
             tokens_per_step=1024, steps=2000, lengths=(128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
             n_eval=10)
DESCRIPTION = "Passkey retrieval vs state size, per seed (see the module docstring)."


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(PasskeyConfig, DESCRIPTION, QUICK)
    add_flag(p, "replot", bool, False, "only redraw the figures and the summary from out_dir's points (no training)")
    return p


def run_point(cfg: PasskeyConfig, point: Point) -> dict:
    """Steps 2-5 for one (state, seed): train with passkey rows (resuming a killed run), evaluate."""
    n, p, seed = point.coords["d_state"], point.coords["headdim"], point.coords["seed"]
    corpus = Corpus.load()
    tcfg = point_train_config(Path(cfg.out_dir) / "models" / point.key, t_train=cfg.t_train,
                              tokens_per_step=cfg.tokens_per_step, steps=cfg.steps, seed=seed, device=cfg.device,
                              d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=n, headdim=p, lr=cfg.lr,
                              dt_max=cfg.dt_max, task="custom")
    t0 = time.perf_counter()
    model_dir = train_point_model(tcfg, lambda step: passkey_rows(
        corpus, step=step, seed=seed, batch_size=tcfg.batch_size, t_train=cfg.t_train, passkey_share=cfg.passkey_share,
        answer_loss_share=cfg.answer_loss_share, answer_only=cfg.answer_only))
    model = load_for_eval(model_dir, cfg.device)
    t1 = time.perf_counter()
    acc = evaluate(model, list(cfg.lengths), list(cfg.depths), cfg.n_eval, cfg.chunk)
    return {"state_size": M.state_size(model.config), "n_params": sum(q.numel() for q in model.parameters()),
            "final_loss": final_train_loss(tcfg.out_dir),
            "answer_loss": answer_loss(model, corpus, cfg, tcfg.batch_size, seed), "train_seconds": t1 - t0,
            "acc": acc.tolist(), "t_recall": recall_length(list(cfg.lengths), acc),
            "examples": example_answers(model, cfg.lengths[0], list(cfg.depths), cfg.chunk),
            "eval_seconds": time.perf_counter() - t1}


@torch.no_grad()
def answer_loss(model, corpus, cfg: PasskeyConfig, batch_size: int, seed: int) -> float:
    """Mean cross-entropy (nats per digit) of the 5 answer bytes on the passkey rows of step `cfg.steps`,
    a step training never saw (ln 10 = 2.30 = guessing digits; 0 = certain and right)."""
    rows, w = passkey_rows(corpus, step=cfg.steps, seed=seed, batch_size=batch_size, t_train=cfg.t_train,
                           passkey_share=cfg.passkey_share, answer_loss_share=cfg.answer_loss_share,
                           answer_only=True)
    n_pk = n_passkey_rows(batch_size, cfg.passkey_share)  # passkey rows come first
    rows = rows.to(next(model.parameters()).device)
    logits, _ = model(rows[:n_pk, :-1], return_state=False)  # (n_pk, T, V)
    ce = torch.nn.functional.cross_entropy(logits[:, -KEY_DIGITS:, :256].reshape(-1, 256),
                                           rows[:n_pk, -KEY_DIGITS:].reshape(-1))
    return float(ce)


def passkey_points(cfg: PasskeyConfig) -> list[Point]:
    grid = [{"d_state": n, "headdim": p} for n, p in parse_states(cfg.states)]
    return grid_points(grid, cfg.seeds, recipe(cfg, grid_fields=("states",)))


def summarize(cfg: PasskeyConfig, results: dict[str, dict]) -> dict:
    """Per state: the per-seed results, T_recall over seeds (uncensored mean and interval, censored
    counts), accuracy mean over seeds; the exponential fit over the uncensored (N_S, T_recall) pairs."""
    top, states = max(cfg.lengths), []
    for n, p in parse_states(cfg.states):
        per_seed = {str(s): results[point_key(d_state=n, headdim=p, seed=s)] for s in cfg.seeds}
        t_recalls = [r["t_recall"] for r in per_seed.values()]
        states.append({"d_state": n, "headdim": p, "state_size": next(iter(per_seed.values()))["state_size"],
                       "per_seed": per_seed, "acc_mean": np.mean([r["acc"] for r in per_seed.values()], 0).tolist(),
                       "t_recall": {**mean_ci(t for t in t_recalls if 0 < t < top),
                                    "censored_zero": sum(t == 0 for t in t_recalls),
                                    "censored_top": sum(t >= top for t in t_recalls)}})
    fit, fit_note = fit_recall([s["state_size"] for s in states for _ in s["per_seed"]],
                               [r["t_recall"] for s in states for r in s["per_seed"].values()], top)
    return {"states": states, "lengths": list(cfg.lengths), "depths": list(cfg.depths), "seeds": list(cfg.seeds),
            "fit": dataclasses.asdict(fit) if fit else None, "fit_note": fit_note}


def run(cfg: PasskeyConfig) -> dict:
    results = run_sweep(cfg, passkey_points(cfg), run_point, "passkey")
    return report(cfg, summarize(cfg, results), Path(cfg.out_dir))


def replot(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """The summary and figures of a finished run folder (or a committed results folder), from its
    points alone. out: where to write them (default: run_dir)."""
    cfg, results, out = finished_run(run_dir, out, PasskeyConfig, passkey_points)
    return report(cfg, summarize(cfg, results), out)


def report(cfg: PasskeyConfig, summary: dict, out: Path) -> dict:
    lengths, top = summary["lengths"], max(summary["lengths"])
    md = ["| d_state x headdim | N_S | T_recall per seed (>= 95%) | T_recall over seeds | final train loss | "
          "answer loss (nats/digit) | accuracy by context length (mean over seeds) | "
          f"greedy answers at C={lengths[0]}, first seed (key@depth -> output) |", "|---|---|---|---|---|---|---|---|"]
    for s in summary["states"]:
        rs = list(s["per_seed"].values())
        per_seed = ", ".join(f"{k}: " + (f">= {r['t_recall']}" if r["t_recall"] >= top else str(r["t_recall"]))
                             for k, r in s["per_seed"].items())
        tr = s["t_recall"]
        md.append(f"| {s['d_state']}x{s['headdim']} | {s['state_size']} | {per_seed} | {fmt_ci(tr)}; censored: "
                  f"{tr['censored_zero']} at 0, {tr['censored_top']} at >= {top} | "
                  f"{np.mean([r['final_loss'] for r in rs]):.3f} | {np.mean([r['answer_loss'] for r in rs]):.3f} | "
                  + ", ".join(f"{C}: {a:.2f}" for C, a in zip(lengths, np.asarray(s["acc_mean"]).mean(1))) + " | "
                  + ", ".join(f"{k} -> {v!r}" for k, v in rs[0]["examples"].items()) + " |")
    fit = summary["fit"]
    if fit is not None:
        md.append(f"\nFit: T_recall = {fit['a']:.4g} ({growth_str(fit['b'])}^(N_S/1K) - 1) + {fit['c']:.4g} tokens, "
                  f"R^2 = {fit['r2']:.4f} (n = {fit['n']} (state, seed) pairs). Paper: {PAPER_RECALL[0]} "
                  f"({PAPER_RECALL[1]}^(N_S/1M) - 1) + {PAPER_RECALL[2]} K tokens.")
    if summary["fit_note"]:
        md.append("\n" + summary["fit_note"])
    text = "\n".join(md) + "\n"
    atomic_write_json(out / f"{FIGURE_PREFIX}_summary.json", summary)
    atomic_write_text(out / f"{FIGURE_PREFIX}_summary.md", text)
    print(text)
    plot(cfg, summary, out)
    return summary


def plot(cfg: PasskeyConfig, summary: dict, out: Path) -> list[Path]:
    states, lengths, depths = summary["states"], summary["lengths"], summary["depths"]
    fit = ExpFit(**summary["fit"]) if summary["fit"] else None
    ncols = min(len(states), HEATMAP_COLUMNS)
    nrows = -(-len(states) // ncols)
    panel_w = max(3.5, 1.0 + 0.4 * len(lengths))  # inches: room for each context's tick label and cell value
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.0, 3.0 * nrows), squeeze=False,
                             layout="constrained")
    flat = axes.ravel().tolist()
    for ax in flat[len(states):]:
        ax.set_visible(False)
    for ax, s in zip(flat, states):
        acc = np.asarray(s["acc_mean"])  # (C, d)
        im = ax.imshow(acc.T, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(c) for c in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (bytes)")
        ax.set_ylabel("needle depth")
        beyond = sum(c <= cfg.t_train for c in lengths) - 0.5  # cell border after the last C <= T_train
        ax.axvline(beyond, color="w", lw=0.8, ls=":")
        ax.set_title(f"{s['d_state']}x{s['headdim']} (n x p), N_S = {s['state_size'] / 1e3:.1f}K: T_recall per seed "
                     + ",".join(str(r["t_recall"]) for r in s["per_seed"].values()), fontsize=8)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                ax.text(i, j, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=6,
                        color="w" if acc[i, j] < 0.5 else "k")
    fig.colorbar(im, ax=flat, shrink=0.6, label="accuracy")
    fig.suptitle(f"Passkey retrieval, byte-level Mamba-2 trained at T_train={cfg.t_train}, mean over "
                 f"{len(summary['seeds'])} seed(s) (n={cfg.n_eval} prompts per cell and seed; right of the dotted "
                 f"line: C > T_train)", fontsize=10)
    p1 = out / f"{FIGURE_PREFIX}_heatmap.png"
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    top = max(lengths)
    xs = np.array([s["state_size"] for s in states], float)
    pairs = np.array([(s["state_size"], r["t_recall"]) for s in states for r in s["per_seed"].values()], float)
    censored = pairs[:, 1] >= top  # the longest tested context passed: T_recall is only a lower bound
    ax.plot(pairs[~censored, 0] / 1e3, pairs[~censored, 1], "o", mfc="none",
            label="ours, per seed: longest context with >= 95% (0 = none)")
    for i, s in enumerate(states):  # the mean over the seeds with 0 < T_recall < top, with its 95% t interval
        m = s["t_recall"]
        if m["mean"] is not None:
            ax.errorbar(s["state_size"] / 1e3, m["mean"], fmt="s", color="C3", ms=6,
                        yerr=None if m["low"] is None else [[m["mean"] - max(m["low"], 0)], [m["high"] - m["mean"]]],
                        label="mean over seeds, 95% interval (n >= 2)" if i == 0 else None)
    if censored.any():
        ax.plot(pairs[censored, 0] / 1e3, pairs[censored, 1], "^", mfc="none",
                label=f"ours: >= {top} (every tested context passed)")
    if fit is not None:
        grid = np.linspace(xs.min(), xs.max(), 100) / 1e3
        line = f" = a line, {fit.a * math.log(fit.b):.3g} x + {fit.c:.3g}" if fit.b - 1 < FLAT_GROWTH else ""
        ax.plot(grid, fit(grid), "--", label=f"fit {fit.a:.3g}({growth_str(fit.b)}^x-1)+{fit.c:.3g}{line}\n"
                                             f"R^2={fit.r2:.3f} (n={fit.n}; x = N_S/1K)")
    a, b, c = PAPER_RECALL
    ax.set_xscale("log")  # the state sizes are spaced by factors, not steps
    ax.set_xticks(xs / 1e3, [f"{x / 1e3:.1f}" for x in xs], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("state size N_S (K elements, log scale)")
    ax.set_ylabel("T_recall (tokens)")
    ax.axhline(cfg.t_train, color="gray", ls=":", lw=0.8, label="T_train")
    ax.set_title(f"paper (N_S in M, T in K): T = {a}({b}^N_S - 1) {c}\n"
                 f"= ~{1e3 * (a * (b ** (xs.max() / 1e6) - 1) + c):.0f} tokens at our largest N_S", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / f"{FIGURE_PREFIX}_recall.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(PasskeyConfig, args, QUICK)
    replot(cfg.out_dir) if args.replot else run(cfg)
    print(f"[passkey] run folder {cfg.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
