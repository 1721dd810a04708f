"""The forgetting curve: how far back can a language model copy? A model-agnostic evaluator.

Paper: Liu et al., "Forgetting Curve: A Reliable Method for Evaluating Memorization Capability for
Long-context Models", arXiv 2410.04727 (EMNLP 2024); official code github.com/1azybug/ForgettingCurve.
Why this project measures it: Chen et al., "Stuffed Mamba", arXiv 2410.07145 (RNNs such as Mamba-2
report "infinite" context yet forget; the forgetting curve measures how much they really keep).

Two conditions share the same target span x of L tokens:
    copy condition:  [BOS] x [BOS] x [EOS]   the model has seen x once and can copy it (L+1 back)
    LM condition:    [BOS] u [BOS] x [EOS]   an unrelated prefix u: x can only be predicted as text
Copy accuracy far above LM accuracy means the model remembers x; copy ~ LM means amnesia.

The protocol (paper section 2), numbered as in the code below:
    1. Build the inputs: n samples of x (and u), each in both layouts, 2L + 3 tokens.
    2. One teacher-forced forward pass per sequence; the prediction at position t is the argmax of
       the logits there, compared with the token at t + 1.
    3. Score the last half of the second x only (m = ceil(L/2) tokens; the first half lets the model
       notice that copying is going on): accuracy per sample and condition.
    4. Repeat over the n samples and every length L; read the curve with the rules.

The reading rules (paper section 2.2; stated in full above `ForgettingCurve.fine_verdicts` and
`ForgettingCurve.coarse_verdicts`). Every tested length gets a verdict: pass, inconclusive or fail.
    fine-grained   pass = pooled copy accuracy >= 0.99; fail = significantly below it (binomial test
                   on the scored tokens, corrected for over-dispersion between samples).
    coarse-grained pass = copy - LM >= 0.05 and significant; fail = significantly below 0.05.
    amnesia        copy ~ LM: coarse fails.
    A memory length is the largest tested L that passes with no failing length at or below it.

Reading order: `forgetting_curve` (step 4) -> `make_layouts` (step 1) -> `predict_scored` (step 2,
chunked for stateful models) -> `measure_length` (step 3) -> `ForgettingCurve` (the rules) -> the
statistics behind the rules -> the argument checks. The command line, resume after a kill, the progress
bar and out-of-memory handling live in experiments/measure_curve.py.

Glossary:
    b   batch (sequences per forward call)         L  dependency length (tokens in x)
    l   sequence length = 2L + 3                    V  logits size (vocabulary, maybe padded)
    n   samples per length                          k  number of tested lengths
    c   chunk size (tokens per call of a stateful model)
    m   scored tokens per sample = ceil(L/2)        M  scored tokens per length = n m
    K_i correct scored tokens of sample i           phi over-dispersion factor (>= 1)

Deliberate differences from the official code (draw.py), each written down where it happens, with the
measured effect of each in docs/forgetting_curve.md (section 3):
    - BOS/EOS ids are the caller's (default: the smallest id absent from the data), not 1/2.
    - Random tokens come from range(vocab_size) minus BOS/EOS, not 10..31999 (`random_ids=`).
    - The argmax reads the first vocab_size logits, not padded rows too (`argmax_over="all"`).
    - A fresh prefix u per sample, disjoint from x, not the corpus' last L tokens (`lm_prefix="tail"`).
    - The memory lengths are computed, with a binomial test (fine) and an effect size (coarse); the
      paired test is a one-sided sign-flip test, not a two-sided t-test (`significance="t-test"`).
    - Batched; stateful models (minimamba.Mamba2LM) run in chunks with the state carried, so memory
      stays bounded (L >= 64K on a CPU); only the scored predictions are kept.
    - Non-finite logits are an error (torch.argmax reads an all-NaN row as token 0).

This file imports only torch, numpy and the standard library (matplotlib inside `plot`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Constants (every default of the evaluator, with its unit and source)
# ------------------------------------------------------------------------------------------------

FORMAT = "minimamba.forgetting_curve/2"   # tag of the JSON files (/2 added meta["fingerprint"])
READABLE_FORMATS = ("minimamba.forgetting_curve/1", FORMAT)
DEFAULT_N_SAMPLES = 10            # n: samples per length (paper / official code: 10)
DEFAULT_BATCH_SIZE = 8            # b: sequences per forward call (copy and LM rows share batches)
DEFAULT_CHUNK_SIZE = 4096         # c: tokens per call of a stateful model (b c V logits live at once)
DEFAULT_THRESHOLD = 0.99          # fine-grained memory: copy accuracy >= 99% (paper section 2.2)
DEFAULT_MIN_EFFECT = 0.05         # coarse-grained memory: copy - LM >= 5 points (ours: rejects the
                                  # collapsed curves of paper 2.2, copy ~5-9% vs LM a few points less)
DEFAULT_ALPHA = 0.05              # significance level of every test (official code: p < 0.05)
SIGNIFICANCE_TESTS = ("sign-flip", "t-test")   # the paired tests of the coarse rule
DEFAULT_SIGNIFICANCE = "sign-flip"             # ours; "t-test" = the official scipy.stats.ttest_rel
PASS, INCONCLUSIVE, FAIL = "pass", "inconclusive", "fail"   # the verdicts of one tested length
ARGMAX_OVER = ("vocab", "all")    # "vocab": the first vocab_size logits (ours); "all": every row (official)
LM_PREFIXES = ("fresh", "tail")   # "fresh": a new window per sample (ours); "tail": the text's last L
OFFICIAL_RANDOM_IDS = (10, 32000) # draw.py get_random_example: random.randint(10, 31999), inclusive
COUNT_ROUND_TOL = 0.01            # tokens: a stored accuracy * m this close to an integer is that
                                  # integer (float32 accuracies of the official JSON: ~0.002 off)
ZERO_SPREAD_RTOL = 1e-12          # t-test: sd(d) <= this * max|d_i| is rounding noise, no spread
EXACT_TEST_MAX_N = 16             # sign flips: enumerate all 2^n patterns up to n = 16 (65536)
DEFAULT_N_RESAMPLES = 20_000      # Monte Carlo sign flips beyond that
BETACF_EPS = 1e-15                # relative convergence of the incomplete-beta continued fraction
BETACF_FPMIN = 1e-300             # guard against division by zero in Lentz's method (NR 6.4)
BETACF_MAX_ITER = 100_000         # it needs O(sqrt(max(a, b))) terms (NR 6.4): < 600 at M = 327680


# ------------------------------------------------------------------------------------------------
# The settings of one sweep
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepConfig:
    """The resolved settings of one sweep (built and checked by `resolve_sweep`; stored in the meta)."""

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

    @property
    def argmax_vocab(self) -> int | None:
        """The logit rows the argmax reads: the first vocab_size, or all (None)."""
        return self.vocab_size if self.argmax_over == "vocab" else None


# ------------------------------------------------------------------------------------------------
# Step 4: the sweep over lengths (steps 1-3 for each length)
# ------------------------------------------------------------------------------------------------

def forgetting_curve(
    model: Callable, *, lengths: Sequence[int], tokens: torch.Tensor | None = None,
    vocab_size: int | None = None, n_samples: int = DEFAULT_N_SAMPLES, bos_id: int | None = None,
    eos_id: int | None = None, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int | None | str = "auto", device: torch.device | str | None = None,
    out: str | os.PathLike | None = None, meta: dict[str, Any] | None = None,
    argmax_over: str = "vocab", random_ids: tuple[int, int] | None = None, lm_prefix: str = "fresh",
) -> ForgettingCurve:
    """Measure the forgetting curve of `model` at each dependency length (protocol in the module doc).

    Args:
        model: a callable taking a LongTensor (b, l) and returning logits (b, l, V), a tuple whose first
            element is the logits (minimamba.Mamba2LM), or an object with `.logits` (Hugging Face).
            Assumed causal. An nn.Module in training mode runs in eval() and is switched back.
        lengths: dependency lengths L, strictly increasing ints >= 1 (each sequence has 2L + 3 tokens).
        tokens: (N,) integer tensor, a stream of natural text (x and a disjoint u are windows of it;
            N >= 2 max L), or None for random tokens.
        vocab_size: the model's vocabulary size; needed for random tokens.
        n_samples: n, samples per length; the copy and LM rows of a sample share the same x (paired).
        bos_id, eos_id: the separator and end ids; None -> `resolve_special_ids`.
        seed: the data of length L come from np.random.default_rng([seed, L]), so a length's result
            does not depend on which other lengths are swept.
        batch_size: sequences per forward call.
        chunk_size: "auto" = DEFAULT_CHUNK_SIZE if the model's call accepts a `state` keyword, else None;
            None = the whole sequence in one call; an int c = chunks of c tokens, model(ids, state=state)
            -> (logits, state), the state carried (bounded memory at any L).
        device: where the inputs go; default: the device of the model's first parameter, else CPU.
        out: optional JSON path, checked before any work and rewritten atomically after every length.
        meta: extra JSON-able information stored with the result (e.g. checkpoint, mitigation).
        argmax_over, random_ids, lm_prefix: the official code's choices, see SweepConfig.
    Returns:
        A ForgettingCurve. NonFiniteLogitsError names the length, sample and position of a NaN or inf
        logit; any exception propagates after the lengths already measured were saved to `out`.
    Long sweeps: experiments.measure_curve.measure_curve takes the same arguments and adds resume after
    a kill, a progress bar and out-of-memory handling.
    """
    out = check_out(out)
    cfg, tokens, device, run_meta = resolve_sweep(
        model, lengths=lengths, tokens=tokens, vocab_size=vocab_size, n_samples=n_samples, bos_id=bos_id,
        eos_id=eos_id, seed=seed, batch_size=batch_size, chunk_size=chunk_size, device=device, meta=meta,
        argmax_over=argmax_over, random_ids=random_ids, lm_prefix=lm_prefix)
    rows = []                                            # (L, copy (n,), lm (n,), seconds) per length
    with eval_mode(model):
        for L in cfg.lengths:
            t0 = time.time()
            copy, lm = measure_length(model, L, cfg, tokens, device)
            rows.append((L, copy, lm, time.time() - t0))
            curve = ForgettingCurve.from_rows(rows, meta=run_meta)
            if out is not None:
                curve.save(out)                          # nothing measured is lost from here on
    return curve


@contextlib.contextmanager
def eval_mode(model: Callable) -> Iterator[None]:
    """An nn.Module in training mode runs in eval() inside the block and is switched back after."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


