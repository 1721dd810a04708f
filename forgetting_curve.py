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
       m = ceil(L/2) tokens (the first half lets the model notice that copying is going on).
    Then per L: mean and std over samples of the copy and LM accuracies, and a paired test.

Reading a curve (paper section 2.2; the exact rules are stated above `fine_verdicts` and
`coarse_verdicts`). Every tested length gets a verdict: pass, inconclusive or fail.
    fine-grained   : pass   = pooled copy accuracy >= threshold (default 0.99);
                     fail   = significantly below it (one-sided binomial test on the K correct of
                              the M = n m scored tokens, corrected for over-dispersion between samples);
                     inconclusive = below it, but the scored tokens cannot tell it from threshold.
    coarse-grained : pass   = copy - LM >= a minimum effect size (default 0.05) AND significant;
                     fail   = copy - LM significantly below the effect size;
                     inconclusive = neither.
    amnesia        : copy ~ LM (the prefix is ignored): coarse fails.
    A memory length = the largest tested L that passes with no failing length at or below it; 0
    when no length passes before the first failure. Inconclusive lengths neither end nor extend it.
    The paired test is `significance="sign-flip"` (default; one-sided permutation test) or
    `"t-test"` (the official code's two-sided paired t-test, scipy.stats.ttest_rel, here in numpy).

Reading order: `forgetting_curve` (the sweep) -> `make_layouts` (steps 1-2) -> `predict_scored`
(step 3, chunked for stateful models) -> `ForgettingCurve` (step 4) -> the rules
(`fine_verdicts`, `coarse_verdicts`, `memory_length`) and the tests they use
(`binomial_below_pvalue`, `paired_sign_flip_pvalue`, `paired_t_test_pvalue`, all built on
`regularized_incomplete_beta`) -> `fingerprint` (what `resume` checks) -> the command line.

Glossary:
    b   batch (sequences per forward call)          L  dependency length (tokens in x)
    l   sequence length = 2L + 3                     V  logits size (vocabulary, maybe padded)
    n   samples per length                           k  number of tested lengths (in arrays)
    c   chunk size (tokens per call of a stateful model)
    m   scored tokens per sample = ceil(L/2)         M  scored tokens per length = n * m
    K_i correct scored tokens of sample i            phi over-dispersion factor (>= 1)

Deliberate differences from the official code (draw.py), each written down where it happens; the
measured effect of each, with the command that measured it, is in docs/forgetting_curve.md:
    - No hard-coded BOS=1 / EOS=2: the caller names the special ids; otherwise a documented default
      (the smallest id absent from the data, and EOS = BOS), see `resolve_special_ids`.
    - Random tokens come from the model's vocabulary minus BOS/EOS, range(vocab_size); the official
      code draws from ids 10..31999 whatever the model (Llama-2's vocabulary). `random_ids=(10, 32000)`
      reproduces it (on a vocabulary of >= 32000 ids).
    - The argmax runs over the first vocab_size logits (a padded vocabulary's extra rows are not
      tokens); the official code takes it over all rows. `argmax_over="all"` reproduces it.
    - A fresh unrelated prefix u per sample, a window of the text disjoint from x; the official code
      uses the corpus' last L tokens for every sample (and x from [0, N - 3L]). `lm_prefix="tail"`
      reproduces it.
    - The paired test: default a one-sided sign-flip permutation test (no normality assumption);
      the official code a two-sided paired t-test. `significance="t-test"` reproduces it.
    - The memory lengths are computed (the official code only draws the curve), with an effect size
      in the coarse rule (paper section 2.2 notes that a bare p < 0.05 reports memory where both
      curves have collapsed) and a binomial test in the fine rule (short lengths score few tokens).
    - The model runs in whatever dtype the caller gives it (the official script loads fp16).
    - Batched; long sequences of a stateful model (minimamba.Mamba2LM) run in chunks with the state
      carried along, so memory stays bounded (L >= 64K on a CPU); only the scored predictions are kept.
    - An out-of-memory error at one length stops the sweep but keeps (and saves) every length measured.
    - Non-finite logits are an error (torch.argmax takes a NaN as the maximum, so an all-NaN row
      silently reads as token 0 in the official code).

This file imports only torch, numpy and the standard library (matplotlib inside `plot`); minimamba is
imported only by the command line:
    python forgetting_curve.py --checkpoint DIR --lengths 16,64,256,1024 --out_dir runs/fc
    python forgetting_curve.py --checkpoint DIR --lengths 16,64,256,1024,4096 --out_dir runs/fc --resume
    python forgetting_curve.py --from_json runs/fc/curve.json --out_dir runs/fc     # redraw the figure only
"""

from __future__ import annotations

import argparse
import hashlib
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

FORMAT = "minimamba.forgetting_curve/2"  # tag written into every JSON file (/2 adds meta["fingerprint"])
READABLE_FORMATS = ("minimamba.forgetting_curve/1", FORMAT)   # /1 files load (plot), never resume
DEFAULT_N_SAMPLES = 10            # samples per length (paper / official code: 10)
DEFAULT_BATCH_SIZE = 8            # sequences per forward call (copy and LM rows share batches)
DEFAULT_CHUNK_SIZE = 4096         # tokens per call when chunking a stateful model (bounds memory:
                                  # b * c * V logits live at once instead of b * (2L+3) * V)
DEFAULT_THRESHOLD = 0.99          # fine-grained memory: copy accuracy >= 99% (paper section 2.2)
DEFAULT_MIN_EFFECT = 0.05         # coarse-grained memory: copy - LM >= 5 accuracy points (our choice:
                                  # large enough to reject the collapsed-curve case of paper 2.2,
                                  # where copy ~5-9% vs LM a few points lower)
DEFAULT_ALPHA = 0.05              # significance level of every test (official code: p < 0.05)
SIGNIFICANCE_TESTS = ("sign-flip", "t-test")   # the paired tests of the coarse rule
DEFAULT_SIGNIFICANCE = "sign-flip"             # ours; "t-test" = the official scipy.stats.ttest_rel
PASS, INCONCLUSIVE, FAIL = "pass", "inconclusive", "fail"   # the verdicts of one tested length
ZERO_SPREAD_RTOL = 1e-12          # t-test: sd(d) <= this * max|d_i| is rounding noise, i.e. no spread
EXACT_TEST_MAX_N = 16             # enumerate all 2^n sign flips up to n = 16 (65536 patterns)
DEFAULT_N_RESAMPLES = 20_000      # Monte Carlo sign flips beyond that
COUNT_ROUND_TOL = 0.01            # tokens: a stored accuracy * m within this of an integer is that
                                  # integer (float32 accuracies of the official JSON at m = 32768
                                  # are off by ~0.002 tokens)
BETACF_EPS = 1e-15                # relative convergence of the incomplete-beta continued fraction
BETACF_FPMIN = 1e-300             # guard against division by zero in Lentz's method (NR 6.4)
BETACF_MAX_ITER = 100_000         # it needs O(sqrt(max(a, b))) terms at most (NR 6.4): < 600 at
                                  # M = 327680 (L = 65536, n = 10); 83 measured near the threshold
ARGMAX_OVER = ("vocab", "all")    # "vocab": the first vocab_size logits (ours); "all": every row (official)
LM_PREFIXES = ("fresh", "tail")   # "fresh": a new window per sample (ours); "tail": the text's last L (official)
OFFICIAL_RANDOM_IDS = (10, 32000) # draw.py get_random_example: random.randint(10, 31999), inclusive
PROBE_LEN = 256                   # tokens of the fixed probe of the model fingerprint (at most: a
                                  # sweep whose shortest sequence 2 L_min + 3 is shorter uses that)
PROBE_DIM = 16                    # random directions the probe's logits are projected onto
PROBE_SEED = 2410_04727           # seed of the probe ids and directions (the paper's arXiv id)
PROBE_RTOL = 1e-3                 # relative difference of two probe sketches still read as one model
                                  # (fp32 on other hardware/threads: ~1e-6; another model: ~1)
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
# Argument checks (public boundaries: say what was expected and what was received)
# ------------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (True would silently mean 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """`value` as an int, or TypeError / ValueError naming the argument (floats are refused, not truncated)."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r} "
                        f"({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_lengths(lengths: Any) -> tuple[int, ...]:
    """A sequence of strictly increasing positive ints (a string such as "16" is refused: iterating
    it would measure L = 1 and L = 6)."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, (Sequence, np.ndarray, range)):
        raise TypeError(f"lengths must be a sequence of ints (e.g. [16, 64, 256]), got {lengths!r} "
                        f"({type(lengths).__name__})")
    bad = [x for x in lengths if not _is_int(x)]
    if bad:
        raise TypeError(f"lengths must be integers, got {bad[0]!r} ({type(bad[0]).__name__}) in {list(lengths)}")
    out = tuple(int(x) for x in lengths)
    if not out:
        raise ValueError("lengths is empty: give at least one dependency length L >= 1")
    if any(x < 1 for x in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"lengths must be strictly increasing integers >= 1, got {list(out)}")
    return out


def check_tokens(tokens: Any, vocab_size: int | None) -> torch.Tensor | None:
    """A 1-D integer tensor (or numpy array) of non-negative ids, returned as a CPU LongTensor."""
    if tokens is None:
        return None
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens) if tokens.dtype.kind in "iu" else tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.is_complex() \
            or tokens.dtype == torch.bool:
        kind = tokens.dtype if isinstance(tokens, (torch.Tensor, np.ndarray)) else type(tokens).__name__
        raise TypeError(f"tokens must be a 1-D integer tensor of token ids (or None for random tokens), "
                        f"got {kind}")
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D stream, got shape {tuple(tokens.shape)} "
                         "(flatten a batch with .reshape(-1) if that is what you mean)")
    tokens = tokens.long().cpu()
    if int(tokens.min()) < 0:
        raise ValueError(f"tokens hold a negative id ({int(tokens.min())})")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValueError(f"tokens hold id {int(tokens.max())} >= vocab_size={vocab_size}")
    return tokens


def check_out(out: str | os.PathLike | None) -> Path | None:
    """The JSON path a sweep writes, checked before any work: not a folder, its folder creatable."""
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a file path (str or PathLike) or None, got {type(out).__name__}")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"out={str(out)!r} is a folder; out= names the JSON file to write, e.g. "
                         f"{str(path / 'curve.json')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out={str(out)!r}: cannot create its folder ({err})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"out={str(out)!r} is not writable")
    return path


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
    vocab_size: int | None            # the model's vocabulary (argmax rows, random-token range)
    data: str                         # "random" or "text:<number of tokens>"
    argmax_over: str = "vocab"        # "vocab": argmax over the first vocab_size logits; "all": every row
    random_ids: tuple[int, int] | None = None   # random tokens from range(lo, hi) minus specials;
                                                # None = range(vocab_size)
    lm_prefix: str = "fresh"          # LM prefix u: "fresh" window per sample, or "tail" = text's last L

    def __post_init__(self):
        object.__setattr__(self, "lengths", check_lengths(self.lengths))
        check_int("n_samples", self.n_samples, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("chunk_size", self.chunk_size, minimum=1, allow_none=True)
        check_int("vocab_size", self.vocab_size, minimum=1, allow_none=True)
        if self.argmax_over not in ARGMAX_OVER:
            raise ValueError(f"argmax_over must be one of {ARGMAX_OVER}, got {self.argmax_over!r}")
        if self.lm_prefix not in LM_PREFIXES:
            raise ValueError(f"lm_prefix must be one of {LM_PREFIXES}, got {self.lm_prefix!r}")
        if self.random_ids is not None:
            if self.data != "random":
                raise ValueError("random_ids= applies to random tokens only (tokens=None)")
            if not isinstance(self.random_ids, (tuple, list)) or len(self.random_ids) != 2 \
                    or not all(_is_int(v) for v in self.random_ids):
                raise TypeError(f"random_ids must be a pair of ints (lo, hi), got {self.random_ids!r}")
            lo, hi = (int(v) for v in self.random_ids)
            if not 0 <= lo < hi or (self.vocab_size is not None and hi > self.vocab_size):
                raise ValueError(f"random_ids=({lo}, {hi}) must satisfy 0 <= lo < hi <= vocab_size="
                                 f"{self.vocab_size} (the official (10, 32000) needs >= 32000 ids)")
            object.__setattr__(self, "random_ids", (lo, hi))
        if self.lm_prefix == "tail" and self.data == "random":
            raise ValueError("lm_prefix='tail' needs natural text (tokens=); random tokens always "
                             "draw a fresh u, as the official code does")


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
    random_ids: tuple[int, int] | None = None, lm_prefix: str = "fresh",
) -> Layouts:
    """Steps 1-2 for one length: n samples of x (and u), in both layouts.

    Natural text (`tokens` given):
        lm_prefix="fresh" (ours): x and u are two non-overlapping windows of the stream, placed by
            two sorted uniform offsets in the slack N - 2L and randomly assigned to x and u; so u is
            disjoint from x and the stream needs N >= 2L tokens.
        lm_prefix="tail" (official draw.py get_order_example): x starts uniformly in [0, N - 3L] and
            u is the stream's last L tokens, the same for every sample; needs N >= 3L.
    Random tokens (`tokens` None): x and u drawn i.i.d. uniform from range(lo, hi) without the
    special ids; (lo, hi) = random_ids, default (0, vocab_size) (official: (10, 32000)).
    """
    ids = torch.empty(2 * n, 2 * L + 3, dtype=torch.long)                       # (2n, l)
    x_start = np.full(n, -1, dtype=np.int64)
    u_start = np.full(n, -1, dtype=np.int64)
    if tokens is None:
        lo, hi = random_ids if random_ids is not None else (0, vocab_size)
        allowed = np.setdiff1d(np.arange(lo, hi), [bos_id, eos_id])
        if allowed.size == 0:
            raise ValueError(f"range({lo}, {hi}) leaves no ids besides the special ones")
        xs = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
        us = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
    else:
        N = tokens.numel()
        need = 3 * L if lm_prefix == "tail" else 2 * L
        if N < need:
            raise ValueError(f"the token stream has {N} tokens; L={L} needs at least {need} "
                             f"(lm_prefix={lm_prefix!r}): give a longer text or smaller lengths")
        xs = torch.empty(n, L, dtype=torch.long)
        us = torch.empty(n, L, dtype=torch.long)
        for i in range(n):
            if lm_prefix == "tail":                     # official: x from [0, N - 3L], u = last L
                a, b = int(rng.integers(0, N - 3 * L + 1)), N - L
            else:
                p1, p2 = np.sort(rng.integers(0, N - 2 * L + 1, 2))
                a, b = int(p1), int(p2) + L             # windows [a, a+L) and [b, b+L) never overlap
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
    top = int(ids.max())                     # one reduction (and, on a GPU, one sync) per model call
    if out.shape[-1] <= top:                 # ids it cannot predict would score as silent misses
        raise ValueError(f"the model returns {out.shape[-1]} logits per position but reads token id "
                         f"{top}: it cannot predict every id it is given (is vocab_size the model's?)")
    return out


class NonFiniteLogitsError(ValueError):
    """NaN or inf among the logits an argmax would read (torch.argmax takes a NaN as the maximum: an
    all-NaN row silently reads as token 0; +inf always wins).

    row: the row of `ids` (for the sweep: samples 0..n-1 copy condition, n..2n-1 LM condition);
    position: the sequence position of the first bad logit in that row."""

    def __init__(self, message: str, row: int = -1, position: int = -1):
        super().__init__(message)
        self.row, self.position = row, position


def _argmax_checked(logits: torch.Tensor, row0: int, pos0: int) -> torch.Tensor:
    """argmax over the last dim, after checking every logit is finite. logits: (b, t, V) -> (b, t)."""
    finite = torch.isfinite(logits).all(dim=-1)                                  # (b, t)
    if not bool(finite.all()):
        r, t = (int(v) for v in (~finite).nonzero()[0])
        raise NonFiniteLogitsError(f"non-finite (NaN or inf) logits in row {row0 + r} at position "
                                   f"{pos0 + t}", row=row0 + r, position=pos0 + t)
    return logits.argmax(-1)


def _call_with_state(model: Callable, piece: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """One chunk of a stateful model: model(piece, state=state) -> (logits (b, c, V), the new state)."""
    out = model(piece, state=state)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ValueError("with chunk_size set, the model must return (logits, state) when "
                         f"called as model(ids, state=state); got {type(out).__name__}")
    return _logits_of(out, piece), out[1]


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
            extra rows are not tokens; minimamba pads to a multiple of 16); None = all V logits
            (the official code).
        on_batch: called with numbers of tokens processed (per chunk, and per batch), summing to
            ids.numel() (progress).
    Returns:
        (B, hi - lo) long predictions (on the model's device).
    Raises:
        NonFiniteLogitsError if a logit the argmax reads is NaN or inf (naming row and position).
    """
    preds = []
    for r in range(0, ids.shape[0], batch_size):
        batch = ids[r:r + batch_size]                                            # (b, l)
        done = 0                                        # tokens of this batch reported so far
        if chunk_size is None:
            logits = _logits_of(model(batch), batch)                            # (b, l, V)
            preds.append(_argmax_checked(logits[:, lo:hi, :vocab_size], r, lo))  # (b, hi-lo)
            del logits
        else:
            state, pieces = None, []
            for s in range(0, hi, chunk_size):
                piece = batch[:, s:s + chunk_size]                              # (b, c)
                logits, state = _call_with_state(model, piece, state)           # (b, c, V)
                a, z = max(lo, s), min(hi, s + piece.shape[1])
                if a < z:
                    pieces.append(_argmax_checked(logits[:, a - s:z - s, :vocab_size], r, a))  # (b, z-a)
                del logits
                if on_batch is not None:                # progress per chunk (long L: minutes each)
                    on_batch(piece.numel())
                    done += piece.numel()
            preds.append(torch.cat(pieces, dim=1))                              # (b, hi-lo)
        if on_batch is not None:
            on_batch(batch.numel() - done)              # the rest of the batch (all of it unchunked)
    return torch.cat(preds, dim=0)


# ------------------------------------------------------------------------------------------------
# The tests behind the rules: the incomplete beta function -> binomial and Student t; sign flips
# ------------------------------------------------------------------------------------------------

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes 6.4, betacf):
        I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))
        d_{2j+1} = -(a + j)(a + b + j) x / ((a + 2j)(a + 2j + 1)),
        d_{2j}   = j (b - j) x / ((a + 2j - 1)(a + 2j))
    This returns the fraction 1 / (1 + d_1 / ...); it converges fast for x < (a + 1) / (a + b + 2)."""
    def guard(v: float) -> float:
        return BETACF_FPMIN if abs(v) < BETACF_FPMIN else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for j in range(1, BETACF_MAX_ITER + 1):
        for coef in (j * (b - j) * x / ((a + 2 * j - 1) * (a + 2 * j)),             # d_{2j}
                     -(a + j) * (a + b + j) * x / ((a + 2 * j) * (a + 2 * j + 1))):  # d_{2j+1}
            d = 1.0 / guard(1.0 + coef * d)
            c = guard(1.0 + coef / c)
            h *= d * c
        if abs(d * c - 1.0) < BETACF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta I_{x}({a}, {b}): no convergence in {BETACF_MAX_ITER} terms")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1 (Numerical Recipes 6.4, betai).

    The prefactor x^a (1-x)^b / (a B(a, b)) is computed in logs (math.lgamma); the continued fraction
    is evaluated directly for x < (a + 1) / (a + b + 2) and through I_x(a, b) = 1 - I_{1-x}(b, a)
    otherwise, where each converges in O(sqrt(max(a, b))) terms. Real (non-integer) a, b are fine.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def binomial_cdf(k: float, M: float, p: float) -> float:
    """P[X <= k] for X ~ Binomial(M, p):  P[X <= k] = I_{1-p}(M - k, k + 1)  (Numerical Recipes eq. 6.4.12).

    The right side is also defined for real k and M (0 <= k < M), which the over-dispersion correction
    of the fine rule uses (effective counts k/phi of M/phi); for integers it equals the sum of the
    binomial probabilities exactly.
    """
    if k < 0:
        return 0.0
    if k >= M:
        return 1.0
    return regularized_incomplete_beta(M - k, k + 1.0, 1.0 - p)


def student_t_sf2(t: float, df: float) -> float:
    """Two-sided tail P[|T| >= |t|] of Student's t with df degrees of freedom:
        P[|T| >= |t|] = I_{df / (df + t^2)}(df / 2, 1 / 2)      (Numerical Recipes eq. 6.4.9)."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def _finite_diffs(diff: np.ndarray) -> np.ndarray:
    """diff as a flat float64 array, refusing NaN or inf (a NaN mean compares False everywhere: the
    sign-flip test would read p = 0, significant)."""
    d = np.asarray(diff, dtype=np.float64).ravel()                             # (n,)
    if not np.isfinite(d).all():
        raise ValueError(f"paired differences must be finite, got {d[~np.isfinite(d)][:3]} among {d.size}")
    return d


