"""The repeat-span text process: stationary byte text in which keeping the whole window pays.

Why this exists
    Tiny byte-level models trained on plain text use only 16-128 bytes of context (experiments/LOG.md),
    so their state is never stuffed and state collapse cannot even be asked about. In this process the
    next span of text, with probability p_repeat, repeats a span that started up to max_lag bytes back.
    A model predicts those repeats only if it keeps what it read up to max_lag ago; a model trained on
    rows of T_train = max_lag bytes therefore has reason to use its whole training window. The same
    process makes the training rows (train split of the corpus) and the held-out probe (held-out split),
    so the probe is locally in-distribution at every position: only the amount of carried context grows.

The process (one row; every span is SPAN_LEN bytes)
    1. start at a random offset of the base text (train or held-out documents of experiments/data.Corpus)
    2. for each span s = 0, 1, ...  (t = s * span_len bytes written so far):
         with probability p_repeat, if t >= span_len: draw a lag d uniformly from
             {span_len, ..., min(max_lag, t)} and write out[t - d : t - d + span_len]   (a repeat)
         otherwise write the next span_len bytes of the base text                     (fresh text)
    Repeats may repeat repeats. The source of a repeat always lies inside the last max_lag bytes, so an
    exact sliding window of r = max_lag bytes holds everything the process ever lets one predict: a
    model that keeps more than that can only lose by it. Stationary from t = max_lag on (before that
    the lag is cut at t).

Gate (a model uses its whole window): copy_margin = far-repeat accuracy - the same with the far half hidden
    far-repeat accuracy: the share of repeat bytes at in-span offset >= GATE_SKIP whose argmax
    prediction is right, counted only for repeats whose lag lies in the far half [max_lag / 2, max_lag]
    and whose targets lie inside the training window (positions 1..T from the zero state). The first
    bytes of a repeat cannot be predicted (nobody knows a repeat starts, nor where from); GATE_SKIP bytes
    are enough to find the source. Repeat bytes are text too, so a model that never copies still gets
    about 0.6 of them right at this scale: the gate is the margin over the same model reading only the
    last T / 8 bytes (a sliding window that hides every far source), on the same bytes.

Reading order: RecipeConfig -> repeat_span_rows (the generator) -> RecipeBatches (training batches,
a pure function of (seed, step)) -> probe_rows (held-out prompts) -> copy_margin (the gate).

Glossary
    T   max_lag: the longest lag of a repeat, set to the model's training length T_train
    b   rows    l  row length in bytes    S  span_len
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from experiments.data import Corpus

GATE_SKIP = 4  # bytes at the start of a repeat span left out of the gate's accuracy (see the docstring)
PROBE_SEED = 7_000_000  # seed of the held-out probe rows (training rows use the run seed)
VALIDATION_SEED = 7_000_001  # seed of the validation rows used to tune the fixes (disjoint from the probe's)
CALIBRATION_SEED = 7_000_002  # seed of the separate in-distribution rows the state-norm thresholds come from


@dataclass(frozen=True)
class RecipeConfig:
    """The process. max_lag is the T of T_train: models are trained on rows of max_lag bytes."""

    max_lag: int  # T: the longest lag of a repeat (bytes); the exact window that suffices
    span_len: int = 16  # S: bytes per span (a repeat copies one whole span)
    p_repeat: float = 0.5  # probability that a span repeats an earlier one

    def __post_init__(self):
        if self.span_len < GATE_SKIP + 1:
            raise ValueError(f"span_len must be > GATE_SKIP = {GATE_SKIP} (bytes left out of the gate), "
                             f"got {self.span_len}")
        if self.max_lag < self.span_len or self.max_lag % self.span_len:
            raise ValueError(f"max_lag must be a multiple of span_len = {self.span_len} and >= it, "
                             f"got {self.max_lag}")
        if not 0.0 <= self.p_repeat < 1.0:
            raise ValueError(f"p_repeat must be in [0, 1), got {self.p_repeat}")


@dataclass(frozen=True)
class Rows:
    """Rows of the process with what each byte is. All (b, l)."""

    ids: torch.Tensor  # long bytes
    repeat: torch.Tensor  # bool: the byte is part of a repeat span
    offset: torch.Tensor  # long: its offset inside its span (0 .. span_len - 1)
    lag: torch.Tensor  # long: the repeat's lag (0 for fresh text)


def repeat_span_rows(base: np.ndarray, cfg: RecipeConfig, n_rows: int, length: int,
                     rng: np.random.Generator) -> Rows:
    """n_rows rows of `length` bytes of the process over the base text (1-D uint8 array)."""
    S = cfg.span_len
    n_spans = -(-length // S)
    if n_spans * S + 1 > len(base):
        raise ValueError(f"rows of {length} bytes need a base text of more than {n_spans * S} bytes, "
                         f"got {len(base)}")
    ids = np.zeros((n_rows, n_spans * S), dtype=np.int64)
    lag = np.zeros((n_rows, n_spans), dtype=np.int64)
    ptr = rng.integers(0, len(base) - n_spans * S, size=n_rows)  # (b,) where the fresh text continues
    ar = np.arange(S)
    rows = np.arange(n_rows)[:, None]
    for s in range(n_spans):
        t = s * S
        rep = (rng.random(n_rows) < cfg.p_repeat) & (t >= S)  # (b,)
        hi = min(cfg.max_lag, t) // S  # lags are whole spans: S, 2S, ..., hi*S
        d = S * rng.integers(1, max(hi, 1) + 1, size=n_rows)  # (b,)
        src = np.where(rep[:, None], (t - d)[:, None] + ar, 0)  # (b, S) positions in the row
        fresh = base[ptr[:, None] + ar].astype(np.int64)  # (b, S)
        ids[:, t:t + S] = np.where(rep[:, None], ids[rows, src], fresh)
        lag[:, s] = np.where(rep, d, 0)
        ptr = ptr + np.where(rep, 0, S)
    ids, lag = ids[:, :length], np.repeat(lag, S, axis=1)[:, :length]
    offset = np.broadcast_to(np.arange(length) % S, ids.shape)
    return Rows(torch.from_numpy(ids), torch.from_numpy(lag > 0), torch.from_numpy(offset.copy()),
                torch.from_numpy(lag))


class RecipeBatches:
    """Training batches of the process for experiments/train.py (task "custom"): batch(step) is a pure
    function of (seed, step), rows of n_segments * seq_len + 1 bytes from the corpus's train split."""

    def __init__(self, corpus: Corpus, cfg: RecipeConfig, *, seed: int, batch_size: int, row_len: int):
        self.base, self.cfg, self.seed, self.batch_size, self.row_len = corpus.train, cfg, seed, batch_size, row_len

    def __call__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        return repeat_span_rows(self.base, self.cfg, self.batch_size, self.row_len, rng).ids  # (b, N*T+1)