# ------------------------------------------------------------------------------------------------
# Step 1: the two layouts
# ------------------------------------------------------------------------------------------------

def resolve_special_ids(tokens: torch.Tensor | None, vocab_size: int | None, bos_id: int | None,
                        eos_id: int | None) -> tuple[int, int]:
    """The BOS and EOS ids of the layouts. Nothing is hard-coded (official: BOS = 1, EOS = 2).

    When the caller gives none (a tokenizer without special tokens, e.g. raw bytes):
        BOS = the smallest id in range(vocab_size) that does not occur in `tokens` (random tokens: 0,
              which is then never drawn; UTF-8 text read as bytes: byte 0, NUL);
        EOS = BOS (one separator id, as in tokenizers where BOS = EOS).
    """
    if bos_id is None and tokens is None:
        bos_id = 0
    elif bos_id is None:
        size = vocab_size if vocab_size is not None else int(tokens.max()) + 1
        present = torch.zeros(size + 1, dtype=torch.bool)
        present[tokens.clamp(max=size)] = True
        free = (~present[:size]).nonzero().flatten()
        if free.numel() == 0:
            raise ValueError(f"every id in range({size}) occurs in `tokens`, "
                             "so no id is free to serve as the BOS separator: "
                             "pass bos_id= (and eos_id=) explicitly, e.g. the tokenizer's BOS")
        bos_id = int(free[0])
    eos_id = bos_id if eos_id is None else eos_id
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{name}={value} is outside range(vocab_size={vocab_size})")
    return int(bos_id), int(eos_id)