def paired_t_test_pvalue(diff: np.ndarray) -> float:
    """Two-sided paired t-test of H0: mean(diff) = 0, as the official code's scipy.stats.ttest_rel:
        t = mean(d) / (sd(d) / sqrt(n)),  sd with n - 1 in the denominator,  df = n - 1,
        p = P[|T_df| >= |t|].
    Zero spread (sd <= ZERO_SPREAD_RTOL * max|d_i|, i.e. equal up to rounding): p = 1 if every d_i = 0
    (scipy returns NaN there and the official code maps it to 1.0), else p = 0 (scipy: t = +-inf).
    Needs n >= 2. The direction (copy above or below LM) is not in p: the rules read it from the sign
    of the mean."""
    d = _finite_diffs(diff)                                                    # (n,)
    n = d.size
    if n < 2:
        raise ValueError(f"the paired t-test needs n >= 2 samples, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= ZERO_SPREAD_RTOL * float(np.abs(d).max()):
        return 1.0 if not d.any() else 0.0
    return student_t_sf2(mean / (sd / math.sqrt(n)), n - 1)


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
    d = _finite_diffs(diff)                                                    # (n,)
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


def paired_pvalue(diff: np.ndarray, significance: str = DEFAULT_SIGNIFICANCE, *,
                  n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0) -> float:
    """p-value of "mean(diff) > 0" by the chosen test: "sign-flip" (one-sided, ours) or "t-test"
    (two-sided, official; a caller that needs the direction checks the sign of the mean)."""
    if significance == "sign-flip":
        return paired_sign_flip_pvalue(diff, n_resamples=n_resamples, seed=seed)
    if significance == "t-test":
        return paired_t_test_pvalue(diff)
    raise ValueError(f"significance must be one of {SIGNIFICANCE_TESTS}, got {significance!r}")


def check_significance_reachable(n: int, alpha: float, significance: str) -> None:
    """Refuse a coarse rule that can never reach p < alpha with n samples (it would silently read 0)."""
    if significance not in SIGNIFICANCE_TESTS:
        raise ValueError(f"significance must be one of {SIGNIFICANCE_TESTS}, got {significance!r}")
    if significance == "sign-flip" and 2.0 ** -n >= alpha:
        raise ValueError(f"with n_samples={n} the smallest attainable p-value is 2^-{n} = "
                         f"{2.0 ** -n:.3g} >= alpha={alpha}: nothing can be significant; "
                         "measure more samples per length, raise alpha or use significance='t-test'")
    if significance == "t-test" and n < 2:
        raise ValueError(f"the paired t-test needs n_samples >= 2, got {n}")


# ------------------------------------------------------------------------------------------------
# Step 4 and the memory-length rules
# ------------------------------------------------------------------------------------------------

def binomial_below_pvalue(correct: np.ndarray, m: int, threshold: float) -> tuple[float, float]:
    """The fine rule's test at one length: (p-value, phi) of H0: copy rate >= threshold (see the rule
    above `ForgettingCurve.fine_verdicts`). correct: (n,) correct scored tokens K_i of each sample,
    m scored tokens per sample."""
    K = np.asarray(correct, dtype=np.float64).ravel()                           # (n,)
    n, M = K.size, K.size * m
    p_hat = float(K.sum()) / M
    phi = 1.0
    if n > 1 and m > 1 and 0.0 < p_hat < 1.0:
        pearson = float(np.sum((K - m * p_hat) ** 2)) / (m * p_hat * (1.0 - p_hat))
        phi = max(1.0, pearson / (n - 1))
    return binomial_cdf(float(K.sum()) / phi, M / phi, threshold), phi


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (float, int)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def memory_length(verdicts: Sequence[str], lengths: Sequence[int]) -> int:
    """The largest tested L that passes with no failing length at or below it; 0 if none passes
    before the first failure. Inconclusive lengths neither end the run nor extend it."""
    if len(verdicts) != len(lengths):
        raise ValueError(f"one verdict per length: got {len(verdicts)} verdicts for {len(lengths)} lengths")
    best = 0
    for verdict, L in zip(verdicts, lengths):
        if verdict == FAIL:
            break
        if verdict == PASS:
            best = int(L)
    return best


@dataclass
class ForgettingCurve:
    """Accuracies of one sweep, the memory-length rules, JSON save/load and the plot.

    Every tested length gets a fine and a coarse verdict (PASS, INCONCLUSIVE or FAIL; the rules are
    stated above `fine_verdicts` and `coarse_verdicts`), and each memory length is `memory_length` of
    its verdicts: the largest tested L that passes with no failure at or below it, 0 if none.
    Public reading API (all arrays are (k,), one entry per tested length):
        fine_verdicts, coarse_verdicts          -> arrays of "pass" / "inconclusive" / "fail"
        fine_grained_length, coarse_grained_length -> int (0 = no such memory)
        fine_pvalues, dispersion                -> the fine rule's binomial p-values and phi
        p_values(significance)                  -> the coarse rule's p-values of copy > LM
        fine_mask, coarse_mask                  -> bool: the length passes
        summary()                               -> all of it, JSON-ready, with the rule parameters
    Each memory length is a lower bound limited by the grid (the truth lies between it and the next
    tested length); if the sweep stopped at an error (`errors`) the memory may be longer.
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
        if np.any(self.lengths < 1):
            raise ValueError(f"lengths must be >= 1, got {self.lengths.tolist()}")
        for name, acc in (("copy_acc", self.copy_acc), ("lm_acc", self.lm_acc)):
            if not np.all((acc >= 0) & (acc <= 1)):               # also catches NaN
                raise ValueError(f"{name} must hold accuracies in [0, 1]; got values outside (or NaN)")

    # ---- summary statistics ----
    @property
    def copy_mean(self) -> np.ndarray:       # (k,)
        return self.copy_acc.mean(axis=1)

    @property
    def lm_mean(self) -> np.ndarray:         # (k,)
        return self.lm_acc.mean(axis=1)

    @property
    def scored_tokens(self) -> np.ndarray:   # (k,) m = ceil(L/2): scored tokens per sample
        return (self.lengths + 1) // 2

    @property
    def copy_correct(self) -> np.ndarray:    # (k, n) K_i = copy_acc * m, snapped to integers
        K = self.copy_acc * self.scored_tokens[:, None]
        snapped = np.round(K)
        return np.where(np.abs(K - snapped) <= COUNT_ROUND_TOL, snapped, K)

    def p_values(self, significance: str = DEFAULT_SIGNIFICANCE, *, n_resamples: int = DEFAULT_N_RESAMPLES,
                 seed: int = 0) -> np.ndarray:
        """(k,) paired p-values of copy > LM, one per length ("sign-flip": one-sided; "t-test":
        two-sided, as the official code reports them)."""
        return np.array([paired_pvalue(c - m, significance, n_resamples=n_resamples, seed=seed)
                         for c, m in zip(self.copy_acc, self.lm_acc)])

    # ---- the fine-grained rule ----
    # Fine-grained memory: can the model copy (almost) every token from L + 1 positions back?
    # At one tested length: n samples of m = ceil(L/2) scored tokens each; sample i got K_i right.
    # Pool them: K = sum_i K_i correct of M = n m, rate p_hat = K / M (= the mean copy accuracy).
    #   over-dispersion  phi = max(1, X^2 / (n - 1)),  X^2 = sum_i (K_i - m p_hat)^2 / (m p_hat (1 - p_hat))
    #                    (phi = 1 when n = 1, m = 1 or p_hat in {0, 1}: nothing to estimate it from)
    #   p_fine           = P[Binomial(M / phi, threshold) <= K / phi]   (one-sided test of
    #                      H0: copy rate >= threshold against H1: below it)
    #   verdict          PASS          if p_hat >= threshold
    #                    FAIL          if p_hat <  threshold and p_fine <  alpha
    #                    INCONCLUSIVE  if p_hat <  threshold and p_fine >= alpha
    # fine-grained length = memory_length(verdicts): the largest passing L with no FAIL at or below it.
    # Why: the shortest lengths score few tokens (L = 2: one per sample; L = 8: four), so one miss
    # drops the mean below 0.99 although those tokens cannot tell 0.95 from 0.99. Pooling the tokens
    # is what tells them apart at long lengths (Llama-3-8B: 20 misses in 20670 tokens pass at
    # L = 4134, 3612 misses in 23250 fail at L = 4650).
    # Tokens of one sample are not independent (a sample can be lost as a whole, or be harder text),
    # so the pooled count overstates the evidence when samples disagree more than binomial noise
    # would make them. phi is that excess (the Pearson over-dispersion estimate), and dividing both
    # counts by it is the Rao-Scott design-effect correction for clustered binary data (Rao & Scott,
    # Biometrics 48:577, 1992): 10 samples that are each all-right or all-wrong count as ~10 trials,
    # not as 10 m tokens. Limits: phi comes from n samples (n = 10: its relative error is about
    # sqrt(2 / 9) ~ 50%), so the test's error rates hold only approximately under clustering; with
    # n = 1 or m = 1 no correction is possible (m = 1: each sample is one token, nothing to cluster).
    # Error behaviour (numbers in docs/forgetting_curve.md, exact binomial, n = 10, alpha = 0.05):
    #   false FAIL  (a copier at or above the threshold read as failing): <= alpha per length at
    #               exactly 0.99 (so a long plateau at exactly 0.99 ends early with the familywise
    #               chance of its lengths); a 0.995 copier: <= 0.008 per length up to L = 64, 1e-4 at
    #               L = 128, 1e-10 at L = 1024. Clustered misses with mean 0.99 (a tenth of the
    #               samples at 0.9) fail L = 4096 in ~3% of runs with phi, ~27% without it.
    #   false PASS  (a 0.98 copier read as passing): likely at short lengths (L = 2: 0.98^10 = 0.82;
    #               L = 8: 0.98^40 = 0.45; L = 128: 0.03), negligible at L = 1024 (1e-8). On the grid
    #               2, 4, ..., 1024 a 0.98 copier reads a median fine-grained length of 8 (0 to 256):
    #               a pass at a short length is weak evidence; the long lengths decide.

    def dispersion(self) -> np.ndarray:
        """(k,) phi, the over-dispersion of the copy counts between samples (1 = binomial)."""
        return np.array([binomial_below_pvalue(K, m, DEFAULT_THRESHOLD)[1]
                         for K, m in zip(self.copy_correct, self.scored_tokens)])

    def fine_pvalues(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """(k,) p_fine: the one-sided, dispersion-corrected binomial p-value of copy rate < threshold."""
        _check_probability("threshold", threshold)
        return np.array([binomial_below_pvalue(K, m, threshold)[0]
                         for K, m in zip(self.copy_correct, self.scored_tokens)])

    def fine_verdicts(self, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """(k,) PASS / INCONCLUSIVE / FAIL of the fine-grained rule (stated above)."""
        _check_probability("alpha", alpha)
        p_hat = self.copy_correct.sum(axis=1) / (self.scored_tokens * self.copy_acc.shape[1])
        below = p_hat < threshold
        fail = below & (self.fine_pvalues(threshold) < alpha)
        return np.where(~below, PASS, np.where(fail, FAIL, INCONCLUSIVE))

    def fine_mask(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """(k,) bool: the length passes the fine rule (pooled copy accuracy >= threshold)."""
        return self.fine_verdicts(threshold) == PASS

    def fine_grained_length(self, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> int:
        """memory_length of the fine verdicts: the largest passing L with no FAIL at or below it."""
        return memory_length(self.fine_verdicts(threshold, alpha), self.lengths)

    # ---- the coarse-grained rule ----
    # Coarse-grained memory: does the first copy help at all, by a margin worth calling memory?
    # At one tested length: paired differences d_i = copy_i - lm_i (same x in both), effect = mean(d).
    #   p_above = paired_pvalue(d)               test of copy > LM
    #   p_below = paired_pvalue(min_effect - d)  test of copy - LM < min_effect
    #   verdict  PASS          if effect >= min_effect and p_above < alpha
    #            FAIL          if effect <  min_effect and p_below < alpha
    #            INCONCLUSIVE  otherwise
    # coarse-grained length = memory_length(verdicts). The effect size is what paper section 2.2 asks
    # for: a bare p < 0.05 calls Llama-3-8B's gap "significant" at L = 9293 where both curves have
    # collapsed to 5-9%. The paired test is `significance`: "sign-flip" (default; one-sided, exact
    # over 2^n patterns, no normality assumption; n >= 5 needed at alpha = 0.05) or "t-test" (the
    # official code's two-sided scipy.stats.ttest_rel; the direction comes from the effect's sign,
    # so it is a one-sided test at alpha / 2). For p_below the sign-flip test assumes the differences
    # are symmetric about min_effect, an approximation (copy and LM accuracies are bounded).
    # Amnesia (copy == LM sample by sample): d = 0, min_effect - d > 0 in every sample: FAIL.

    def coarse_verdicts(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA, *,
                        significance: str = DEFAULT_SIGNIFICANCE, n_resamples: int = DEFAULT_N_RESAMPLES,
                        seed: int = 0) -> np.ndarray:
        """(k,) PASS / INCONCLUSIVE / FAIL of the coarse-grained rule (stated above). Raises if the
        test cannot reach p < alpha with this many samples (instead of silently reading 0)."""
        _check_probability("alpha", alpha)
        check_significance_reachable(self.copy_acc.shape[1], alpha, significance)
        d = self.copy_acc - self.lm_acc                                           # (k, n)
        effect = d.mean(axis=1)
        kw = dict(n_resamples=n_resamples, seed=seed)
        p_above = np.array([paired_pvalue(row, significance, **kw) for row in d])
        p_below = np.array([paired_pvalue(min_effect - row, significance, **kw) for row in d])
        passed = (effect >= min_effect) & (p_above < alpha)
        failed = (effect < min_effect) & (p_below < alpha)
        return np.where(passed, PASS, np.where(failed, FAIL, INCONCLUSIVE))

    def coarse_mask(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA, *,
                    significance: str = DEFAULT_SIGNIFICANCE, n_resamples: int = DEFAULT_N_RESAMPLES,
                    seed: int = 0) -> np.ndarray:
        """(k,) bool: the length passes the coarse rule (mean(copy - LM) >= min_effect, p < alpha)."""
        return self.coarse_verdicts(min_effect, alpha, significance=significance,
                                    n_resamples=n_resamples, seed=seed) == PASS

    def coarse_grained_length(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA, *,
                              significance: str = DEFAULT_SIGNIFICANCE,
                              n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0) -> int:
        """memory_length of the coarse verdicts: the largest passing L with no FAIL at or below it."""
        return memory_length(self.coarse_verdicts(min_effect, alpha, significance=significance,
                                                  n_resamples=n_resamples, seed=seed), self.lengths)

    def summary(self, threshold: float = DEFAULT_THRESHOLD, min_effect: float = DEFAULT_MIN_EFFECT,
                alpha: float = DEFAULT_ALPHA, significance: str = DEFAULT_SIGNIFICANCE) -> dict[str, Any]:
        """The memory lengths, the per-length verdicts and the rule parameters (JSON-ready).
        coarse_grained_length / coarse_verdicts are None when the test cannot reach alpha."""
        out: dict[str, Any] = {"fine_grained_length": self.fine_grained_length(threshold, alpha),
                               "threshold": threshold, "min_effect": min_effect, "alpha": alpha,
                               "significance": significance, "lengths": self.lengths.tolist(),
                               "fine_verdicts": self.fine_verdicts(threshold, alpha).tolist()}
        if significance not in SIGNIFICANCE_TESTS:
            raise ValueError(f"significance must be one of {SIGNIFICANCE_TESTS}, got {significance!r}")
        try:
            check_significance_reachable(self.copy_acc.shape[1], alpha, significance)
        except ValueError:                                  # too few samples: say None, not 0
            out["coarse_grained_length"] = out["coarse_verdicts"] = None
        else:
            coarse = self.coarse_verdicts(min_effect, alpha, significance=significance)
            out["coarse_grained_length"] = memory_length(coarse, self.lengths)
            out["coarse_verdicts"] = coarse.tolist()
        out["stopped_by_error"] = bool(self.errors)
        return out

    def table(self, significance: str = DEFAULT_SIGNIFICANCE) -> str:
        """A plain-text table: L, copy and LM mean +- std, the fine rule's p and verdict, the coarse
        rule's p (copy > LM) and verdict (default rule parameters)."""
        s = self.summary(significance=significance) if self.lengths.size else {}
        p_fine = self.fine_pvalues() if self.lengths.size else []
        p = self.p_values(significance) if self.lengths.size else []
        coarse = s.get("coarse_verdicts") or ["-"] * self.lengths.size
        rows = [f"{'L':>8} {'copy':>15} {'LM':>15} {'p_fine':>8} {'fine':>12} {'p_coarse':>8} {'coarse':>12}"]
        for L, c, m, pf, vf, pc, vc in zip(self.lengths, self.copy_acc, self.lm_acc, p_fine,
                                            s.get("fine_verdicts", []), p, coarse):
            rows.append(f"{L:>8d} {c.mean():7.4f}+-{c.std():.4f} {m.mean():7.4f}+-{m.std():.4f} "
                        f"{pf:8.2g} {vf:>12} {pc:8.2g} {vc:>12}")
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
        """Read a curve.json of this module (formats /1 and /2), or the official code's result file
        (draw.py's <title>.json: a list of {"length", "copy_accs", "lm_accs", ...}, converted).
        Raises ValueError naming the file when it is not readable as either."""
        try:
            data = json.loads(Path(path).read_text())
            if isinstance(data, list) and data and isinstance(data[0], dict) and "copy_accs" in data[0]:
                return cls(lengths=[r["length"] for r in data], copy_acc=[r["copy_accs"] for r in data],
                           lm_acc=[r["lm_accs"] for r in data],
                           meta={"source": f"official ForgettingCurve draw.py results: {Path(path).name}",
                                 "n_samples": len(data[0]["copy_accs"])})
            if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
                found = data.get("format") if isinstance(data, dict) else type(data).__name__
                raise ValueError(f"format {found!r}, expected one of {READABLE_FORMATS}")
            seconds = [math.nan if s is None else s for s in data.get("seconds", [])] or None
            return cls(lengths=data["lengths"], copy_acc=data["copy_acc"], lm_acc=data["lm_acc"],
                       seconds=seconds, errors=data.get("errors", {}), meta=data.get("meta", {}))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a forgetting-curve file ({type(err).__name__}: {err})") from None

    # ---- the figure ----
    def plot(self, path: str | os.PathLike, train_length: int | None = None, *, title: str | None = None,
             threshold: float = DEFAULT_THRESHOLD, min_effect: float = DEFAULT_MIN_EFFECT,
             alpha: float = DEFAULT_ALPHA, significance: str = DEFAULT_SIGNIFICANCE) -> None:
        """Copy and LM accuracy (mean, +-1 std band) vs L; fine / coarse / amnesia regions shaded.

        Regions follow the rules above: fine = tested lengths up to the fine-grained length, coarse =
        beyond it up to the coarse-grained length, amnesia = beyond both. Copy points whose fine
        verdict is inconclusive are drawn hollow. `train_length` draws a
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

        s = self.summary(threshold, min_effect, alpha, significance)
        fine, coarse, n = s["fine_grained_length"], s["coarse_grained_length"] or 0, self.copy_acc.shape[1]
        e_fine, e_coarse = edge_after(fine), max(edge_after(coarse), edge_after(fine))
        if fine:
            ax.axvspan(edges[0], e_fine, color="tab:green", alpha=0.12,
                       label=f"fine-grained (copy >= {threshold:g}, binomial): L <= {fine}")
        if e_coarse > e_fine:
            ax.axvspan(e_fine, e_coarse, color="tab:orange", alpha=0.12,
                       label=f"coarse-grained (copy - LM >= {min_effect:g}, {significance} p < {alpha:g}): "
                             f"L <= {coarse}")
        ax.axvspan(e_coarse, edges[-1], color="tab:gray", alpha=0.12, label="amnesia")
        # LM first and dashed, copy on top: where the curves coincide (amnesia) both stay visible
        for acc, name, color, style in ((self.lm_acc, "LM", "tab:red", "s--"),
                                        (self.copy_acc, "copy", "tab:blue", "o-")):
            mean, std = acc.mean(axis=1), acc.std(axis=1)
            ax.plot(L, mean, style, color=color, ms=3, lw=1.2, label=f"{name} accuracy")
            ax.fill_between(L, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color,
                            alpha=0.25, lw=0)
        unsure = np.array(s["fine_verdicts"]) == INCONCLUSIVE
        if unsure.any():
            ax.plot(L[unsure], self.copy_mean[unsure], "o", ms=6, mfc="white", mec="tab:blue",
                    label="copy: fine verdict inconclusive")
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
# Fingerprint: what `resume` checks before it reuses lengths measured by an earlier run
# ------------------------------------------------------------------------------------------------

RESUME_SETTINGS = ("n_samples", "seed", "bos_id", "eos_id", "vocab_size", "data", "argmax_over",
                   "random_ids", "lm_prefix")   # settings that change the per-sample results


@torch.no_grad()
def fingerprint(model: Callable, *, tokens: torch.Tensor | None, vocab_size: int | None,
                argmax_vocab: int | None, chunk_size: int | None, device: torch.device | str,
                probe_len: int = PROBE_LEN) -> dict[str, Any]:
    """What identifies a measurement beyond its settings (stored in meta["fingerprint"]):
        model_class   : module.qualname of the model's type
        probe_sketch  : (PROBE_DIM,) sum over the probe's positions of its centred logits (the rows
                        the argmax reads), projected on PROBE_DIM fixed Gaussian directions: a linear
                        sketch in which any change of any logit shows
        tokens_sha256 : sha256 of the token stream as little-endian int64 (None for random tokens)
        probe_len     : the probe's length (the sweep uses min(PROBE_LEN, 2 L_min + 3), a length the
                        model has to accept anyway; a resumed sweep reuses the file's)
    The probe: probe_len ids from range(vocab_size) drawn by default_rng(PROBE_SEED), or the stream's
    first probe_len tokens when the vocabulary is unknown (text without vocab_size); a stateful model
    runs in chunks of chunk_size with the state carried, as in the sweep.
    Why a sketch compared with a tolerance (PROBE_RTOL) rather than a hash of the logits: the same
    model on another thread count or device differs in the last float bits, which would break an
    exact hash. Limit: two models whose logits agree on the probe's tokens (e.g. one model with and
    without a sliding window longer than the probe) look the same; give such runs different `out` files.
    """
    if vocab_size is not None:
        probe = torch.from_numpy(np.random.default_rng(PROBE_SEED).integers(0, vocab_size, PROBE_LEN))
    else:
        probe = tokens[:PROBE_LEN]
    ids = probe[:probe_len].long().reshape(1, -1).to(device)                   # (1, probe_len)
    if chunk_size is None:
        logits = _logits_of(model(ids), ids)[0]                                # (probe_len, V)
    else:                                                # the same chunked call as the sweep's
        state, pieces = None, []
        for s in range(0, ids.shape[1], chunk_size):
            logits, state = _call_with_state(model, ids[:, s:s + chunk_size], state)
            pieces.append(logits[0])
        logits = torch.cat(pieces, dim=0)                                      # (probe_len, V)
    logits = logits[:, :argmax_vocab].double().cpu()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError(f"the model returns non-finite (NaN or inf) logits on the fixed "
                                   f"fingerprint probe ({ids.shape[1]} ids): it is broken before any length")
    centred = logits - logits.mean(dim=-1, keepdim=True)                       # softmax-invariant
    directions = torch.from_numpy(np.random.default_rng([PROBE_SEED, 1]).standard_normal(
        (logits.shape[-1], PROBE_DIM)))                                        # (V, PROBE_DIM)
    sketch = (centred @ directions).sum(dim=0)                                 # (PROBE_DIM,)
    stream_hash = (None if tokens is None else
                   hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest())
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "probe_sketch": [float(f"{v:.9g}") for v in sketch.tolist()], "tokens_sha256": stream_hash,
            "probe_len": int(ids.shape[1])}


def fingerprint_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why two fingerprints are not the same measurement, or None when they match."""
    if old.get("model_class") != new["model_class"]:
        return f"another model class ({old.get('model_class')} in the file, {new['model_class']} now)"
    if old.get("tokens_sha256") != new["tokens_sha256"]:
        return (f"other text (token stream sha256 {str(old.get('tokens_sha256'))[:12]}... in the file, "
                f"{str(new['tokens_sha256'])[:12]}... now)")
    a, b = np.asarray(old.get("probe_sketch", []), float), np.asarray(new["probe_sketch"], float)
    if a.shape != b.shape:
        return "another model (the probe sketch has another size)"
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30))
    if rel > PROBE_RTOL:
        return (f"another model: its logits on the fixed probe differ (relative difference {rel:.3g} > "
                f"PROBE_RTOL = {PROBE_RTOL:g}; other weights, mitigation or precision)")
    return None


