"""Measurements of long-context memory with the state carried: the support code of the question scripts.

What it measures (each a typed, frozen record; dataclasses.asdict makes it JSON)
    per-position loss   the loss at each position with the state carried across chunks, per prompt
                        (b, l), under the full state or any mitigation ([SC] section 3's measurement)
    Excess E(k)         E(k) = mean over [kT, 2kT) of loss(full state) - loss(sliding window r = T),
                        with a percentile bootstrap interval over prompts (windows of text). E > 0:
                        carrying more than the training window hurts, which is what state collapse is
                        once the probe is stationary; an exact-window model has E = 0 by construction.
    Horizon             the smallest window r (from a grid) whose loss over [T, 8T) is within
                        HORIZON_TOLERANCE of the full state's: how much context the model uses. A
                        collapse verdict is untestable where the horizon is far below T (the model
                        never uses its window, so it has nothing to forget).
    BucketVerdict       [SC]'s failure criterion on bucketed loss: max over buckets in [T, l) of the
                        prompt-mean loss > PAPER_COLLAPSE_FACTOR x max over buckets in [T/2, T). The
                        reference is [T/2, T), never position 0 (at byte level position 0 is context-free
                        and its loss is above uniform, so the per-position rule can never fire on text).
    Mechanism           per-head state norm and largest channel over time, the channel histogram of
                        the largest head at T vs 16 T, first-token retention at equal absolute
                        positions, the share of heads whose retention over T tokens exceeds 0.99.

Papers
    [SC] Stuffed Mamba, arXiv 2410.07145 (the loss-vs-position probe, the 2x criterion, the mechanism).
    [UE] Buitrago Ruiz & Gu, arXiv 2507.02782 (unexplored states; the training-side fixes this pairs with).

Reading order
    1. statistics     Interval, bootstrap_mean (over prompts), median_of
    2. losses         per_position_loss (b, l) with the state carried; LossFn = (ids, window) -> (b, l)
    3. E(k)           excess
    4. criterion      bucketed_criterion
    5. horizon        horizon
    6. mechanism      mechanism (state statistics streamed chunk by chunk; retention from dt * A)

Glossary
    T  the training length (T_train)     l  probe length     k  E(k)'s multiple of T     r  window
    b  prompts (windows of the probe)    h  heads    p  headdim    n  d_state
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import minimamba_kernels as kernels
import mitigations as M
from minimamba import Mamba2LM

from experiments.common import resolve_device

# ----------------------------------------------------------------------------------------------
# Constants (frozen in PREREGISTRATION.md before any reported run)
# ----------------------------------------------------------------------------------------------
CI_LEVEL = 0.95  # two-sided level of every bootstrap interval
N_BOOTSTRAP = 2000  # bootstrap resamples of the prompts
BOOTSTRAP_SEED = 0  # the resampling seed (the interval is a pure function of the data)
EXCESS_KS = (2, 4, 8, 16)  # E(k) over [kT, 2kT): the probe must be >= 32 T long
PAPER_COLLAPSE_FACTOR = 2.0  # [SC]: loss beyond T above 2x the in-window maximum
HORIZON_TOLERANCE = 0.005  # nats/byte: a window whose loss over [T, 8T) is this close to the full state's suffices
HORIZON_SPAN = (1, 8)  # the horizon compares losses over [1 T, 8 T)
RETENTION_HIGH = 0.99  # a head "never forgets" if its retention over T tokens exceeds this
ABSOLUTE_POSITIONS = (256, 1024, 4096)  # retention compared across models at these absolute positions (tokens)
HIST_BINS = np.linspace(-8.0, 2.0, 41)  # log10 |state entry| bins of the channel histogram


# ----------------------------------------------------------------------------------------------
# 1. Statistics
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided CI_LEVEL interval."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def bootstrap_mean(per_prompt, n_boot: int = N_BOOTSTRAP, level: float = CI_LEVEL,
                   seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean of per-prompt values with a percentile bootstrap interval over the prompts.

    Percentile bounds are means of resampled data, so they never leave [min, max] of the values (no
    impossible bound for a quantity that cannot be negative). per_prompt: (b,), b >= 2.
    """
    v = np.asarray(per_prompt, dtype=np.float64).ravel()
    if v.size < 2 or not np.isfinite(v).all():
        raise ValueError(f"bootstrap_mean needs >= 2 finite values, got {v.size} values "
                         f"({int((~np.isfinite(v)).sum())} not finite)")
    if not 0.0 < level < 1.0 or n_boot < 100:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 100, got level {level}, n_boot {n_boot}")
    g = np.random.default_rng(seed)
    means = v[g.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(v.mean()), float(lo), float(hi))


