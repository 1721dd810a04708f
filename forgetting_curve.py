"""The forgetting curve: how far back can a language model copy? A model-agnostic evaluator.

Paper: Liu et al., "Forgetting Curve: A Reliable Method for Evaluating Memorization Capability
for Long-context Models", arXiv 2410.04727 (EMNLP 2024); official code github.com/1azybug/ForgettingCurve.
Motivation for this project: Chen et al., "Stuffed Mamba", arXiv 2410.07145 (RNNs such as Mamba-2
report "infinite" context yet forget; the forgetting curve measures how much they really keep).

The protocol (paper section 2; our numbered steps, used in `forgetting_curve` below):
    For each dependency length L and each of n samples:
    1. Draw a span x of L tokens, and an unrelated span u of L tokens (disjoint from x).
    2. Build two sequences of 2L + 3 tokens:
           copy condition:  [BOS] x [BOS] x [EOS]     (target token x_j sits L+1 positions after its source)
           LM condition:    [BOS] u [BOS] x [EOS]     (same target x, but nothing to copy from)
    3. One teacher-forced forward pass per sequence; the prediction at position t is argmax of the
       logits there and is compared with the token at t+1.
    4. Accuracy = fraction of correct predictions over the LAST HALF of the second x only:
       ceil(L/2) tokens (the first half lets the model notice that copying is going on).
    Then per L: mean and std over samples of the copy and LM accuracies, and a paired test.

Reading a curve (paper section 2.2), with the exact rules used here (see `ForgettingCurve`):
    fine-grained memory   : mean copy accuracy >= threshold (default 0.99)
    coarse-grained memory : copy beats LM by a minimum effect size AND a paired sign-flip test says so
    amnesia               : neither (the prefix is ignored: copy ~ LM)
    A memory length is the end of the run of consecutive tested lengths, starting at the smallest,
    that are all in the regime; 0 when the smallest tested length already fails.

Reading order: `forgetting_curve` (the sweep) -> `make_layouts` (steps 1-2) -> `predict_scored`
(step 3, chunked for stateful models) -> `ForgettingCurve` (step 4 and the memory-length rules)
-> `paired_sign_flip_pvalue` -> `ForgettingCurve.plot` -> the command line at the bottom.

Glossary:
    b   batch (sequences per forward call)          L  dependency length (tokens in x)
    l   sequence length = 2L + 3                     V  logits size (vocabulary, maybe padded)
    n   samples per length                           k  number of tested lengths
    c   chunk size (tokens per call of a stateful model)

Deliberate differences from the official code (all written down where they happen):
    - No hard-coded BOS=1 / EOS=2: the caller names the special ids; otherwise a documented default
      (the smallest id absent from the data, and EOS = BOS), see `resolve_special_ids`.
    - Batched; long sequences of a stateful model (minimamba.Mamba2LM) run in chunks with the state
      carried along, so memory stays bounded (L >= 64K on a CPU); only the scored predictions are kept.
    - A fresh unrelated prefix u per sample (the official code reuses the corpus' last L tokens).
    - An out-of-memory error at one length stops the sweep but keeps (and saves) every length measured.
    - The memory lengths are computed, with an effect size in the coarse rule (paper section 2.2 notes
      that a bare p < 0.05 reports memory where both curves have collapsed).

This file imports only torch, numpy and the standard library (matplotlib inside `plot`); minimamba is
imported only by the command line:
    python forgetting_curve.py --checkpoint DIR --lengths 16 64 256 1024 --out runs/fc
    python forgetting_curve.py --from-json runs/fc/curve.json --out runs/fc     # redraw the figure only
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Constants (every default of the evaluator, with its unit and source)
# ------------------------------------------------------------------------------------------------

FORMAT = "minimamba.forgetting_curve/1"  # tag written into every JSON file
DEFAULT_N_SAMPLES = 10            # samples per length (paper / official code: 10)
DEFAULT_BATCH_SIZE = 8            # sequences per forward call (copy and LM rows share batches)
DEFAULT_CHUNK_SIZE = 4096         # tokens per call when chunking a stateful model (bounds memory:
                                  # b * c * V logits live at once instead of b * (2L+3) * V)
DEFAULT_THRESHOLD = 0.99          # fine-grained memory: mean copy accuracy >= 99% (paper section 2.2)
DEFAULT_MIN_EFFECT = 0.05         # coarse-grained memory: copy - LM >= 5 accuracy points (our choice:
                                  # large enough to reject the collapsed-curve case of paper 2.2,
                                  # where copy ~5-9% vs LM a few points lower)
DEFAULT_ALPHA = 0.05              # significance level of the paired test (official code: p < 0.05)
EXACT_TEST_MAX_N = 16             # enumerate all 2^n sign flips up to n = 16 (65536 patterns)
DEFAULT_N_RESAMPLES = 20_000      # Monte Carlo sign flips beyond that
PROGRESS_MIN_INTERVAL_S = 0.2     # progress bar redraw interval (seconds)


# ------------------------------------------------------------------------------------------------
# Special ids
# ------------------------------------------------------------------------------------------------

def resolve_special_ids(
    tokens: torch.Tensor | None, vocab_size: int | None, bos_id: int | None, eos_id: int | None
) -> tuple[int, int]:
    """The BOS and EOS ids of the layouts. Nothing is hard-coded.

    Rule when the caller gives none (a tokenizer without special tokens, e.g. raw bytes):
        BOS = the smallest id in range(vocab_size) that does not occur in `tokens`
              (with random tokens: 0, since random tokens are then drawn without it);
        EOS = BOS when eos_id is None (one separator id, as in tokenizers where BOS = EOS).
    For UTF-8 text read as bytes (vocab 256) this is byte 0 (NUL), which text files do not contain.
    When every id occurs in `tokens` there is no free id: pass bos_id explicitly.
    """
    if bos_id is None:
        if tokens is None:
            if vocab_size is None:
                raise ValueError("random tokens need vocab_size (the model's vocabulary size)")
            bos_id = 0
        else:
            size = vocab_size if vocab_size is not None else int(tokens.max()) + 1
            present = torch.zeros(size + 1, dtype=torch.bool)
            present[tokens.clamp(max=size)] = True
            free = (~present[:size]).nonzero().flatten()
            if free.numel() == 0:
                raise ValueError(
                    f"every id in range({size}) occurs in `tokens`, so no id is free to serve as the "
                    "BOS separator: pass bos_id= (and eos_id=) explicitly, e.g. the tokenizer's BOS")
            bos_id = int(free[0])
    if eos_id is None:
        eos_id = bos_id
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{name}={value} is outside range(vocab_size={vocab_size})")
    return int(bos_id), int(eos_id)


# ------------------------------------------------------------------------------------------------
# Sweep settings
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepConfig:
    """The resolved settings of one sweep (validated here, stored in the results' meta)."""

    lengths: tuple[int, ...]          # dependency lengths L (tokens of x), strictly increasing, >= 1
    n_samples: int                    # n: samples per length (paired: copy and LM share x)
    seed: int                         # data for length L comes from np.random.default_rng([seed, L])
    batch_size: int                   # b: sequences per forward call
    chunk_size: int | None            # c: tokens per call of a stateful model; None = one call
    bos_id: int                       # separator before each span (paper: the tokenizer's BOS)
    eos_id: int                       # final token (never scored; kept for the paper's layout)
    vocab_size: int | None            # random tokens are drawn from range(vocab_size) minus specials
    data: str                         # "random" or "text:<number of tokens>"

    def __post_init__(self):
        lengths = tuple(int(x) for x in self.lengths)
        object.__setattr__(self, "lengths", lengths)
        if not lengths:
            raise ValueError("lengths is empty: give at least one dependency length L >= 1")
        if any(x < 1 for x in lengths) or any(b <= a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"lengths must be strictly increasing integers >= 1, got {list(lengths)}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {self.chunk_size}")


# ------------------------------------------------------------------------------------------------
# Steps 1-2: the two layouts
# ------------------------------------------------------------------------------------------------

@dataclass
class Layouts:
    """The 2n sequences of one length: rows [0, n) copy condition, rows [n, 2n) LM condition."""

    ids: torch.Tensor        # (2n, 2L+3) long
    targets: torch.Tensor    # (2n, ceil(L/2)) long: the scored tokens (last half of the second x)
    first: int               # position of the first logit that is scored (predicts targets[:, 0])
    x_start: np.ndarray      # (n,) start of x in the token stream (-1 for random tokens)
    u_start: np.ndarray      # (n,) start of u in the token stream (-1 for random tokens)


def scored_slice(L: int) -> tuple[int, int]:
    """Logit positions [lo, hi) that are scored for dependency length L.

    Layout positions: 0 = BOS, 1..L = first span, L+1 = BOS, L+2..2L+1 = second x, 2L+2 = EOS.
    The logit at position t predicts token t+1, so x_j (at L+2+j) is predicted at L+1+j.
    Scored: j = L - ceil(L/2) .. L-1 (the last ceil(L/2) tokens of the second x), i.e.
        lo = L + 1 + floor(L/2),  hi = 2L + 1.
    """
    return L + 1 + L // 2, 2 * L + 1


def make_layouts(
    L: int, n: int, rng: np.random.Generator, *, bos_id: int, eos_id: int,
    tokens: torch.Tensor | None = None, vocab_size: int | None = None,
) -> Layouts:
    """Steps 1-2 for one length: n samples of x (and u), in both layouts.

    Natural text (`tokens` given): x and u are two non-overlapping windows of the stream, placed by
    two sorted uniform offsets in the slack N - 2L and randomly assigned to x and u; so u is disjoint
    from x and the stream needs N >= 2L tokens.
    Random tokens (`tokens` None): x and u drawn i.i.d. uniform from range(vocab_size) without the
    special ids.
    """
    ids = torch.empty(2 * n, 2 * L + 3, dtype=torch.long)                       # (2n, l)
    x_start = np.full(n, -1, dtype=np.int64)
    u_start = np.full(n, -1, dtype=np.int64)
    if tokens is None:
        allowed = np.setdiff1d(np.arange(vocab_size), [bos_id, eos_id])
        if allowed.size == 0:
            raise ValueError(f"vocab_size={vocab_size} leaves no ids besides the special ones")
        xs = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
        us = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
    else:
        N = tokens.numel()
        if N < 2 * L:
            raise ValueError(f"the token stream has {N} tokens; L={L} needs at least 2L={2 * L} "
                             "(two disjoint spans): give a longer text or smaller lengths")
        slack = N - 2 * L
        xs = torch.empty(n, L, dtype=torch.long)
        us = torch.empty(n, L, dtype=torch.long)
        for i in range(n):
            p1, p2 = np.sort(rng.integers(0, slack + 1, 2))
            a, b = int(p1), int(p2) + L                 # windows [a, a+L) and [b, b+L) never overlap
            if rng.integers(0, 2):
                a, b = b, a
            x_start[i], u_start[i] = a, b
            xs[i], us[i] = tokens[a:a + L], tokens[b:b + L]
    for rows, prefix in ((slice(0, n), xs), (slice(n, 2 * n), us)):
        ids[rows, 0] = bos_id
        ids[rows, 1:L + 1] = prefix
        ids[rows, L + 1] = bos_id
        ids[rows, L + 2:2 * L + 2] = xs
        ids[rows, 2 * L + 2] = eos_id
    lo, hi = scored_slice(L)
    targets = ids[:, lo + 1:hi + 1].clone()                                    # (2n, ceil(L/2))
    return Layouts(ids=ids, targets=targets, first=lo, x_start=x_start, u_start=u_start)


# ------------------------------------------------------------------------------------------------
# Step 3: predictions at the scored positions (any model; chunked with state for stateful ones)
# ------------------------------------------------------------------------------------------------

def accepts_state(model: Callable) -> bool:
    """True if the model's call takes a `state` keyword (minimamba.Mamba2LM.forward(input_ids, state))."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "state" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _logits_of(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits from a model output: a tensor, a tuple whose first element is the logits, or `.logits`."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(ids.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (b, l, V) = ({ids.shape[0]}, "
                         f"{ids.shape[1]}, V) (or a tuple starting with them, or an object with "
                         f".logits); got {shape}")
    return out


@torch.no_grad()
def predict_scored(
    model: Callable, ids: torch.Tensor, lo: int, hi: int, *, chunk_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE, vocab_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Step 3: argmax predictions at logit positions [lo, hi) of every row of `ids`.

    Args:
        ids: (B, l) long, on the model's device.
        chunk_size: None = one call per batch, model(ids_b) -> logits (b, l, V).
            An int c = the model carries state: model(ids_b[:, s:s+c], state=state) -> (logits, state),
            the state handed to the next chunk (minimamba.Mamba2LM streams exactly this way). Only the
            logits inside [lo, hi) are kept, so memory is O(b * c * V) whatever l is; chunks after
            position hi are skipped (a causal model's scored logits cannot depend on them).
        vocab_size: if given, the argmax runs over logits[..., :vocab_size] only (a padded vocabulary's
            extra rows are not tokens; minimamba pads to a multiple of 16); None = all V logits.
        on_batch: called with numbers of tokens processed (per chunk, and per batch), summing to
            ids.numel() (progress).
    Returns:
        (B, hi - lo) long predictions (on the model's device).
    """
    preds = []
    for r in range(0, ids.shape[0], batch_size):
        batch = ids[r:r + batch_size]                                            # (b, l)
        done = 0                                        # tokens of this batch reported so far
        if chunk_size is None:
            logits = _logits_of(model(batch), batch)                            # (b, l, V)
            preds.append(logits[:, lo:hi, :vocab_size].argmax(-1))              # (b, hi-lo)
            del logits
        else:
            state, pieces = None, []
            for s in range(0, hi, chunk_size):
                piece = batch[:, s:s + chunk_size]                              # (b, c)
                out = model(piece, state=state)
                if not isinstance(out, (tuple, list)) or len(out) < 2:
                    raise ValueError("with chunk_size set, the model must return (logits, state) when "
                                     f"called as model(ids, state=state); got {type(out).__name__}")
                logits, state = _logits_of(out, piece), out[1]                  # (b, c, V)
                a, z = max(lo, s), min(hi, s + piece.shape[1])
                if a < z:
                    pieces.append(logits[:, a - s:z - s, :vocab_size].argmax(-1))  # (b, z-a)
                del logits, out
                if on_batch is not None:                # progress per chunk (long L: minutes each)
                    on_batch(piece.numel())
                    done += piece.numel()
            preds.append(torch.cat(pieces, dim=1))                              # (b, hi-lo)
        if on_batch is not None:
            on_batch(batch.numel() - done)              # the rest of the batch (all of it unchunked)
    return torch.cat(preds, dim=0)


# ------------------------------------------------------------------------------------------------
# The paired test
# ------------------------------------------------------------------------------------------------

def paired_sign_flip_pvalue(diff: np.ndarray, *, n_resamples: int = DEFAULT_N_RESAMPLES,
                            seed: int = 0) -> float:
    """One-sided paired sign-flip (permutation) test of H1: mean(diff) > 0.

    Under H0 (the prefix does not matter) each paired difference d_i = copy_i - lm_i is as likely to
    be -d_i, so the observed mean is compared with the means of all 2^n sign patterns:
        p = #{s in {-1,+1}^n : mean(s * d) >= mean(d)} / 2^n            (exact, n <= 16)
        p = (1 + #{resampled s with mean(s * d) >= mean(d)}) / (1 + R)  (Monte Carlo, n > 16)
    The identity pattern is always counted, so p >= 2^-n: with n = 10 the smallest p is ~0.001, and
    n < 5 can never reach p < 0.05. All-zero differences give p = 1.
    """
    d = np.asarray(diff, dtype=np.float64).ravel()                             # (n,)
    n = d.size
    observed = d.mean()
    tol = 1e-12 * max(1.0, np.abs(d).max(initial=0.0))     # ties count as "at least as extreme"
    if n <= EXACT_TEST_MAX_N:
        patterns = np.arange(2 ** n)[:, None] >> np.arange(n)[None, :] & 1   # (2^n, n) bits
        signs = 2.0 * patterns - 1.0
        return float(np.mean(signs @ d / n >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, (n_resamples, n)) * 2.0 - 1.0                   # (R, n)
    return float((1 + np.sum(signs @ d / n >= observed - tol)) / (1 + n_resamples))


# ------------------------------------------------------------------------------------------------
# Step 4 and the memory-length rules: the result
# ------------------------------------------------------------------------------------------------

def _run_length(mask: np.ndarray, lengths: np.ndarray) -> int:
    """The end of the run of True starting at the smallest length; 0 if the first is False."""
    bad = np.flatnonzero(~mask)
    end = mask.size if bad.size == 0 else int(bad[0])
    return int(lengths[end - 1]) if end > 0 else 0


@dataclass
class ForgettingCurve:
    """Accuracies of one sweep, the memory-length rules, JSON save/load and the plot.

    Memory lengths (the exact rules; both return 0 when the model has no such memory):
      fine_grained_length(threshold):  in regime at L  <=>  mean_i copy_acc[L, i] >= threshold.
      coarse_grained_length(min_effect, alpha):  in regime at L  <=>
          mean_i (copy_acc[L, i] - lm_acc[L, i]) >= min_effect       (effect size, accuracy points)
          AND paired_sign_flip_pvalue(copy - lm) < alpha              (one-sided, paired by sample).
      The length reported is the largest tested L such that EVERY tested L' <= L is in the regime
      (the end of the contiguous run from the smallest tested length), not the largest L anywhere in
      the regime: with 30 lengths tested at alpha = 0.05 about 1.5 false positives are expected, and
      a lone in-regime length far beyond a failure is noise rather than memory. Consequences: the
      answer is a lower bound limited by the grid (the truth lies between it and the next tested
      length); 0 when the smallest tested length already fails; if the sweep stopped at an error
      (`errors`) and all measured lengths are in the regime, the true memory may be longer.
    Fine-grained usually implies coarse-grained, but not when the LM accuracy is itself close to 1
    (very predictable text): then copy - LM < min_effect and the fine length can exceed the coarse.
    """

    lengths: np.ndarray                      # (k,) int: dependency lengths L
    copy_acc: np.ndarray                     # (k, n) float: copy-condition accuracy per sample
    lm_acc: np.ndarray                       # (k, n) float: LM-condition accuracy per sample
    seconds: np.ndarray = None               # (k,) float: wall time per length
    errors: dict[int, str] = field(default_factory=dict)   # L -> error that stopped the sweep there
    meta: dict[str, Any] = field(default_factory=dict)     # sweep settings, versions, data source

    def __post_init__(self):
        self.lengths = np.asarray(self.lengths, dtype=np.int64).reshape(-1)
        k = self.lengths.size
        n = int(self.meta.get("n_samples", np.asarray(self.copy_acc).size // max(k, 1)))
        self.copy_acc = np.asarray(self.copy_acc, dtype=np.float64).reshape(k, -1 if k else n)
        self.lm_acc = np.asarray(self.lm_acc, dtype=np.float64).reshape(k, -1 if k else n)
        if self.seconds is None:
            self.seconds = np.full(k, np.nan)
        self.seconds = np.asarray(self.seconds, dtype=np.float64).reshape(k)
        self.errors = {int(key): str(v) for key, v in self.errors.items()}
        if self.copy_acc.shape != self.lm_acc.shape:
            raise ValueError(f"copy_acc {self.copy_acc.shape} and lm_acc {self.lm_acc.shape} differ")

    # ---- summary statistics ----
    @property
    def copy_mean(self) -> np.ndarray:       # (k,)
        return self.copy_acc.mean(axis=1)

    @property
    def lm_mean(self) -> np.ndarray:         # (k,)
        return self.lm_acc.mean(axis=1)

    def p_values(self, *, n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0) -> np.ndarray:
        """(k,) one-sided paired sign-flip p-values of copy > LM, one per length."""
        return np.array([paired_sign_flip_pvalue(c - m, n_resamples=n_resamples, seed=seed)
                         for c, m in zip(self.copy_acc, self.lm_acc)])

    # ---- the two rules ----
    def fine_mask(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """(k,) bool: mean copy accuracy >= threshold."""
        return self.copy_mean >= threshold

    def coarse_mask(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA, *,
                    n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0) -> np.ndarray:
        """(k,) bool: mean(copy - LM) >= min_effect and paired p-value < alpha."""
        n = self.copy_acc.shape[1]
        if 2.0 ** -n >= alpha:
            raise ValueError(f"with n_samples={n} the smallest attainable p-value is 2^-{n} = "
                             f"{2.0 ** -n:.3g} >= alpha={alpha}: nothing can be significant; "
                             "measure more samples per length or raise alpha")
        effect = (self.copy_acc - self.lm_acc).mean(axis=1)
        return (effect >= min_effect) & (self.p_values(n_resamples=n_resamples, seed=seed) < alpha)

    def fine_grained_length(self, threshold: float = DEFAULT_THRESHOLD) -> int:
        """Largest tested L with every tested L' <= L at mean copy accuracy >= threshold; 0 if none."""
        return _run_length(self.fine_mask(threshold), self.lengths)

    def coarse_grained_length(self, min_effect: float = DEFAULT_MIN_EFFECT,
                              alpha: float = DEFAULT_ALPHA, *, n_resamples: int = DEFAULT_N_RESAMPLES,
                              seed: int = 0) -> int:
        """Largest tested L with every tested L' <= L in the coarse regime (see class doc); 0 if none."""
        mask = self.coarse_mask(min_effect, alpha, n_resamples=n_resamples, seed=seed)
        return _run_length(mask, self.lengths)

    def summary(self, threshold: float = DEFAULT_THRESHOLD, min_effect: float = DEFAULT_MIN_EFFECT,
                alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
        """The memory lengths with the rule parameters that produced them (JSON-ready)."""
        out: dict[str, Any] = {"fine_grained_length": self.fine_grained_length(threshold),
                               "threshold": threshold, "min_effect": min_effect, "alpha": alpha}
        n = self.copy_acc.shape[1]
        out["coarse_grained_length"] = (self.coarse_grained_length(min_effect, alpha)
                                        if 2.0 ** -n < alpha and self.lengths.size else None)
        out["stopped_by_error"] = bool(self.errors)
        return out

    def table(self) -> str:
        """A plain-text table: L, copy mean +- std, LM mean +- std, p-value."""
        p = self.p_values() if self.lengths.size else []
        rows = [f"{'L':>8} {'copy':>15} {'LM':>15} {'p':>8}"]
        for L, c, m, pv in zip(self.lengths, self.copy_acc, self.lm_acc, p):
            rows.append(f"{L:>8d} {c.mean():7.4f}+-{c.std():.4f} {m.mean():7.4f}+-{m.std():.4f} "
                        f"{pv:8.4f}")
        rows += [f"{L:>8d} error: {e}" for L, e in self.errors.items()]
        return "\n".join(rows)

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "lengths": self.lengths.tolist(), "copy_acc": self.copy_acc.tolist(),
                "lm_acc": self.lm_acc.tolist(), "seconds": [None if math.isnan(s) else s
                                                            for s in self.seconds.tolist()],
                "errors": {str(k): v for k, v in self.errors.items()}, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file + os.replace), with the memory-length summary added."""
        data = self.to_dict()
        if self.lengths.size:
            data["summary"] = self.summary()        # convenience copy; load() recomputes, never reads it
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ForgettingCurve":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a forgetting-curve file (format {data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        seconds = [math.nan if s is None else s for s in data.get("seconds", [])] or None
        return cls(lengths=data["lengths"], copy_acc=data["copy_acc"], lm_acc=data["lm_acc"],
                   seconds=seconds, errors=data.get("errors", {}), meta=data.get("meta", {}))

    # ---- the figure ----
    def plot(self, path: str | os.PathLike, train_length: int | None = None, *, title: str | None = None,
             threshold: float = DEFAULT_THRESHOLD, min_effect: float = DEFAULT_MIN_EFFECT,
             alpha: float = DEFAULT_ALPHA) -> None:
        """Copy and LM accuracy (mean, +-1 std band) vs L; fine / coarse / amnesia regions shaded.

        Regions follow the rules above: fine = tested lengths up to the fine-grained length, coarse =
        beyond it up to the coarse-grained length, amnesia = beyond both. `train_length` draws a
        vertical marker at L = the model's training context length (dependencies of that distance
        were the longest seen in training; the whole sequence is 2L + 3 tokens).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global backend
        from matplotlib.figure import Figure

        if self.lengths.size == 0:
            raise ValueError("nothing to plot: the curve has no measured lengths")
        L = self.lengths.astype(float)
        fig = Figure(figsize=(7.5, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        log_x = L.size > 1 and L[-1] / L[0] >= 10
        if log_x:
            from matplotlib.ticker import FuncFormatter
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(
                lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
        # region edges halfway between tested lengths (geometric midpoints on a log axis)
        mid = np.sqrt(L[1:] * L[:-1]) if log_x else (L[1:] + L[:-1]) / 2
        left = L[0] / 1.25 if log_x else max(0.0, L[0] - 0.5 * (L[1] - L[0] if L.size > 1 else 1))
        right = L[-1] * 1.25 if log_x else L[-1] + 0.5 * (L[-1] - L[-2] if L.size > 1 else 1)
        edges = np.concatenate([[left], mid, [right]])              # (k+1,)

        def edge_after(length: int) -> float:
            return edges[int(np.searchsorted(self.lengths, length)) + 1] if length else edges[0]

        fine = self.fine_grained_length(threshold)
        n = self.copy_acc.shape[1]
        coarse = self.coarse_grained_length(min_effect, alpha) if 2.0 ** -n < alpha else 0
        e_fine, e_coarse = edge_after(fine), max(edge_after(coarse), edge_after(fine))
        if fine:
            ax.axvspan(edges[0], e_fine, color="tab:green", alpha=0.12,
                       label=f"fine-grained (copy >= {threshold:g}): L <= {fine}")
        if e_coarse > e_fine:
            ax.axvspan(e_fine, e_coarse, color="tab:orange", alpha=0.12,
                       label=f"coarse-grained (copy - LM >= {min_effect:g}, p < {alpha:g}): L <= {coarse}")
        ax.axvspan(e_coarse, edges[-1], color="tab:gray", alpha=0.12, label="amnesia")
        # LM first and dashed, copy on top: where the curves coincide (amnesia) both stay visible
        for acc, name, color, style in ((self.lm_acc, "LM", "tab:red", "s--"),
                                        (self.copy_acc, "copy", "tab:blue", "o-")):
            mean, std = acc.mean(axis=1), acc.std(axis=1)
            ax.plot(L, mean, style, color=color, ms=3, lw=1.2, label=f"{name} accuracy")
            ax.fill_between(L, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color,
                            alpha=0.25, lw=0)
        if train_length is not None:
            ax.axvline(train_length, color="k", ls="--", lw=1, label=f"training length {train_length}")
        lo_x, hi_x = edges[0], edges[-1]
        if train_length is not None:             # keep the marker in view
            lo_x, hi_x = min(lo_x, train_length / 1.25 if log_x else train_length), max(hi_x, train_length * 1.1)
        ax.set_xlim(lo_x, hi_x)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("dependency length L (tokens)")
        ax.set_ylabel(f"accuracy, last half of x (mean +- std, n={n})")
        ax.set_title(title or "Forgetting curve", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)


# ------------------------------------------------------------------------------------------------
# Progress bar (stdlib, stderr)
# ------------------------------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on stderr, weighted by tokens processed."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.done, self.start, self.last, self.info = 0, time.time(), 0.0, ""

    def update(self, n: int = 0, info: str | None = None, force: bool = False) -> None:
        self.done += n
        if info is not None:
            self.info = info
        now = time.time()
        if not self.enabled or (not force and now - self.last < PROGRESS_MIN_INTERVAL_S):
            return
        self.last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        elapsed = now - self.start
        eta = f"~{elapsed / frac - elapsed:.0f}s left" if frac > 0 else "? left"
        sys.stderr.write(f"\rforgetting curve [{bar}] {100 * frac:5.1f}% {self.info} "
                         f"{elapsed:.0f}s elapsed, {eta} ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------

def _is_out_of_memory(err: BaseException) -> bool:
    """Out-of-memory errors (CUDA, CPU allocator, Python) that end a sweep without losing it."""
    oom_types = tuple(t for t in (MemoryError, getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(err, oom_types):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def forgetting_curve(
    model: Callable, *, lengths: Sequence[int], tokens: torch.Tensor | None = None,
    vocab_size: int | None = None, n_samples: int = DEFAULT_N_SAMPLES, bos_id: int | None = None,
    eos_id: int | None = None, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int | None | str = "auto", device: torch.device | str | None = None,
    out: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> ForgettingCurve:
    """Measure the forgetting curve of `model` at each dependency length (protocol in the module doc).

    Args:
        model: a callable taking a LongTensor (b, l) and returning logits (b, l, V), a tuple whose first
            element is the logits (minimamba.Mamba2LM), or an object with `.logits` (Hugging Face).
            Assumed causal. An nn.Module in training mode is switched to eval() for the sweep and back.
        lengths: dependency lengths L, strictly increasing (each sequence has 2L + 3 tokens).
        tokens: (N,) long stream of natural text (x and disjoint u are windows of it; N >= 2 * max L),
            or None for random tokens from range(vocab_size) without the special ids.
        vocab_size: the model's vocabulary size. Needed for random tokens; with text it bounds the
            search for a free BOS id. When given, predictions are the argmax over the first
            vocab_size logits (padded rows are ignored); None = argmax over all V logits.
        n_samples: n, samples per length; copy and LM rows of a sample share the same x (paired).
        bos_id, eos_id: the separator and end ids; None -> `resolve_special_ids` (smallest id absent
            from the data, EOS = BOS).
        seed: data for length L is drawn from np.random.default_rng([seed, L]), so a length's result
            does not depend on which other lengths are swept (and a sweep can be extended later).
        batch_size: sequences per forward call.
        chunk_size: "auto" (default) = DEFAULT_CHUNK_SIZE if the model's call accepts a `state` keyword
            (a stateful model such as minimamba.Mamba2LM), else None; None = the whole sequence in one
            call; an int = run each sequence in chunks of that many tokens, calling
            model(ids, state=state) -> (logits, state) and carrying the state (the model must accept it).
        device: where the inputs go; default: the device of the model's first parameter, else CPU.
        out: optional JSON path; rewritten atomically after every length, so a killed or failed
            sweep keeps every length already measured.
        resume: reuse the lengths already in `out` (a killed sweep, or a grid extended later) and
            measure only the others. Since each length has its own seed the result equals a fresh
            run. The file's n_samples, seed, bos_id, eos_id, vocab_size and data must match (else
            ValueError); its recorded errors are dropped, so those lengths are tried again, and
            lengths of the file that are not in `lengths` are left out of the result.
        progress: draw a progress bar on stderr.
        meta: extra JSON-able information stored with the result (e.g. checkpoint, data source).
    Returns:
        A ForgettingCurve. An out-of-memory error at some length stops the sweep: the lengths already
        measured are returned (and saved) and the error is recorded in `errors`. Any other exception
        propagates after the measured lengths were saved to `out`.
    """
    # resolve the settings
    if tokens is not None:
        tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
        if tokens.numel() == 0 or int(tokens.min()) < 0:
            raise ValueError("tokens must be a non-empty 1-D stream of non-negative token ids")
        if vocab_size is not None and int(tokens.max()) >= vocab_size:
            raise ValueError(f"tokens hold id {int(tokens.max())} >= vocab_size={vocab_size}")
    try:
        json.dumps(meta or {})
    except TypeError as err:
        raise ValueError(f"meta must be JSON-serializable (it is saved with the results): {err}") from None
    if tokens is None and vocab_size is None:
        raise ValueError("random tokens (tokens=None) need vocab_size=, the model's vocabulary size")
    bos_id, eos_id = resolve_special_ids(tokens, vocab_size, bos_id, eos_id)
    if chunk_size == "auto":
        chunk_size = DEFAULT_CHUNK_SIZE if accepts_state(model) else None
    elif isinstance(chunk_size, str):
        raise ValueError(f"chunk_size must be 'auto', None or an int, got {chunk_size!r}")
    elif chunk_size is not None and not accepts_state(model):
        raise ValueError(f"chunk_size={chunk_size} needs a model whose call accepts state= and returns "
                         "(logits, state); this one does not: use chunk_size=None")
    cfg = SweepConfig(lengths=tuple(lengths), n_samples=n_samples, seed=seed, batch_size=batch_size,
                      chunk_size=chunk_size, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
                      data="random" if tokens is None else f"text:{tokens.numel()}")
    if tokens is not None and tokens.numel() < 2 * cfg.lengths[-1]:
        raise ValueError(f"the token stream has {tokens.numel()} tokens but the largest length "
                         f"{cfg.lengths[-1]} needs 2L = {2 * cfg.lengths[-1]}: give more text")
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()

    curve = ForgettingCurve(lengths=np.zeros(0, np.int64), copy_acc=np.zeros((0, n_samples)),
                            lm_acc=np.zeros((0, n_samples)), seconds=np.zeros(0),
                            meta={**asdict(cfg), "lengths": list(cfg.lengths), "torch": torch.__version__,
                                  "numpy": np.__version__, "device": str(device), **(meta or {})})
    done: dict[int, tuple] = {}                      # L -> (copy (n,), lm (n,), seconds) from `out`
    if resume and out is not None and Path(out).exists():
        prev = ForgettingCurve.load(out)
        keys = ("n_samples", "seed", "bos_id", "eos_id", "vocab_size", "data")
        diff = {k: (prev.meta.get(k), curve.meta[k]) for k in keys if prev.meta.get(k) != curve.meta[k]}
        if diff:
            raise ValueError(f"cannot resume from {out}: settings differ (file, now): {diff}")
        done = {int(L): (c, m, t) for L, c, m, t in zip(prev.lengths, prev.copy_acc, prev.lm_acc, prev.seconds)}
    total = sum(2 * n_samples * (2 * L + 3) for L in cfg.lengths if L not in done)
    bar = _Progress(total, progress)
    rows: dict[str, list] = {"lengths": [], "copy": [], "lm": [], "seconds": []}
    errors: dict[int, str] = {}

    def snapshot() -> ForgettingCurve:
        """The curve of every length so far, saved atomically to `out` if given."""
        now = ForgettingCurve(lengths=rows["lengths"], copy_acc=rows["copy"], lm_acc=rows["lm"],
                              seconds=rows["seconds"], errors=errors, meta=curve.meta)
        if out is not None:
            now.save(out)
        return now

    try:
        for L in cfg.lengths:
            if L in done:                            # measured by an earlier (killed) run
                for key, value in zip(("copy", "lm", "seconds"), done[L]):
                    rows[key].append(value)
                rows["lengths"].append(L)
                continue
            bar.update(info=f"L={L}", force=True)
            t0 = time.time()
            try:
                # steps 1-2: data and layouts (numpy generator seeded by (seed, L))
                lay = make_layouts(L, n_samples, np.random.default_rng([seed, L]), bos_id=bos_id,
                                   eos_id=eos_id, tokens=tokens, vocab_size=vocab_size)
                # step 3: teacher-forced argmax at the scored positions only
                lo, hi = scored_slice(L)
                pred = predict_scored(model, lay.ids.to(device), lo, hi, chunk_size=chunk_size,
                                      batch_size=batch_size, vocab_size=vocab_size,
                                      on_batch=bar.update)                      # (2n, ceil(L/2))
            except Exception as err:                                           # noqa: BLE001
                if not _is_out_of_memory(err):
                    raise
                errors[L] = f"{type(err).__name__}: {err}"
                del err
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()                 # give the failed attempt's memory back
                break
            # step 4: accuracy over the last half of the second x
            acc = (pred.cpu() == lay.targets).double().mean(dim=1).numpy()       # (2n,)
            rows["lengths"].append(L)
            rows["copy"].append(acc[:n_samples])
            rows["lm"].append(acc[n_samples:])
            rows["seconds"].append(time.time() - t0)
            snapshot()                                       # nothing measured is lost from here on
    finally:
        bar.close()
        if was_training:
            model.train()
    return snapshot()


# ------------------------------------------------------------------------------------------------
# Command line (the only place that imports minimamba)
# ------------------------------------------------------------------------------------------------

def default_text_files() -> list[Path]:
    """The default text: the Python standard library's top-level *.py files, sorted by name
    (always installed, so every machine can reproduce the run)."""
    import sysconfig
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_byte_tokens(paths: Sequence[str | os.PathLike], max_tokens: int | None = None) -> torch.Tensor:
    """Files concatenated (in the given order) and read as bytes: (N,) long ids in range(256)."""
    data = bytearray()
    for p in paths:
        data += Path(p).read_bytes()
        if max_tokens is not None and len(data) >= max_tokens:
            break
    data = bytes(data[:max_tokens] if max_tokens is not None else data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main(argv: Sequence[str] | None = None) -> ForgettingCurve:
    ap = argparse.ArgumentParser(description="Forgetting curve of a minimamba.Mamba2LM checkpoint "
                                 "(byte tokens from text files, or random tokens).")
    ap.add_argument("--checkpoint", help="a Mamba2LM.from_pretrained directory")
    ap.add_argument("--lengths", type=int, nargs="+", help="dependency lengths L")
    ap.add_argument("--from-json", default=None, help="only redraw OUT/curve.png from this curve.json "
                    "(no model is run; --train-length and --title apply)")
    ap.add_argument("--title", default=None, help="plot title")
    ap.add_argument("--out", required=True, help="output folder (curve.json, curve.png)")
    ap.add_argument("--text", nargs="*", default=None,
                    help="text files read as bytes (default: the stdlib's top-level *.py files)")
    ap.add_argument("--random-tokens", action="store_true", help="random tokens instead of text")
    ap.add_argument("--max-text-bytes", type=int, default=None, help="truncate the text stream")
    ap.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                    help="tokens per forward call, the state carried between chunks; 0 = one call")
    ap.add_argument("--bos-id", type=int, default=None, help="default: smallest id absent from data")
    ap.add_argument("--eos-id", type=int, default=None, help="default: = BOS")
    ap.add_argument("--train-length", type=int, default=None, help="marker on the plot")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.from_json:
        curve = ForgettingCurve.load(args.from_json)
        train_length = args.train_length if args.train_length is not None else curve.meta.get("train_length")
        curve.plot(out / "curve.png", train_length=train_length, title=args.title)
        print(curve.table())
        print(json.dumps(curve.summary()))
        return curve
    if args.checkpoint is None or args.lengths is None:
        ap.error("--checkpoint and --lengths are required (unless --from-json)")

    import minimamba  # the CLI is the only place that needs it
    model = minimamba.Mamba2LM.from_pretrained(args.checkpoint).to(args.device).eval()
    vocab_size = model.config.vocab_size
    meta: dict[str, Any] = {"checkpoint": str(args.checkpoint), "command": " ".join(sys.argv)}
    if args.random_tokens:
        tokens = None
        meta["text"] = "random"
    else:
        files = [Path(p) for p in args.text] if args.text else default_text_files()
        tokens = read_byte_tokens(files, args.max_text_bytes)
        meta["text"] = [str(p) for p in files] if args.text else "stdlib top-level *.py, sorted"
        if vocab_size < 256:
            raise SystemExit(f"byte tokens need vocab_size >= 256; the checkpoint has {vocab_size}")
    if args.train_length is not None:
        meta["train_length"] = args.train_length
    curve = forgetting_curve(model, lengths=args.lengths, tokens=tokens, vocab_size=vocab_size,
                             n_samples=args.n_samples, bos_id=args.bos_id, eos_id=args.eos_id,
                             seed=args.seed, batch_size=args.batch_size, chunk_size=args.chunk_size or None,
                             device=args.device, out=out / "curve.json", meta=meta)
    if curve.lengths.size:
        curve.plot(out / "curve.png", train_length=args.train_length,
                   title=args.title or f"Forgetting curve: {args.checkpoint}")
        print(curve.table())
        print(json.dumps(curve.summary()))
    for L, e in curve.errors.items():
        print(f"stopped at L={L}: {e}", file=sys.stderr)
    return curve


if __name__ == "__main__":
    main()