def _load_for_resume(out: Path) -> ForgettingCurve:
    """The curve already in `out`; refused when it carries no fingerprint to check."""
    prev = ForgettingCurve.load(out)                        # a corrupt file: ValueError naming it
    if "fingerprint" not in prev.meta:
        raise ValueError(f"cannot resume from {out}: it has no fingerprint (written by an older "
                         "forgetting_curve.py), so nothing says it measured this model on this data. "
                         "Re-plot it with --from-json; to measure afresh, move it away or choose another out=")
    return prev


def _check_resume(out: Path, prev: ForgettingCurve, meta: dict[str, Any]) -> None:
    """Refuse to resume unless `prev` was measured with the same settings, model and data."""
    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v))                   # tuples -> lists, as in the file
    diff = {k: (prev.meta.get(k), meta[k]) for k in RESUME_SETTINGS if norm(prev.meta.get(k)) != norm(meta[k])}
    if diff:
        raise ValueError(f"cannot resume from {out}: settings differ (file, now): {diff}")
    why = fingerprint_mismatch(prev.meta["fingerprint"], meta["fingerprint"])
    if why is not None:
        raise ValueError(f"cannot resume from {out}: it was measured on {why}. Choose another out= "
                         "(or delete the file to measure afresh)")


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
    meta: dict[str, Any] | None = None, argmax_over: str = "vocab",
    random_ids: tuple[int, int] | None = None, lm_prefix: str = "fresh",
) -> ForgettingCurve:
    """Measure the forgetting curve of `model` at each dependency length (protocol in the module doc).

    Args:
        model: a callable taking a LongTensor (b, l) and returning logits (b, l, V), a tuple whose first
            element is the logits (minimamba.Mamba2LM), or an object with `.logits` (Hugging Face).
            Assumed causal. An nn.Module in training mode is switched to eval() for the sweep and back.
        lengths: dependency lengths L, a sequence of strictly increasing ints >= 1 (each sequence has
            2L + 3 tokens).
        tokens: (N,) integer tensor, a stream of natural text (x and disjoint u are windows of it;
            N >= 2 * max L), or None for random tokens (see random_ids).
        vocab_size: the model's vocabulary size. Needed for random tokens; with text it bounds the
            search for a free BOS id and the fingerprint probe's ids.
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
        out: optional JSON file path (checked before any work: not a folder, writable); rewritten
            atomically after every length, so a killed or failed sweep keeps every length measured.
            An existing file is overwritten unless resume=True.
        resume: reuse the lengths already in `out` (a killed sweep, or a grid extended later) and
            measure only the others. Since each length has its own seed the result equals a fresh
            run. Refused (ValueError) unless the file's settings (RESUME_SETTINGS) and fingerprint
            (same model class, same logits on a fixed probe, same token stream) match; a file
            without a fingerprint (older format) is refused too. Its recorded errors are dropped, so
            those lengths are tried again, and its lengths not in `lengths` are left out.
        progress: draw a progress bar on stderr.
        meta: extra JSON-able information stored with the result (e.g. checkpoint, data source).
        argmax_over: "vocab" (default) = argmax over the first vocab_size logits (padded rows of the
            vocabulary are ignored; all rows when vocab_size is None); "all" = every row (official).
        random_ids: random tokens from range(lo, hi) minus BOS/EOS; None = range(vocab_size).
            (10, 32000) is the official code's range.
        lm_prefix: "fresh" (default) = a new text window u per sample, disjoint from x; "tail" = the
            text's last L tokens for every sample, x from [0, N - 3L] (official; needs N >= 3 max L).
    Returns:
        A ForgettingCurve. An out-of-memory error at some length stops the sweep: the lengths already
        measured are returned (and saved) and the error is recorded in `errors`. Any other exception
        propagates after the measured lengths were saved to `out`; non-finite logits raise
        NonFiniteLogitsError naming the length, the sample and the position.
    """
    # 1. check every argument before any work
    lengths = check_lengths(lengths)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
    tokens = check_tokens(tokens, vocab_size)
    out = check_out(out)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the file whose lengths are reused)")
    try:
        json.dumps(meta or {})
    except TypeError as err:
        raise ValueError(f"meta must be JSON-serializable (it is saved with the results): {err}") from None
    if tokens is None and vocab_size is None:
        raise ValueError("random tokens (tokens=None) need vocab_size=, the model's vocabulary size")
    check_int("bos_id", bos_id, minimum=0, allow_none=True)
    check_int("eos_id", eos_id, minimum=0, allow_none=True)
    bos_id, eos_id = resolve_special_ids(tokens, vocab_size, bos_id, eos_id)
    if chunk_size == "auto":
        chunk_size = DEFAULT_CHUNK_SIZE if accepts_state(model) else None
    elif isinstance(chunk_size, str):
        raise ValueError(f"chunk_size must be 'auto', None or an int, got {chunk_size!r}")
    elif chunk_size is not None and not accepts_state(model):
        raise ValueError(f"chunk_size={chunk_size} needs a model whose call accepts state= and returns "
                         "(logits, state); this one does not: use chunk_size=None")
    cfg = SweepConfig(lengths=lengths, n_samples=n_samples, seed=seed, batch_size=batch_size,
                      chunk_size=chunk_size, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
                      data="random" if tokens is None else f"text:{tokens.numel()}",
                      argmax_over=argmax_over, random_ids=random_ids, lm_prefix=lm_prefix)
    need = (3 if lm_prefix == "tail" else 2) * cfg.lengths[-1]
    if tokens is not None and tokens.numel() < need:
        raise ValueError(f"the token stream has {tokens.numel()} tokens but the largest length "
                         f"{cfg.lengths[-1]} needs {need // cfg.lengths[-1]}L = {need} (lm_prefix="
                         f"{lm_prefix!r}): give more text")
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    argmax_vocab = vocab_size if argmax_over == "vocab" else None     # rows the argmax reads
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()

    try:
        # 2. the fingerprint (model class, logits on a fixed probe, the token stream) and resume
        prev = _load_for_resume(out) if resume and out.exists() else None
        probe_len = (prev.meta["fingerprint"].get("probe_len", PROBE_LEN) if prev is not None
                     else min(PROBE_LEN, 2 * cfg.lengths[0] + 3))
        finger = fingerprint(model, tokens=tokens, vocab_size=vocab_size, argmax_vocab=argmax_vocab,
                             chunk_size=chunk_size, device=device, probe_len=probe_len)
        run_meta = {**asdict(cfg), "lengths": list(cfg.lengths), "torch": torch.__version__,
                    "numpy": np.__version__, "device": str(device), "fingerprint": finger, **(meta or {})}
        done: dict[int, tuple] = {}                  # L -> (copy (n,), lm (n,), seconds) from `out`
        if prev is not None:
            _check_resume(out, prev, run_meta)
            done = {int(L): (c, m, t) for L, c, m, t in zip(prev.lengths, prev.copy_acc, prev.lm_acc,
                                                               prev.seconds)}
        total = sum(2 * n_samples * (2 * L + 3) for L in cfg.lengths if L not in done)
        bar = _Progress(total, progress)
        rows: dict[str, list] = {"lengths": [], "copy": [], "lm": [], "seconds": []}
        errors: dict[int, str] = {}

        def snapshot() -> ForgettingCurve:
            """The curve of every length so far, saved atomically to `out` if given."""
            now = ForgettingCurve(lengths=rows["lengths"], copy_acc=rows["copy"], lm_acc=rows["lm"],
                                  seconds=rows["seconds"], errors=errors, meta=run_meta)
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
                                       eos_id=eos_id, tokens=tokens, vocab_size=vocab_size,
                                       random_ids=cfg.random_ids, lm_prefix=lm_prefix)
                    # step 3: teacher-forced argmax at the scored positions only
                    lo, hi = scored_slice(L)
                    pred = predict_scored(model, lay.ids.to(device), lo, hi, chunk_size=chunk_size,
                                          batch_size=batch_size, vocab_size=argmax_vocab,
                                          on_batch=bar.update)                  # (2n, ceil(L/2))
                except NonFiniteLogitsError as err:
                    sample, cond = err.row % n_samples, ("copy", "LM")[err.row // n_samples]
                    raise NonFiniteLogitsError(
                        f"non-finite (NaN or inf) logits at L={L}, sample {sample} ({cond} condition), "
                        f"sequence position {err.position} of {2 * L + 3} (an argmax would score them "
                        "as a token); the lengths before L are saved", err.row, err.position) from None
                except Exception as err:                                       # noqa: BLE001
                    if not _is_out_of_memory(err):
                        raise
                    errors[L] = f"{type(err).__name__}: {err}"
                    del err
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()             # give the failed attempt's memory back
                    break
                # step 4: accuracy over the last half of the second x
                acc = (pred.cpu() == lay.targets).double().mean(dim=1).numpy()   # (2n,)
                rows["lengths"].append(L)
                rows["copy"].append(acc[:n_samples])
                rows["lm"].append(acc[n_samples:])
                rows["seconds"].append(time.time() - t0)
                snapshot()                                   # nothing measured is lost from here on
        finally:
            bar.close()
        return snapshot()
    finally:
        if was_training:
            model.train()


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
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} is not a file (give text files; a folder's *.py files: "
                                    f"sorted(Path(folder).glob('*.py')))")
        data += Path(p).read_bytes()
        if max_tokens is not None and len(data) >= max_tokens:
            break
    data = bytes(data[:max_tokens] if max_tokens is not None else data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _comma_list(item: type):
    """An argparse type for the project's list flags: '16,64,256' -> [16, 64, 256]."""
    def parse(text: str) -> list:
        try:
            return [item(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (the project's convention: --snake_case flags, comma-separated lists, help
    with the unit and the default on every flag)."""
    ap = argparse.ArgumentParser(description="Forgetting curve of a minimamba.Mamba2LM checkpoint "
                                 "(byte tokens from text files, or random tokens).")
    ap.add_argument("--checkpoint", help="a Mamba2LM.from_pretrained folder (default: %(default)s; required "
                    "unless --from_json)")
    ap.add_argument("--lengths", type=_comma_list(int), help="dependency lengths L in tokens, comma-separated "
                    "(default: %(default)s; required unless --from_json)")
    ap.add_argument("--from_json", default=None, help="only redraw OUT_DIR/curve.png from this curve.json (or an "
                    "official draw.py result file; no model is run; --train_length, --title and --significance "
                    "apply) (default: %(default)s)")
    ap.add_argument("--title", default=None, help="plot title (default: %(default)s = the checkpoint's path)")
    ap.add_argument("--out_dir", required=True, help="output folder: curve.json, curve.png (required)")
    ap.add_argument("--resume", action="store_true", help="reuse the lengths already in OUT_DIR/curve.json "
                    "(refused unless it measured the same model on the same data with the same settings) "
                    "(default: %(default)s)")
    ap.add_argument("--text", type=_comma_list(str), default=None, help="text files read as bytes, comma-separated "
                    "(default: %(default)s = the stdlib's top-level *.py files)")
    ap.add_argument("--random_tokens", action="store_true", help="random tokens instead of text (default: %(default)s)")
    ap.add_argument("--max_text_bytes", type=int, default=None, help="truncate the text stream to this many bytes "
                    "(default: %(default)s = all)")
    ap.add_argument("--n_samples", type=int, default=DEFAULT_N_SAMPLES, help="samples per length "
                    "(default: %(default)s, the paper's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled spans (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per forward call "
                    "(default: %(default)s)")
    ap.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE,
                    help="tokens per forward call, the state carried between chunks; 0 = one call "
                    "(default: %(default)s)")
    ap.add_argument("--bos_id", type=int, default=None, help="BOS token id (default: %(default)s = the smallest "
                    "id absent from the data)")
    ap.add_argument("--eos_id", type=int, default=None, help="EOS token id (default: %(default)s = BOS)")
    ap.add_argument("--significance", choices=SIGNIFICANCE_TESTS, default=DEFAULT_SIGNIFICANCE,
                    help="paired test of the coarse rule; t-test = the official code's (default: %(default)s)")
    ap.add_argument("--argmax_over", choices=ARGMAX_OVER, default="vocab",
                    help="vocab: the first vocab_size logits; all: every row, as the official code "
                    "(default: %(default)s)")
    ap.add_argument("--random_ids", type=_comma_list(int), default=None, metavar="LO,HI",
                    help="random tokens from range(LO, HI); official: 10,32000 (default: %(default)s = range(vocab))")
    ap.add_argument("--lm_prefix", choices=LM_PREFIXES, default="fresh",
                    help="LM prefix u: a fresh window per sample, or the text's last L tokens as the official "
                    "code (default: %(default)s)")
    ap.add_argument("--train_length", type=int, default=None, help="training length in tokens, a marker on the "
                    "plot (default: %(default)s = none)")
    ap.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: %(default)s = "
                    "torch's)")
    return ap


def main(argv: Sequence[str] | None = None) -> ForgettingCurve:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        ap.error(f"--out_dir {out} is a file; it names a folder (curve.json and curve.png go inside)")
    if args.random_ids is not None and len(args.random_ids) != 2:
        ap.error(f"--random_ids takes two ids LO,HI, got {args.random_ids}")
    if args.from_json:
        curve = ForgettingCurve.load(args.from_json)
        train_length = args.train_length if args.train_length is not None else curve.meta.get("train_length")
        curve.plot(out / "curve.png", train_length=train_length, title=args.title,
                   significance=args.significance)
        print(curve.table(args.significance))
        print(json.dumps(curve.summary(significance=args.significance)))
        return curve
    if args.checkpoint is None or args.lengths is None:
        ap.error("--checkpoint and --lengths are required (unless --from_json)")
    check_out(out / "curve.json")                      # before the checkpoint is loaded

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
                             device=args.device, out=out / "curve.json", resume=args.resume, meta=meta,
                             argmax_over=args.argmax_over, lm_prefix=args.lm_prefix,
                             random_ids=tuple(args.random_ids) if args.random_ids else None)
    if curve.lengths.size:
        curve.plot(out / "curve.png", train_length=args.train_length,
                   title=args.title or f"Forgetting curve: {args.checkpoint}", significance=args.significance)
        print(curve.table(args.significance))
        print(json.dumps(curve.summary(significance=args.significance)))
    for L, e in curve.errors.items():
        print(f"stopped at L={L}: {e}", file=sys.stderr)
    return curve


if __name__ == "__main__":
    main()