def scored_slice(L: int) -> tuple[int, int]:
    """Logit positions [lo, hi) that are scored for dependency length L.

    Layout positions: 0 = BOS, 1..L = first span, L+1 = BOS, L+2..2L+1 = second x, 2L+2 = EOS.
    The logit at position t predicts token t+1, so x_j (at L+2+j) is predicted at L+1+j.
    Scored: j = L - ceil(L/2) .. L-1 (the last ceil(L/2) tokens of the second x), i.e.
        lo = L + 1 + floor(L/2),  hi = 2L + 1.
    """
    return L + 1 + L // 2, 2 * L + 1


@dataclass
class Layouts:
    """The 2n sequences of one length: rows [0, n) copy condition, rows [n, 2n) LM condition."""

    ids: torch.Tensor        # (2n, 2L+3) long
    targets: torch.Tensor    # (2n, ceil(L/2)) long: the scored tokens (last half of the second x)
    first: int               # position of the first logit that is scored (predicts targets[:, 0])
    x_start: np.ndarray      # (n,) start of x in the token stream (-1 for random tokens)
    u_start: np.ndarray      # (n,) start of u in the token stream (-1 for random tokens)


def make_layouts(
    L: int, n: int, rng: np.random.Generator, *, bos_id: int, eos_id: int,
    tokens: torch.Tensor | None = None, vocab_size: int | None = None,
    random_ids: tuple[int, int] | None = None, lm_prefix: str = "fresh",
) -> Layouts:
    """Step 1 for one length: n samples of x (and u), in both layouts.

    Natural text (`tokens` given, N tokens):
        lm_prefix="fresh" (ours): x and u are two non-overlapping windows of the stream, placed by two
            sorted uniform offsets in the slack N - 2L and randomly assigned to x and u (needs N >= 2L).
        lm_prefix="tail" (official draw.py get_order_example): x starts uniformly in [0, N - 3L] and u
            is the stream's last L tokens, the same for every sample (needs N >= 3L).
    Random tokens (`tokens` None): x and u i.i.d. uniform over range(lo, hi) without the special ids;
    (lo, hi) = random_ids, default (0, vocab_size) (official: (10, 32000) whatever the model).
    """
    ids = torch.empty(2 * n, 2 * L + 3, dtype=torch.long)                       # (2n, l)
    x_start, u_start = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    if tokens is None:
        lo, hi = random_ids if random_ids is not None else (0, vocab_size)
        allowed = np.setdiff1d(np.arange(lo, hi), [bos_id, eos_id])
        if allowed.size == 0:
            raise ValueError(f"range({lo}, {hi}) leaves no ids besides the special ones")
        xs = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
        us = torch.from_numpy(allowed[rng.integers(0, allowed.size, (n, L))])   # (n, L)
    else:
        N = tokens.numel()
        xs, us = torch.empty(n, L, dtype=torch.long), torch.empty(n, L, dtype=torch.long)
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
# Step 2: one teacher-forced pass, the predictions at the scored positions
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_scored(
    model: Callable, ids: torch.Tensor, lo: int, hi: int, *, chunk_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE, vocab_size: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Step 2: argmax predictions at logit positions [lo, hi) of every row of `ids`.

    Args:
        ids: (B, l) long, on the model's device.
        chunk_size: None = one call per batch, model(ids_b) -> logits (b, l, V). An int c = the model
            carries state: model(ids_b[:, s:s+c], state=state) -> (logits, state), the state handed to
            the next chunk (minimamba.Mamba2LM streams exactly this way). Only the logits inside
            [lo, hi) are kept, so memory is O(b c V) whatever l is; chunks after hi are skipped (a
            causal model's scored logits cannot depend on them).
        vocab_size: if given, the argmax reads logits[..., :vocab_size] only (a padded vocabulary's
            extra rows are not tokens); None = all V rows (the official code).
        on_tokens: called with the number of tokens processed (per chunk and per batch), summing to
            ids.numel() (a progress bar).
    Returns:
        (B, hi - lo) long predictions (on the model's device).
    """
    preds = []
    for r in range(0, ids.shape[0], batch_size):
        batch = ids[r:r + batch_size]                                            # (b, l)
        done = 0                                        # tokens of this batch reported so far
        if chunk_size is None:
            logits = logits_of(model(batch), batch)                             # (b, l, V)
            preds.append(_argmax_checked(logits[:, lo:hi, :vocab_size], r, lo))  # (b, hi-lo)
            del logits
        else:
            state, pieces = None, []
            for s in range(0, hi, chunk_size):
                piece = batch[:, s:s + chunk_size]                              # (b, c)
                logits, state = call_with_state(model, piece, state)            # (b, c, V)
                a, z = max(lo, s), min(hi, s + piece.shape[1])
                if a < z:
                    pieces.append(_argmax_checked(logits[:, a - s:z - s, :vocab_size], r, a))  # (b, z-a)
                del logits
                if on_tokens is not None:               # progress per chunk (long L: minutes each)
                    on_tokens(piece.numel())
                    done += piece.numel()
            preds.append(torch.cat(pieces, dim=1))                              # (b, hi-lo)
        if on_tokens is not None:
            on_tokens(batch.numel() - done)             # the rest of the batch (all of it unchunked)
    return torch.cat(preds, dim=0)


def accepts_state(model: Callable) -> bool:
    """True if the model's call takes a `state` keyword (minimamba.Mamba2LM.forward(input_ids, state))."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return "state" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_with_state(model: Callable, piece: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """One chunk of a stateful model: model(piece, state=state) -> (logits (b, c, V), the new state)."""
    out = model(piece, state=state)
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ValueError("with chunk_size set, the model must return (logits, state) when "
                         f"called as model(ids, state=state); got {type(out).__name__}")
    return logits_of(out, piece), out[1]


def logits_of(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits (b, l, V) from a model output: a tensor, a tuple starting with them, or `.logits`."""
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
    all-NaN row silently reads as token 0 in the official code; +inf always wins).

    row: the row of `ids` (in a sweep: 0..n-1 copy condition, n..2n-1 LM condition);
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


# ------------------------------------------------------------------------------------------------
# Step 3: score the last half of the second x
# ------------------------------------------------------------------------------------------------

def measure_length(model: Callable, L: int, cfg: SweepConfig, tokens: torch.Tensor | None,
                   device: torch.device | str, on_tokens: Callable[[int], None] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 at one length: (copy accuracy (n,), LM accuracy (n,)) of the n samples.

    accuracy_i = (1/m) sum_{j = L-m .. L-1} [argmax logits at x_j's predecessor == x_j],  m = ceil(L/2)
    """
    n = cfg.n_samples
    lay = make_layouts(L, n, np.random.default_rng([cfg.seed, L]), bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                       tokens=tokens, vocab_size=cfg.vocab_size, random_ids=cfg.random_ids,
                       lm_prefix=cfg.lm_prefix)
    lo, hi = scored_slice(L)
    try:
        pred = predict_scored(model, lay.ids.to(device), lo, hi, chunk_size=cfg.chunk_size,
                              batch_size=cfg.batch_size, vocab_size=cfg.argmax_vocab,
                              on_tokens=on_tokens)                               # (2n, m)
    except NonFiniteLogitsError as err:
        sample, cond = err.row % n, ("copy", "LM")[err.row // n]
        raise NonFiniteLogitsError(
            f"non-finite (NaN or inf) logits at L={L}, sample {sample} ({cond} condition), sequence "
            f"position {err.position} of {2 * L + 3} (an argmax would score them as a token)",
            err.row, err.position) from None
    acc = (pred.cpu() == lay.targets).double().mean(dim=1).numpy()              # (2n,)
    return acc[:n], acc[n:]


# ------------------------------------------------------------------------------------------------
# The curve and its reading rules
# ------------------------------------------------------------------------------------------------

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

    Reading API (arrays are (k,), one entry per tested length):
        fine_verdicts, coarse_verdicts             -> "pass" / "inconclusive" / "fail"
        fine_grained_length, coarse_grained_length -> int (0 = no such memory)
        fine_pvalues, dispersion, p_values         -> the numbers behind the verdicts
        summary()                                  -> all of it, JSON-ready, with the rule parameters
    Each memory length is a lower bound set by the grid (the truth lies between it and the next tested
    length); if the sweep stopped at an error (`errors`) the memory may be longer. Fine-grained usually
    implies coarse-grained, but not when the LM accuracy is itself near 1 (very predictable text).
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
        self.seconds = np.asarray(np.full(k, np.nan) if self.seconds is None else self.seconds,
                                  dtype=np.float64).reshape(k)
        self.errors = {int(key): str(v) for key, v in self.errors.items()}
        check_curve(self)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple], errors: dict[int, str] | None = None,
                  meta: dict[str, Any] | None = None) -> ForgettingCurve:
        """A curve from (L, copy (n,), lm (n,), seconds) rows, one per measured length."""
        L, copy, lm, seconds = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
        return cls(lengths=L, copy_acc=copy, lm_acc=lm, seconds=seconds, errors=errors or {}, meta=meta or {})

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

    # ---- the fine-grained rule ----
    # Can the model copy (almost) every token from L + 1 positions back? At one tested length: n
    # samples of m = ceil(L/2) scored tokens, sample i got K_i right. Pool them: K = sum_i K_i of
    # M = n m tokens, rate p_hat = K / M (= the mean copy accuracy).
    #   over-dispersion  phi = max(1, X^2 / (n - 1)),  X^2 = sum_i (K_i - m p_hat)^2 / (m p_hat (1 - p_hat))
    #                    (phi = 1 when n = 1, m = 1 or p_hat in {0, 1}: nothing to estimate it from)
    #   p_fine           = P[Binomial(M / phi, threshold) <= K / phi]   (one-sided test of
    #                      H0: copy rate >= threshold against H1: below it)
    #   verdict          PASS          if p_hat >= threshold
    #                    FAIL          if p_hat <  threshold and p_fine <  alpha
    #                    INCONCLUSIVE  if p_hat <  threshold and p_fine >= alpha
    # Why: the shortest lengths score few tokens (L = 2: one per sample), so one miss drops the mean
    # below 0.99 although so few tokens cannot tell 0.95 from 0.99; pooled tokens tell them apart at
    # long lengths (Llama-3-8B: 20 misses in 20670 tokens pass at L = 4134). Tokens of one sample are
    # not independent (a sample can be lost as a whole), so phi, the Pearson over-dispersion, divides
    # both counts: the Rao-Scott design-effect correction (Rao & Scott, Biometrics 48:577, 1992).
    # Error rates per length (false fail <= alpha at exactly 0.99; false pass likely at short L):
    # docs/forgetting_curve.md, section 1.

    def dispersion(self) -> np.ndarray:
        """(k,) phi, the over-dispersion of the copy counts between samples (1 = binomial)."""
        return np.array([binomial_below_pvalue(K, m, DEFAULT_THRESHOLD)[1]
                         for K, m in zip(self.copy_correct, self.scored_tokens)])

    def fine_pvalues(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """(k,) p_fine: the one-sided, dispersion-corrected binomial p-value of copy rate < threshold."""
        check_probability("threshold", threshold)
        return np.array([binomial_below_pvalue(K, m, threshold)[0]
                         for K, m in zip(self.copy_correct, self.scored_tokens)])

    def fine_verdicts(self, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
        """(k,) PASS / INCONCLUSIVE / FAIL of the fine-grained rule (stated above)."""
        check_probability("alpha", alpha)
        p_hat = self.copy_correct.sum(axis=1) / (self.scored_tokens * self.copy_acc.shape[1])
        below = p_hat < threshold
        fail = below & (self.fine_pvalues(threshold) < alpha)
        return np.where(~below, PASS, np.where(fail, FAIL, INCONCLUSIVE))

    def fine_mask(self, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
        """(k,) bool: the length passes the fine rule."""
        return self.fine_verdicts(threshold) == PASS

    def fine_grained_length(self, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> int:
        return memory_length(self.fine_verdicts(threshold, alpha), self.lengths)

    # ---- the coarse-grained rule ----
    # Does the first copy help at all, by a margin worth calling memory? At one tested length: paired
    # differences d_i = copy_i - lm_i (same x in both), effect = mean(d).
    #   p_above = paired_pvalue(d)               test of copy > LM
    #   p_below = paired_pvalue(min_effect - d)  test of copy - LM < min_effect
    #   verdict  PASS          if effect >= min_effect and p_above < alpha
    #            FAIL          if effect <  min_effect and p_below < alpha
    #            INCONCLUSIVE  otherwise
    # The effect size is what paper section 2.2 asks for: a bare p < 0.05 calls Llama-3-8B's gap
    # "significant" at L = 9293 where both curves have collapsed to 5-9%. `significance`: "sign-flip"
    # (default; one-sided, exact over 2^n patterns, no normality assumption; n >= 5 at alpha = 0.05)
    # or "t-test" (the official two-sided ttest_rel; the direction comes from the effect's sign, so a
    # one-sided test at alpha / 2). For p_below the sign-flip test assumes differences symmetric about
    # min_effect, an approximation. Amnesia (copy == LM in every sample): d = 0, FAIL.

    def p_values(self, significance: str = DEFAULT_SIGNIFICANCE, *, n_resamples: int = DEFAULT_N_RESAMPLES,
                 seed: int = 0) -> np.ndarray:
        """(k,) paired p-values of copy > LM ("sign-flip": one-sided; "t-test": two-sided, official)."""
        return np.array([paired_pvalue(c - m, significance, n_resamples=n_resamples, seed=seed)
                         for c, m in zip(self.copy_acc, self.lm_acc)])

    def coarse_verdicts(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA, *,
                        significance: str = DEFAULT_SIGNIFICANCE, n_resamples: int = DEFAULT_N_RESAMPLES,
                        seed: int = 0) -> np.ndarray:
        """(k,) PASS / INCONCLUSIVE / FAIL of the coarse-grained rule (stated above). Raises if the
        test cannot reach p < alpha with this many samples (instead of silently reading 0)."""
        check_probability("alpha", alpha)
        check_significance_reachable(self.copy_acc.shape[1], alpha, significance)
        d = self.copy_acc - self.lm_acc                                           # (k, n)
        effect = d.mean(axis=1)
        kw = dict(n_resamples=n_resamples, seed=seed)
        p_above = np.array([paired_pvalue(row, significance, **kw) for row in d])
        p_below = np.array([paired_pvalue(min_effect - row, significance, **kw) for row in d])
        passed = (effect >= min_effect) & (p_above < alpha)
        failed = (effect < min_effect) & (p_below < alpha)
        return np.where(passed, PASS, np.where(failed, FAIL, INCONCLUSIVE))

    def coarse_mask(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA,
                    **kw: Any) -> np.ndarray:
        """(k,) bool: the length passes the coarse rule (keywords as coarse_verdicts)."""
        return self.coarse_verdicts(min_effect, alpha, **kw) == PASS

    def coarse_grained_length(self, min_effect: float = DEFAULT_MIN_EFFECT, alpha: float = DEFAULT_ALPHA,
                              **kw: Any) -> int:
        return memory_length(self.coarse_verdicts(min_effect, alpha, **kw), self.lengths)

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
        k = self.lengths.size
        s = self.summary(significance=significance) if k else {}
        coarse = s.get("coarse_verdicts") or ["-"] * k
        p_fine, p = (self.fine_pvalues(), self.p_values(significance)) if k else ([], [])
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
                "lm_acc": self.lm_acc.tolist(),
                "seconds": [None if math.isnan(s) else s for s in self.seconds.tolist()],
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
    def load(cls, path: str | os.PathLike) -> ForgettingCurve:
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
        """Copy and LM accuracy (mean, +-1 std band) vs L, with the regions of the rules shaded: fine
        up to the fine-grained length, coarse beyond it up to the coarse-grained length, amnesia
        beyond both. Copy points with an inconclusive fine verdict are hollow. `train_length` marks
        L = the model's training length (the longest dependency seen in training)."""
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
            ax.xaxis.set_major_formatter(
                FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
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
        lo_x, hi_x = edges[0], edges[-1]
        if train_length is not None:             # the marker, kept in view
            ax.axvline(train_length, color="k", ls="--", lw=1, label=f"training length {train_length}")
            lo_x = min(lo_x, train_length / 1.25 if log_x else train_length)
            hi_x = max(hi_x, train_length * 1.1)
        ax.set_xlim(lo_x, hi_x)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("dependency length L (tokens)")
        ax.set_ylabel(f"accuracy, last half of x (mean +- std, n={n})")
        ax.set_title(title or "Forgetting curve", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)


# ================================================================================================
# Statistics behind the rules: the incomplete beta function -> binomial and Student t; sign flips.
# numpy and the standard library only (no scipy); tests: tests/test_forgetting_curve.py, "statistics".
# ================================================================================================

def binomial_below_pvalue(correct: np.ndarray, m: int, threshold: float) -> tuple[float, float]:
    """The fine rule at one length: (p_fine, phi) of H0: copy rate >= threshold (the rule is stated
    above `ForgettingCurve.fine_verdicts`). correct: (n,) K_i per sample; m scored tokens per sample."""
    K = np.asarray(correct, dtype=np.float64).ravel()                           # (n,)
    n, M = K.size, K.size * m
    p_hat = float(K.sum()) / M
    phi = 1.0
    if n > 1 and m > 1 and 0.0 < p_hat < 1.0:
        pearson = float(np.sum((K - m * p_hat) ** 2)) / (m * p_hat * (1.0 - p_hat))
        phi = max(1.0, pearson / (n - 1))
    return binomial_cdf(float(K.sum()) / phi, M / phi, threshold), phi


def binomial_cdf(k: float, M: float, p: float) -> float:
    """P[X <= k] for X ~ Binomial(M, p):  P[X <= k] = I_{1-p}(M - k, k + 1)  (Numerical Recipes eq. 6.4.12).
    Also defined for real k and M (the effective counts k/phi of M/phi); exact for integers."""
    if k < 0:
        return 0.0
    if k >= M:
        return 1.0
    return regularized_incomplete_beta(M - k, k + 1.0, 1.0 - p)


def paired_pvalue(diff: np.ndarray, significance: str = DEFAULT_SIGNIFICANCE, *,
                  n_resamples: int = DEFAULT_N_RESAMPLES, seed: int = 0) -> float:
    """p-value of "mean(diff) > 0" by the chosen test: "sign-flip" (one-sided, ours) or "t-test"
    (two-sided, official; a caller that needs the direction checks the sign of the mean)."""
    if significance == "sign-flip":
        return paired_sign_flip_pvalue(diff, n_resamples=n_resamples, seed=seed)
    if significance == "t-test":
        return paired_t_test_pvalue(diff)
    raise ValueError(f"significance must be one of {SIGNIFICANCE_TESTS}, got {significance!r}")


def paired_sign_flip_pvalue(diff: np.ndarray, *, n_resamples: int = DEFAULT_N_RESAMPLES,
                            seed: int = 0) -> float:
    """One-sided paired sign-flip (permutation) test of H1: mean(diff) > 0.

    Under H0 (the prefix does not matter) each paired difference d_i = copy_i - lm_i is as likely to
    be -d_i, so the observed mean is compared with the means of all 2^n sign patterns:
        p = #{s in {-1,+1}^n : mean(s * d) >= mean(d)} / 2^n            (exact, n <= 16)
        p = (1 + #{resampled s with mean(s * d) >= mean(d)}) / (1 + R)  (Monte Carlo, n > 16)
    The identity pattern always counts, so p >= 2^-n: n < 5 can never reach p < 0.05. All-zero
    differences give p = 1.
    """
    d = _finite_diffs(diff)                                                    # (n,)
    n, observed = d.size, d.mean()
    tol = 1e-12 * max(1.0, np.abs(d).max(initial=0.0))     # ties count as "at least as extreme"
    if n <= EXACT_TEST_MAX_N:
        signs = 2.0 * (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :] & 1) - 1.0   # (2^n, n)
        return float(np.mean(signs @ d / n >= observed - tol))
    signs = np.random.default_rng(seed).integers(0, 2, (n_resamples, n)) * 2.0 - 1.0  # (R, n)
    return float((1 + np.sum(signs @ d / n >= observed - tol)) / (1 + n_resamples))


def paired_t_test_pvalue(diff: np.ndarray) -> float:
    """Two-sided paired t-test of H0: mean(diff) = 0, as the official code's scipy.stats.ttest_rel:
        t = mean(d) / (sd(d) / sqrt(n)),  sd with n - 1 in the denominator,  df = n - 1,
        p = P[|T_df| >= |t|].
    Zero spread (sd <= ZERO_SPREAD_RTOL max|d_i|): p = 1 if every d_i = 0 (scipy returns NaN there and
    the official code maps it to 1.0), else p = 0 (scipy: t = +-inf). Needs n >= 2."""
    d = _finite_diffs(diff)                                                    # (n,)
    n = d.size
    if n < 2:
        raise ValueError(f"the paired t-test needs n >= 2 samples, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= ZERO_SPREAD_RTOL * float(np.abs(d).max()):
        return 1.0 if not d.any() else 0.0
    return student_t_sf2(mean / (sd / math.sqrt(n)), n - 1)


def student_t_sf2(t: float, df: float) -> float:
    """Two-sided tail of Student's t:  P[|T| >= |t|] = I_{df / (df + t^2)}(df / 2, 1 / 2)  (NR eq. 6.4.9)."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1 (Numerical Recipes 6.4, betai).

    The prefactor x^a (1-x)^b / (a B(a, b)) is computed in logs; the continued fraction is evaluated
    directly for x < (a + 1) / (a + b + 2) and through I_x(a, b) = 1 - I_{1-x}(b, a) otherwise, where
    each converges in O(sqrt(max(a, b))) terms. Real (non-integer) a, b are fine.
    """
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, "
                         f"got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes 6.4, betacf):
        I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))
        d_{2j+1} = -(a + j)(a + b + j) x / ((a + 2j)(a + 2j + 1)),
        d_{2j}   = j (b - j) x / ((a + 2j - 1)(a + 2j))
    Returns the fraction 1 / (1 + d_1 / ...); it converges fast for x < (a + 1) / (a + b + 2)."""
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


def _finite_diffs(diff: np.ndarray) -> np.ndarray:
    """diff as a flat float64 array, refusing NaN or inf (a NaN mean compares False everywhere: the
    sign-flip test would read p = 0, significant)."""
    d = np.asarray(diff, dtype=np.float64).ravel()                             # (n,)
    if not np.isfinite(d).all():
        raise ValueError(f"paired differences must be finite, got {d[~np.isfinite(d)][:3]} among {d.size}")
    return d


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
# Checks at the public boundary (say what was expected and what was received)
# ------------------------------------------------------------------------------------------------

def resolve_sweep(model: Callable, *, lengths: Sequence[int], tokens: Any, vocab_size: int | None,
                  n_samples: int, bos_id: int | None, eos_id: int | None, seed: int, batch_size: int,
                  chunk_size: int | None | str, device: torch.device | str | None, meta: dict | None,
                  argmax_over: str, random_ids: tuple[int, int] | None, lm_prefix: str,
                  ) -> tuple[SweepConfig, torch.Tensor | None, torch.device | str, dict[str, Any]]:
    """The arguments of `forgetting_curve`, checked before any model call and resolved:
    (settings, tokens as a CPU LongTensor or None, device, the meta stored with the results)."""
    lengths = check_lengths(lengths)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
    tokens = check_tokens(tokens, vocab_size)
    for name, value in (("n_samples", n_samples), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    check_int("seed", seed, minimum=0)
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
    check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    if chunk_size is not None and not accepts_state(model):
        raise ValueError(f"chunk_size={chunk_size} needs a model whose call accepts state= and returns "
                         "(logits, state); this one does not: use chunk_size=None")
    if argmax_over not in ARGMAX_OVER:
        raise ValueError(f"argmax_over must be one of {ARGMAX_OVER}, got {argmax_over!r}")
    if lm_prefix not in LM_PREFIXES:
        raise ValueError(f"lm_prefix must be one of {LM_PREFIXES}, got {lm_prefix!r}")
    if lm_prefix == "tail" and tokens is None:
        raise ValueError("lm_prefix='tail' needs natural text (tokens=); random tokens always "
                         "draw a fresh u, as the official code does")
    if random_ids is not None:
        random_ids = check_random_ids(random_ids, tokens, vocab_size)
    cfg = SweepConfig(lengths=lengths, n_samples=int(n_samples), seed=int(seed), batch_size=int(batch_size),
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
    run_meta = {**asdict(cfg), "lengths": list(cfg.lengths), "torch": torch.__version__,
                "numpy": np.__version__, "device": str(device), **(meta or {})}
    return cfg, tokens, device, run_meta


def check_random_ids(random_ids: Any, tokens: torch.Tensor | None, vocab_size: int | None) -> tuple[int, int]:
    """random_ids=(lo, hi) for random tokens: 0 <= lo < hi <= vocab_size."""
    if tokens is not None:
        raise ValueError("random_ids= applies to random tokens only (tokens=None)")
    if (not isinstance(random_ids, (tuple, list)) or len(random_ids) != 2
            or not all(_is_int(v) for v in random_ids)):
        raise TypeError(f"random_ids must be a pair of ints (lo, hi), got {random_ids!r}")
    lo, hi = (int(v) for v in random_ids)
    if not 0 <= lo < hi or (vocab_size is not None and hi > vocab_size):
        raise ValueError(f"random_ids=({lo}, {hi}) must satisfy 0 <= lo < hi <= vocab_size="
                         f"{vocab_size} (the official (10, 32000) needs >= 32000 ids)")
    return lo, hi


def check_curve(curve: ForgettingCurve) -> None:
    """A ForgettingCurve's arrays (called by its __post_init__)."""
    if curve.copy_acc.shape != curve.lm_acc.shape:
        raise ValueError(f"copy_acc {curve.copy_acc.shape} and lm_acc {curve.lm_acc.shape} differ")
    if np.any(curve.lengths < 1):
        raise ValueError(f"lengths must be >= 1, got {curve.lengths.tolist()}")
    for name, acc in (("copy_acc", curve.copy_acc), ("lm_acc", curve.lm_acc)):
        if not np.all((acc >= 0) & (acc <= 1)):               # also catches NaN
            raise ValueError(f"{name} must hold accuracies in [0, 1]; got values outside (or NaN)")


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (True would silently mean 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """`value` as an int, or TypeError / ValueError naming the argument
    (floats are refused, not truncated)."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r} "
                        f"({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (float, int)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_lengths(lengths: Any) -> tuple[int, ...]:
    """Strictly increasing positive ints (a string such as "16" is refused: iterating it would
    measure L = 1 and L = 6)."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, (Sequence, np.ndarray, range)):
        raise TypeError(f"lengths must be a sequence of ints (e.g. [16, 64, 256]), got {lengths!r} "
                        f"({type(lengths).__name__})")
    bad = [x for x in lengths if not _is_int(x)]
    if bad:
        raise TypeError(f"lengths must be integers, got {bad[0]!r} ({type(bad[0]).__name__}) "
                        f"in {list(lengths)}")
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
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind in "iu":
        tokens = torch.from_numpy(tokens)
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