def probe_rows(corpus: Corpus, cfg: RecipeConfig, n_rows: int, length: int, seed: int = PROBE_SEED,
               split: str = "heldout") -> Rows:
    """Held-out prompts of `length + 1` bytes (inputs [:, :-1], targets [:, 1:]). seed: PROBE_SEED for
    the test windows, VALIDATION_SEED for tuning, CALIBRATION_SEED for state-norm thresholds;
    split "train" draws from the training documents instead."""
    base = corpus.heldout if split == "heldout" else corpus.train
    return repeat_span_rows(base, cfg, n_rows, length + 1, np.random.default_rng(seed))


GATE_BLIND_FRACTION = 8  # the gate's blind reference reads a window of T / 8 bytes: no far source is in it


@torch.no_grad()
def copy_margin(logits: torch.Tensor, blind_logits: torch.Tensor, rows: Rows, cfg: RecipeConfig,
                stop: int | None = None) -> float:
    """The gate: far-repeat accuracy of the model minus its far-repeat accuracy on the same bytes when it
    reads only a window of T / GATE_BLIND_FRACTION bytes (blind_logits), which holds none of their
    sources. What reading the far half of the window adds, on the very same bytes (no base-rate
    difference between repeat and fresh text can pass it). Both logits (b, l, V) for inputs rows.ids[:, :l]."""
    return repeat_copy_accuracy(logits, rows, cfg, stop) - repeat_copy_accuracy(blind_logits, rows, cfg, stop)


@torch.no_grad()
def repeat_copy_accuracy(logits: torch.Tensor, rows: Rows, cfg: RecipeConfig, stop: int | None = None) -> float:
    """The gate: argmax accuracy on far repeats (lag in [max_lag/2, max_lag], offset >= GATE_SKIP) among
    the targets rows.ids[:, 1:stop+1]. logits: (b, l, V) for inputs rows.ids[:, :l]. nan if none."""
    l = logits.shape[1] if stop is None else min(stop, logits.shape[1])
    pred = logits[:, :l, :256].argmax(-1)  # (b, l)
    tgt = rows.ids[:, 1:l + 1].to(pred.device)
    lag, off = rows.lag[:, 1:l + 1].to(pred.device), rows.offset[:, 1:l + 1].to(pred.device)
    keep = (lag >= cfg.max_lag // 2) & (off >= GATE_SKIP)
    if not bool(keep.any()):
        return float("nan")
    return (pred == tgt)[keep].float().mean().item()