def median_of(values: Sequence[float | None]) -> float | None:
    """Median of the finite values (a censored or missing one, None, is left out); None if none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


# ----------------------------------------------------------------------------------------------
# 2. Per-position loss with the state carried
# ----------------------------------------------------------------------------------------------

# A loss function: (ids (b, l+1), window r or None for the full state) -> per-position loss (b, l).
LossFn = Callable[[torch.Tensor, "int | None"], torch.Tensor]


def load_for_eval(model_dir, device: str) -> Mamba2LM:
    """A trained model on `device` (a --device name), in eval mode, with kernels.accelerate's fast
    paths (which mitigations then wrap)."""
    return kernels.accelerate(Mamba2LM.from_pretrained(model_dir).to(resolve_device(device)).eval())


@torch.no_grad()
def per_position_loss(model, ids: torch.Tensor, chunk_len: int, vocab: int | None = None) -> torch.Tensor:
    """Per-prompt, per-position loss with the state carried across chunks of chunk_len tokens.

    Memory is bounded by one chunk's logits (b, chunk_len, V), so any length runs on a CPU. Whatever
    mitigation is installed on the mixers is used.
    Args: ids LongTensor (b, l + 1): inputs ids[:, :-1], targets ids[:, 1:]; vocab: real logits
    (None = model.config.vocab_size). Returns (b, l) float64.
    """
    vocab = vocab or model.config.vocab_size
    device = next(model.parameters()).device
    l = ids.shape[1] - 1
    out, state = [], None
    for start in range(0, l, chunk_len):
        stop = min(start + chunk_len, l)
        logits, state = model(ids[:, start:stop].to(device), state, return_state=stop < l)  # (b, k, V)
        y = ids[:, start + 1:stop + 1].to(device)  # (b, k)
        out.append(F.cross_entropy(logits[..., :vocab].float().transpose(1, 2), y, reduction="none").double().cpu())
    return torch.cat(out, dim=1)


def model_loss_fn(model, chunk_len: int) -> LossFn:
    """The LossFn of a Mamba2LM: window None = the full carried state; r = [SC]'s sliding window by
    state difference in every layer (exact per layer; for the stack an approximation of reading only
    the last r tokens, since the upper layers' inputs came from full-context lower layers)."""
    def losses(ids: torch.Tensor, window: int | None) -> torch.Tensor:
        if window is None:
            return per_position_loss(model, ids, chunk_len)
        with M.sliding_window(model, window):
            return per_position_loss(model, ids, chunk_len)
    return losses


# ----------------------------------------------------------------------------------------------
# 3. E(k): the excess of the full state over an exact window
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Excess:
    """E(k) = mean_{[kT, 2kT)} [loss(full) - loss(window T)], bootstrap over prompts (nats/byte)."""

    k: int
    start: int  # kT
    stop: int  # 2kT
    excess: Interval


def excess(full: torch.Tensor, window: torch.Tensor, t_train: int, ks: Sequence[int] = EXCESS_KS) -> list[Excess]:
    """E(k) for each k from per-prompt per-position losses full and window, both (b, l) with l >= 2 k T."""
    if full.shape != window.shape or full.dim() != 2:
        raise ValueError(f"full and window must be (b, l) losses of one probe, got {tuple(full.shape)} and "
                         f"{tuple(window.shape)}")
    out = []
    for k in ks:
        a, b = k * t_train, 2 * k * t_train
        if b > full.shape[1]:
            raise ValueError(f"E({k}) reads [{a}, {b}): the probe has only {full.shape[1]} positions (need >= "
                             f"{2 * max(ks)} x T_train = {2 * max(ks) * t_train})")
        diff = (full[:, a:b] - window[:, a:b]).mean(dim=1)  # (b,) one value per prompt
        out.append(Excess(k, a, b, bootstrap_mean(diff.numpy())))
    return out


# ----------------------------------------------------------------------------------------------
# 4. [SC]'s criterion on bucketed loss
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BucketVerdict:
    """max_{buckets in [T, l)} loss > PAPER_COLLAPSE_FACTOR x max_{buckets in [T/2, T)} loss."""

    collapsed: bool
    ratio: float  # beyond / within
    within: float  # the largest bucket mean in [T/2, T)
    beyond: float  # the largest bucket mean in [T, l)
    first_position: int | None  # start of the first bucket beyond T that fires
    bucket: int  # bucket width (tokens)


def bucketed_criterion(loss: torch.Tensor, t_train: int, bucket: int | None = None) -> BucketVerdict:
    """[SC]'s rule on the prompt-mean loss averaged in buckets (default width T/4).

    loss: (b, l) or (l,) with l >= 2T. Buckets tile [T/2, l) from T/2; T/2 and T are bucket edges.
    """
    curve = torch.as_tensor(loss, dtype=torch.float64)
    curve = curve.mean(0) if curve.dim() == 2 else curve
    bucket = bucket or max(1, t_train // 4)
    half = t_train // 2
    if t_train < 2 or half % bucket or t_train % bucket or curve.numel() < 2 * t_train:
        raise ValueError(f"need T_train >= 2, a bucket ({bucket}) dividing T/2 = {half}, and >= 2T = "
                         f"{2 * t_train} positions; got T {t_train}, {curve.numel()} positions")
    edges = list(range(half, curve.numel() + 1, bucket))
    means = [(a, curve[a:a + bucket].mean().item()) for a in edges[:-1]]
    within = max(m for a, m in means if a < t_train)
    beyond_all = [(a, m) for a, m in means if a >= t_train]
    beyond = max(m for _, m in beyond_all)
    fired = [a for a, m in beyond_all if m > PAPER_COLLAPSE_FACTOR * within]
    return BucketVerdict(bool(fired), beyond / within, within, beyond, fired[0] if fired else None, bucket)


# ----------------------------------------------------------------------------------------------
# 5. The context horizon (the precondition of every verdict)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Horizon:
    """The smallest window r of the grid whose mean loss over [T, 8T) is within HORIZON_TOLERANCE of the
    full state's, |loss(r) - loss(full)| <= tolerance (context beyond r changes the loss by no more);
    None when no window of the grid is (right-censored: above the largest r)."""

    value: int | None
    windows: tuple[int, ...]  # the grid
    gaps: tuple[float, ...]  # loss(window r) - loss(full) over [T, 8T), per r (nats/byte)
    full_loss: float

    @property
    def censored(self) -> bool:
        return self.value is None


def horizon_windows(t_train: int) -> tuple[int, ...]:
    """The window grid: T/16, T/8, ..., 4T (powers of two times T, >= 1)."""
    return tuple(sorted({max(1, t_train * 2 ** e // 16) for e in range(7)}))


def horizon(loss_fn: LossFn, ids: torch.Tensor, t_train: int, windows: Sequence[int] | None = None,
            tolerance: float = HORIZON_TOLERANCE) -> Horizon:
    """How much context the model uses, measured on ids (b, >= 8T + 1)."""
    a, b = HORIZON_SPAN[0] * t_train, HORIZON_SPAN[1] * t_train
    if ids.shape[1] < b + 1:
        raise ValueError(f"the horizon reads [T, 8T) = [{a}, {b}): ids need >= {b + 1} tokens, got {ids.shape[1]}")
    ids = ids[:, :b + 1]
    windows = tuple(sorted(windows or horizon_windows(t_train)))
    full = loss_fn(ids, None)[:, a:b].mean().item()
    gaps = tuple(loss_fn(ids, r)[:, a:b].mean().item() - full for r in windows)
    value = next((r for r, g in zip(windows, gaps) if abs(g) <= tolerance), None)
    return Horizon(value, windows, gaps, full)


# ----------------------------------------------------------------------------------------------
# 6. Mechanism
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mechanism:
    """What the state does over time. Lists over `positions` are the largest value over layers and heads."""

    positions: tuple[int, ...]  # tokens read when each record was taken (multiples of the chunk)
    norm: tuple[float, ...]  # largest per-head ||h||_F (max over the batch)
    top_channel: tuple[float, ...]  # largest per-head mean |h| entry
    norm_growth: float  # norm at the last record / norm at T
    channel_growth: float  # top channel at the last record / at T
    hist_edges: tuple[float, ...]  # log10 |entry| bin edges
    hist_at_t: tuple[int, ...]  # histogram of the largest head's entries at T
    hist_at_16t: tuple[int, ...]  # ... and at 16 T (or the last record if the probe is shorter)
    retention_at: dict  # absolute position (str) -> largest first-token retention alpha_{1:t} over heads
    retention_over_t: tuple[float, ...]  # per head (all layers), median over t in [T, l) of alpha_{t-T+1:t}
    share_never_forget: float  # share of heads with retention_over_t > RETENTION_HIGH


class _DecayRecorder:
    """Wraps a layer's scan: keeps log alpha_t = dt_t * A (b, l, h) of every token it sees."""

    def __init__(self, inner):
        self.inner, self.log_alpha = inner, []

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        self.log_alpha.append((dt.double() * (A.double() if A.dim() == 3 else A.double()[None, None])).cpu())
        return self.inner.chunked(x, dt, A, B, C, D, state, chunk_size, return_state=return_state)

    def step(self, x, dt, A, B, C, D, state):  # pragma: no cover - mechanism streams chunks only
        raise NotImplementedError("mechanism() streams chunks; step() is not recorded")


@torch.no_grad()
def mechanism(model, ids: torch.Tensor, t_train: int, every: int | None = None) -> Mechanism:
    """State statistics and retention of a Mamba2LM streamed over ids (b, l) (inputs only), l >= 2T.

    every: tokens between records (default T/4, so T and 16T are records)."""
    every = every or max(1, t_train // 4)
    l = ids.shape[1]
    if l < 2 * t_train or t_train % every:
        raise ValueError(f"mechanism needs l >= 2T and every dividing T; got l {l}, T {t_train}, every {every}")
    mixers = [layer.mixer for layer in model.backbone.layers]
    recorders = [_DecayRecorder(m.scan) for m in mixers]
    device = next(model.parameters()).device
    positions, norms, tops, snaps = [], [], [], {}
    t16 = min(16 * t_train, (l // every) * every)
    try:
        for m, r in zip(mixers, recorders):
            m.scan = r
        state = None
        for start in range(0, l, every):
            stop = min(start + every, l)
            _, state = model(ids[:, start:stop].to(device), state)
            hs = [s.double() for s in state.ssm]  # per layer (b, h, p, n)
            stats = [M.state_statistics(h, top_k=1) for h in hs]
            positions.append(stop)
            norms.append(max(s["norm"].max().item() for s in stats))
            tops.append(max(s["top_values"].max().item() for s in stats))
            if stop in (t_train, t16):
                snaps[stop] = hs
    finally:
        for m, r in zip(mixers, recorders):
            m.scan = r.inner
    # the histogram of the head with the largest norm at 16T, at T and at 16T
    late = snaps[t16]
    layer, head = max(((i, j) for i, h in enumerate(late) for j in range(h.shape[1])),
                      key=lambda ij: late[ij[0]][:, ij[1]].norm().item())
    def hist(h):  # log10 |entries| of the head, clipped into the outer bins (every entry is counted)
        v = np.log10(h[:, head].abs().clamp_min(1e-30).numpy().ravel())
        return np.histogram(np.clip(v, HIST_BINS[0], HIST_BINS[-1]), HIST_BINS)[0]
    # retention from log alpha: S_t = sum_{j<=t} log alpha_j per layer (b, l, h)
    cums = [torch.cat(r.log_alpha, dim=1).cumsum(dim=1) for r in recorders]
    first = {str(p): max(torch.exp(c[:, p - 1] - c[:, :1]).mean(0).max().item() for c in cums)
             for p in ABSOLUTE_POSITIONS if p <= l}
    over_t = torch.cat([torch.exp(c[:, t_train:] - c[:, :-t_train]).median(dim=1).values.mean(0) for c in cums])
    i_t = positions.index(t_train)
    return Mechanism(tuple(positions), tuple(norms), tuple(tops), norms[positions.index(t16)] / norms[i_t],
                     tops[positions.index(t16)] / tops[i_t], tuple(HIST_BINS.tolist()),
                     tuple(int(v) for v in hist(snaps[t_train][layer])), tuple(int(v) for v in hist(late[layer])),
                     first, tuple(over_t.tolist()), float((over_t > RETENTION_HIGH).double().mean()))
