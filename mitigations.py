"""Training-free fixes for state collapse in Mamba-2, and the diagnostics to study it.

State collapse (SC): a Mamba-2 trained on sequences of length T_train breaks down beyond it, because
it never learned to forget; the retention of old tokens stays near 1, a few state channels explode.
This file gives the paper's training-free mitigations. Each is one scan object written against
minimamba.DefaultScan's two methods, chunked() (a piece of a sequence) and step() (one token), that
wraps the scan below it, and is used in two ways:
    (a) at the scan level, a function of (x, dt, A, B, C) like minimamba.ssd: rri_ssd,
        delta_scaled_ssd, state_norm_ssd, sliding_window_ssd (the method on a minimamba.DefaultScan());
    (b) on a Mamba2LM, a `with` block that puts the method above each layer's `mixer.scan` (the
        extension point of minimamba.py; nothing in minimamba.py is edited), so that the chunked
        forward, the streaming forward with a carried state, step() and generate() all run it:
        rri(), delta_scaling(), state_norm(), sliding_window().

Papers:
    [SC]  Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based Long-Context
          Modeling", arXiv 2410.07145 (v1 section "Mitigating SC"; v2+ calls method 1 "RRI").
    [LM]  Ye et al., "LongMamba" (the Delta-scaling baseline that [SC] compares against).
    [SSD] Dao & Gu, "Transformers are SSMs", arXiv 2405.21060 (the scan these functions build on).

Reading order:
    0. the scan interface         a method wraps the scan below it: input transforms, stateful scans
    1. RRI                        [SC] method 1: h_t = (lambda_a alpha_t) h_{t-1} + lambda_B dt_t x_t B_t^T
    2. Delta scaling              [LM], the baseline in [SC]: dt_t -> factor * dt_t
    3. state normalization        [SC] method 2: h <- h * min(1, tau / ||h||_F) every k tokens; calibration
    4. sliding window             [SC] method 3: h_t - alpha_{t-r+1..t} h_{t-r}, exact per layer, O(r)
    5. diagnostics                trace_states: state statistics and first-token retention every k
                                  tokens; the state size N_S
    6. the `with` blocks          swap each layer's scan; on exit take out only the block's own
    7. refusals                   argument checks; a state continues only in the block that made it

Glossary (letters in shapes and einsum strings; [SC] section 2 symbols in brackets):
    b batch   l length   h heads [H]   p headdim [P]   n d_state [N]   g groups [G]   r window
    x_t (h, p) inputs; dt_t = Delta_t > 0 step size; A < 0 (per head, or per token (b, l, h));
    alpha_t = exp(dt_t A) the decay; B_t, C_t (g, n) the write and read vectors; h_t (h, p, n) state.
    Recurrence ([SC] eq. 1):   h_t = alpha_t h_{t-1} + dt_t x_t B_t^T,     y_t = h_t C_t + D x_t.
    Retention: alpha_{i..t} = prod_{j=i..t} alpha_j = exp(sum_{j=i..t} dt_j A_j)   (inclusive range).

Composition: the input transforms (rri, delta_scaling) wrap whatever scan a layer has, so they compose
with each other and with state_norm / sliding_window if they are entered LAST (outermost):
    with sliding_window(model, window=512), rri(model, lambda_a=0.9999, lambda_B=0.75): ...
state_norm and sliding_window need a linear scan with a tensor state under them; they refuse to go on
top of a transform or of each other, with an error saying which order works. Leaving a block takes out
only that block's own scans, so blocks left in any order (or by an exception) restore the model.

States: state_norm and sliding_window carry their own state objects (NormState, WindowState), which
record the block that made them (method, parameters, layer); a scan continues only a state its own
kind of block made and refuses any other (another window, a plain tensor, another batch or device)
with an error that names both sides.

Copies: copy.deepcopy(model), pickle or torch.save inside a block copy the model without the block's
scans (the block's exit restores only the model it was entered on; a copy would keep the method for good).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

import minimamba
from minimamba import _compute_dtype, _heads_from_groups, check_scan_inputs

# Window decays and retentions are summed in float64: a running sum over s add/subtract steps carries
# a rounding error of order sqrt(s) * eps * |sum|, about 6e-5 relative after 10^6 steps in float32
# (eps 6e-8), about 1e-13 in float64.
WINDOW_DECAY_DTYPE = torch.float64
# Chunk size q of the SSD scan behind sliding_window_ssd when none is given (any q gives the same y).
DEFAULT_CHUNK_SIZE = 64


# --------------------------------------------------------------------------------------------------
# 0. The scan interface: a method wraps the scan below it
# --------------------------------------------------------------------------------------------------
# A mixer computes y = SSM(x, dt, A, B, C) + D x with scan.chunked(x, dt, A, B, C, D, state, chunk_size)
# or scan.step(x, dt, A, B, C, D, state), each returning (y, state). A method runs the scan below it,
# `inner`, either as an input transform (RRI, Delta scaling: new dt, A, B; the inner scan's state passes
# through) or as a stateful scan (state normalization, sliding window: a state object of its own).


class _Wrapper:
    """Base of this file's scans: `inner` is the scan below (the model's, or another method's)."""

    inner = None
    in_block = False  # set by the `with` block that installs it (section 6)

    def log_decay(self, dt, A):
        """log alpha_t = dt_t A_t in float64, as the scan below sees it (a transform adds its change)."""
        return _log_decay(self.inner, dt, A)

    def __reduce_ex__(self, protocol):
        # copy.deepcopy / pickle of a model inside a block: the copy gets the scan below (section 6)
        if self.in_block:
            return _same, (self.inner,)
        return super().__reduce_ex__(protocol)


class _InputTransform(_Wrapper):
    """A scan that changes the inputs (dt, A, B) and runs the scan below it on them. The state is the
    inner scan's and passes through, as does return_state."""

    name = ""  # the block as a user writes it, for error messages

    @property
    def made_by(self):
        """The sliding_window / state_norm below this transform (what its states record), None if none."""
        return getattr(self.inner, "made_by", None)

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        _check_call(self, x, dt, A, B, C, D, state, chunk_size, return_state)
        dt, A, B = self._transform(dt, A, B)
        return self.inner.chunked(x, dt, A, B, C, D, state, chunk_size, return_state=return_state)

    def step(self, x, dt, A, B, C, D, state):
        _check_call(self, x, dt, A, B, C, D, state)
        dt, A, B = self._transform(dt, A, B)
        return self.inner.step(x, dt, A, B, C, D, state)


def _log_decay(scan, dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """log alpha_t = dt_t A_t as the scan below `scan` will see it (after any input transform)."""
    if hasattr(scan, "log_decay"):
        return scan.log_decay(dt, A)
    return dt.to(WINDOW_DECAY_DTYPE) * _per_token_A(A, dt).to(WINDOW_DECAY_DTYPE)


def _per_token_A(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """A (h,) or already per-token with dt's shape -> per-token, dt's shape (b, [l,] h)."""
    return A.expand(dt.shape) if A.dim() == 1 else A


def _read_out(state: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """state (b, h, p, n), C (b, g, n) -> state C (b, h, p)."""
    return torch.einsum("bhpn,bhn->bhp", state, _heads_from_groups(C.to(state.dtype), state.shape[1]))


# --------------------------------------------------------------------------------------------------
# 1. RRI: "Forget More and Remember Less" ([SC] v1 "Mitigating SC", method 1)
# --------------------------------------------------------------------------------------------------
#     h_t = (lambda_a alpha_t) h_{t-1} + lambda_B dt_t x_t B_t^T,       y_t = h_t C_t + D x_t
# lambda_a < 1: an extra forget rate, the same for every token; lambda_B < 1: a weaker write.


class RRIScan(_InputTransform):
    """[SC] "Forget More and Remember Less":   h_t = (lambda_a alpha_t) h_{t-1} + lambda_B dt_t x_t B_t^T.

    Steps (both paths):
        1. extra forget rate: log alpha'_t = dt_t A + log(lambda_a), passed to the scan as the
           per-token rate A'_t = A + log(lambda_a) / dt_t (so dt_t A'_t = log alpha'_t; dt > 0);
           dt itself is unchanged, so token selectivity is kept.
        2. weaker insertion: B'_t = lambda_B B_t (dt x B^T scales by lambda_B; the read C and the
           skip D x are untouched).
        3. run the wrapped scan.
    Deviation from the official code: it applies the alpha multiplier in the chunked path only, not in
    step decoding; here both paths get both factors. A factor equal to 1 leaves its input untouched, so
    lambda_a = lambda_B = 1 is exactly the wrapped scan.
    """

    def __init__(self, inner, lambda_a: float = 1.0, lambda_B: float = 1.0):
        self.inner = inner
        self.lambda_a = _checked("lambda_a", lambda_a, float, lambda v: 0 < v <= 1,
                                 "a number in (0, 1] (1 = off; [SC] uses 0.9999)")
        self.lambda_B = _checked("lambda_B", lambda_B, float, lambda v: 0 < v < math.inf,
                                 "a finite number > 0 (1 = off; [SC] uses 0.75)")
        self.name = f"rri(lambda_a={self.lambda_a!r}, lambda_B={self.lambda_B!r})"

    def _transform(self, dt, A, B):
        if self.lambda_a != 1.0:
            # 1. A'_t = A + log(lambda_a) / dt_t   ->   dt_t A'_t = dt_t A + log(lambda_a).
            # dt_t is floored where log(lambda_a) / dt_t would pass half the dtype's largest number (dt = 0
            # exactly after a softplus underflow would give 0 * inf = nan): a token with dt below the
            # floor gets part of the extra forgetting, none at dt = 0.
            info = torch.finfo(dt.dtype)
            floor = max(info.tiny, -2 * math.log(self.lambda_a) / info.max)
            A = _per_token_A(A, dt) + math.log(self.lambda_a) / dt.clamp_min(floor)
        if self.lambda_B != 1.0:
            B = B * self.lambda_B  # 2. B'_t = lambda_B B_t
        return dt, A, B

    def log_decay(self, dt, A):
        return _log_decay(self.inner, dt, A) + math.log(self.lambda_a)


def rri_ssd(x, dt, A, B, C, *, lambda_a, lambda_B, chunk_size, D=None, initial_state=None):
    """The SSD scan with RRI: h_t = (lambda_a alpha_t) h_{t-1} + lambda_B dt_t x_t B_t^T; shapes as ssd."""
    scan = RRIScan(minimamba.DefaultScan(), lambda_a, lambda_B)
    return scan.chunked(x, dt, A, B, C, D, initial_state, chunk_size)


def rri(model, lambda_a: float = 1.0, lambda_B: float = 1.0):
    """`with rri(model, lambda_a=0.9999, lambda_B=0.75): ...` - RRI in every layer ([SC]: 370M values).

    Rule of thumb ([SC]): 1 / (1 - lambda_a) tokens is the horizon the extra forgetting imposes.
    """
    spec = RRIScan(None, lambda_a, lambda_B)  # validate before touching the model
    return _SwappedScans(model, lambda inner, i: RRIScan(inner, spec.lambda_a, spec.lambda_B))


# --------------------------------------------------------------------------------------------------
# 2. Delta scaling ([LM]; the baseline that [SC] compares RRI against)
# --------------------------------------------------------------------------------------------------
#     dt'_t = factor * dt_t:   h_t = exp(factor dt_t A) h_{t-1} + factor dt_t x_t B_t^T
# The decay AND the insertion change together (RRI separates them).


class DeltaScaleScan(_InputTransform):
    """[LM] Delta scaling, the baseline in [SC]: dt'_t = factor * dt_t (after softplus and clamp).

    This changes the decay alpha_t = exp(dt_t A) AND the insertion dt_t x_t B_t^T together; D x is
    untouched. factor = 1 is exactly the wrapped scan. Deviation from the official code: its two Mamba-2
    copies apply "the same" multiplier before and after the softplus; here it is always after.
    """

    def __init__(self, inner, factor: float):
        self.inner = inner
        self.factor = _checked("factor", factor, float, lambda v: 0 < v < math.inf,
                               "a finite number > 0 (1 = off; LongMamba uses e.g. 0.5 or 0.2)")
        self.name = f"delta_scaling(factor={self.factor!r})"

    def _transform(self, dt, A, B):
        return (dt * self.factor if self.factor != 1.0 else dt), A, B

    def log_decay(self, dt, A):
        return _log_decay(self.inner, dt * self.factor, A)


def delta_scaled_ssd(x, dt, A, B, C, *, factor, chunk_size, D=None, initial_state=None):
    """The SSD scan with dt multiplied by `factor` (LongMamba); shapes as ssd."""
    scan = DeltaScaleScan(minimamba.DefaultScan(), factor)
    return scan.chunked(x, dt, A, B, C, D, initial_state, chunk_size)


def delta_scaling(model, factor: float):
    """`with delta_scaling(model, 0.5): ...` - every layer's dt multiplied by factor (LongMamba)."""
    spec = DeltaScaleScan(None, factor)
    return _SwappedScans(model, lambda inner, i: DeltaScaleScan(inner, spec.factor))


# --------------------------------------------------------------------------------------------------
# 3. State normalization ([SC] v1 "Mitigating SC", method 2), with its calibration
# --------------------------------------------------------------------------------------------------
#     after every k-th token:   h_t <- h_t * min(1, tau_{layer,head} / ||h_t||_F)
#     tau_{layer,head} = the largest ||h||_F seen on in-distribution input no longer than T_train
# The clamp is not linear in h, so it cannot be folded into one parallel scan: the chunked path splits
# each piece at the clamp positions.


def clamp_state(h: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[SC] state normalization, per batch row and head:  h <- h * min(1, tau / ||h||_F).

    Args: h (b, h, p, n); tau (h,) thresholds > 0 (inf = never clamp).
    Returns: the clamped state and the scale s = min(1, tau / ||h||_F) (b, h), s <= 1.
    Deviation from the official code: it multiplies by ||h|| / tau (inflating the state); the paper
    divides, as here. A zero state has tau / 0 = inf, scale 1: it is left alone.
    """
    _check_clamp_args(h, tau)
    norm = torch.linalg.vector_norm(h, dim=(-2, -1))  # (b, h)
    scale = torch.clamp(tau.to(norm.dtype) / norm, max=1.0)  # (b, h)
    return h * scale[..., None, None], scale


@dataclass
class NormState:
    """What StateNormScan carries between calls: the (clamped) state and the tokens read so far."""

    h: torch.Tensor | None  # (b, h, p, n) or None (zeros)
    position: int = 0  # tokens read since the start of the stream; clamps fall on multiples of `every`
    made_by: str = "no block (built by hand)"  # the block that made it, e.g. "state_norm(every=128, ...)"

    def detach(self) -> "NormState":
        return NormState(None if self.h is None else self.h.detach(), self.position, self.made_by)


class StateNormScan(_Wrapper):
    """[SC] state normalization: after the update of every `every`-th token of the stream (absolute
    positions k, 2k, 3k, ...), clamp the state: h_t <- h_t * min(1, tau / ||h_t||_F).

    Steps (chunked path; the clamp is non-linear, so it cannot be folded into one parallel scan):
        1. split the piece at the clamp positions (aligned to the stream, not to the piece);
        2. run the wrapped scan on each sub-piece from the carried (clamped) state;
        3. at a clamp position, clamp the final state and re-read that token's output from it:
           y_t += (s - 1) h_t C_t   (the output reads the clamped state, as in the step path).
    The step path clamps after the same tokens, so the chunked, streaming and step paths compute the
    same function for any `every`; every = 1 is "clamp at each step". Deviation from the official code:
    there the step path clamps every step and the chunked path every 128 tokens, two different models.
    tau = inf everywhere is exactly the wrapped scan (the sub-pieces are not even split).
    Its state is a NormState that records this block: made_by = "state_norm(every=k, taus=#<hash of the
    values>) in layer i"; a scan continues only a NormState with the same record. return_state is
    ignored: the state is always returned (the caller may drop it).
    """

    def __init__(self, inner, taus: torch.Tensor, every: int, layer: int | None = None):
        self.taus = _thresholds(taus)
        self.every = _checked("every", every, int, lambda v: v >= 1, "a positive int (tokens between clamps)")
        _check_directly_on_the_model_scan("state_norm", inner)
        self.inner, self.off = inner, bool(torch.isinf(self.taus).all())
        fingerprint = hash(tuple(self.taus.tolist())) & 0xFFFFFFFF
        self.made_by = f"state_norm(every={self.every}, taus=#{fingerprint:08x})" + _in_layer(layer)

    def _clamp(self, h, y_last, C_last):
        h_new, scale = clamp_state(h, self.taus.to(h.device))
        # y_t = h_t C_t + D x_t  ->  with the clamped state: y_t + (s - 1) h_t C_t
        fix = (scale - 1)[..., None] * _read_out(h, C_last)  # (b, h, p)
        return h_new, (y_last.to(fix.dtype) + fix).to(y_last.dtype)

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        _check_call(self, x, dt, A, B, C, D, state, chunk_size, return_state)
        state = state if state is not None else NormState(None, 0, self.made_by)
        b, l = x.shape[:2]
        if self.off:
            y, h = self.inner.chunked(x, dt, A, B, C, D, state.h, chunk_size)
            return y, NormState(h, state.position + l, self.made_by)
        # 1. sub-piece ends: the positions t (1-based, in the stream) with t % every == 0, and the end
        first = self.every - state.position % self.every
        ends = list(range(first, l, self.every)) + [l]
        h, ys, start = state.h, [], 0
        for end in ends:
            sl = slice(start, end)
            A_sl = A if A.dim() == 1 else A[:, sl]
            # 2. the wrapped scan from the carried state
            y, h = self.inner.chunked(x[:, sl], dt[:, sl], A_sl, B[:, sl], C[:, sl], D, h, chunk_size)
            if (state.position + end) % self.every == 0:
                # 3. clamp at the clamp position; its output reads the clamped state
                h, y_last = self._clamp(h, y[:, -1], C[:, end - 1])
                y = torch.cat([y[:, :-1], y_last[:, None]], dim=1)
            ys.append(y)
            start = end
        return torch.cat(ys, dim=1), NormState(h, state.position + l, self.made_by)

    def step(self, x, dt, A, B, C, D, state):
        _check_call(self, x, dt, A, B, C, D, state)
        state = state if state is not None else NormState(None, 0, self.made_by)
        y, h = self.inner.step(x, dt, A, B, C, D, state.h)
        position = state.position + 1
        if not self.off and position % self.every == 0:
            h, y = self._clamp(h, y, C)
        return y, NormState(h, position, self.made_by)


def state_norm_ssd(x, dt, A, B, C, *, taus, every, chunk_size, D=None, initial_state=None):
    """The SSD scan with the state clamped to ||h||_F <= tau after every `every`-th token.

    Shapes as ssd; taus (h,). Positions are counted from the start of this call.
    Returns (y, final_state) with final_state (b, h, p, n).
    """
    check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    scan = StateNormScan(minimamba.DefaultScan(), taus, every)
    y, state = scan.chunked(x, dt, A, B, C, D, NormState(initial_state, 0, scan.made_by), chunk_size)
    return y, state.h


def state_norm(model, taus: torch.Tensor, every: int = 128):
    """`with state_norm(model, taus, every=128): ...` - clamp ||h||_F <= taus[layer, head] after every
    `every`-th token (the official code's k = 128). taus (n_layer, h), e.g. from calibrate_state_norm."""
    mixers = _mixers(model)
    taus = _thresholds(taus, (len(mixers), model.config.nheads))
    spec = StateNormScan(None, taus[0], every)
    return _SwappedScans(model, lambda inner, i: StateNormScan(inner, taus[i], spec.every, layer=i))


def calibrate_state_norm(model, input_ids: torch.Tensor, *, every: int = 128) -> torch.Tensor:
    """Thresholds for state_norm: tau[layer, head] = the largest ||h||_F seen on input_ids, checked
    every `every` tokens with the state carried. Use in-distribution text no longer than the training
    length (the norms the model was trained to produce). Returns (n_layer, h) float32.
    """
    trace = trace_states(model, input_ids, every=every, top_k=1)
    return trace.norm.amax(dim=0).float()


# --------------------------------------------------------------------------------------------------
# 4. Sliding window by state difference ([SC] v1 "Mitigating SC", method 3)
# --------------------------------------------------------------------------------------------------
# The state is a weighted sum of insertions ([SC] eq. 2), so the state of only the last r tokens is
#     h_t^(r) = sum_{i=t-r+1..t} alpha_{i+1..t} dt_i x_i B_i^T = h_t - alpha_{t-r+1..t} h_{t-r},
#     y_t = h_t^(r) C_t + D x_t = [h_t C_t + D x_t] - exp(sum_{j=t-r+1..t} dt_j A_j) (h_{t-r} C_t),
# with h_{t-r} = 0 for t <= r (the stream starts from a zero state). The window's decay is the exp of a
# difference of a float64 cumsum of dt*A (chunked) or of a float64 running sum (step): never a running
# product of alphas, which underflows to 0 and cannot be divided back out.
# Exact per layer given that layer's inputs. In a stack of layers it is an approximation of "run the
# model on the last r tokens only": the upper layers' inputs were computed by lower layers that, in
# the conv and through the residual stream, depend on the window of the layers below, and so on
# (the receptive field grows by r per layer). Cancellation: h_t and alpha h_{t-r} can be large and
# nearly equal (slow decay, long stream); their difference loses ~log10(|h_t| / |h_t^(r)|) digits,
# which is why the float32 tests use a looser tolerance than float64.


@dataclass
class WindowState:
    """What SlidingWindowScan carries: O(r) memory whatever the stream length.

    h:        (b, h, p, n) state after all tokens read, h_T (None = zeros)
    anchor:   (b, h, p, n) state h_{T-m} just before the cached tokens (None = zeros)
    cache_*:  the last m = min(T, r) inputs: x (b, m, h, p), dt (b, m, h), A (b, m, h), B (b, m, g, n)
    log_decay: (b, h) float64 sum of dt*A over the cached tokens = log alpha_{T-m+1..T}
    seen:     T, tokens read since the start of the stream
    made_by:  the block that made it, e.g. "sliding_window(window=512) in layer 3"
    """

    h: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    cache_x: torch.Tensor | None = None
    cache_dt: torch.Tensor | None = None
    cache_A: torch.Tensor | None = None
    cache_B: torch.Tensor | None = None
    log_decay: torch.Tensor | None = None
    seen: int = 0
    made_by: str = "no block (built by hand)"

    def window_state(self) -> torch.Tensor | None:
        """h_T^(r) = h_T - alpha_{T-r+1..T} h_{T-r}: the state of the last r tokens only (b, h, p, n)."""
        if self.h is None or self.anchor is None:
            return self.h
        return self.h - torch.exp(self.log_decay).to(self.h.dtype)[..., None, None] * self.anchor

    def nbytes(self) -> int:
        """Memory held by this state, in bytes (bounded by the window, whatever the stream length)."""
        ts = (self.h, self.anchor, self.cache_x, self.cache_dt, self.cache_A, self.cache_B, self.log_decay)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def detach(self) -> "WindowState":
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return WindowState(d(self.h), d(self.anchor), d(self.cache_x), d(self.cache_dt), d(self.cache_A),
                           d(self.cache_B), d(self.log_decay), self.seen, self.made_by)


class SlidingWindowScan(_Wrapper):
    """[SC] sliding window by state difference: y_t = (h_t - alpha_{t-r+1..t} h_{t-r}) C_t + D x_t.

    Chunked path, for a piece of L new tokens after T already read (m = min(T, r) of them cached):
        1. term 1: the wrapped scan from h_T gives h_t C_t + D x_t and h_{T+L};
        2. term 2: the wrapped scan over [cached m tokens, new tokens] from the anchor h_{T-m}, read with
           C shifted by r: its output at position s is h_s C_{s+r}; multiply by the window decay
           exp(cs_{s+r} - cs_s) (cs a float64 cumsum of dt*A) and subtract it at position s + r;
        3. keep the last r inputs and the state just before them (the final state of step 2's scan).
    Step path: h_t by one wrapped step; push the token into the cache; once more than r are cached pop
    the oldest and advance the anchor h_{t-r} by one step with it; the window log-decay is a running
    float64 sum (add the newest dt*A, subtract the popped one); y_t = y_t^full - exp(sum) h_{t-r} C_t.
    While T + L <= r nothing is subtracted: window >= length is exactly the wrapped scan.
    Its state is a WindowState that records this block: made_by = "sliding_window(window=r) in layer i";
    a scan continues only a WindowState with the same record (a state cached for a window of 64 holds
    too few tokens for 128). return_state is ignored: the state is always returned.
    """

    def __init__(self, inner, window: int, layer: int | None = None):
        self.window = _checked("window", window, int, lambda v: v >= 1, "a positive int (tokens)")
        self.made_by = f"sliding_window(window={self.window})" + _in_layer(layer)
        _check_directly_on_the_model_scan("sliding_window", inner)
        self.inner = inner

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        _check_call(self, x, dt, A, B, C, D, state, chunk_size, return_state)
        st = state if state is not None else WindowState(made_by=self.made_by)
        r = self.window
        b, L = x.shape[:2]
        xf = x.to(_compute_dtype(x.dtype))  # the difference is taken before any rounding to a low precision
        # 1. term 1: the full-context output h_t C_t + D x_t, and h_{T+L}
        y, h = self.inner.chunked(xf, dt, A, B, C, D, st.h, chunk_size)  # (b, L, h, p)
        # the extended sequence: cached tokens, then the new ones (m + L tokens)
        A_tok = _per_token_A(A, dt)
        if st.cache_x is None:
            ext_x, ext_dt, ext_A, ext_B = xf, dt, A_tok, B
        else:
            ext_x, ext_dt, ext_A, ext_B = (torch.cat(p, dim=1) for p in
                                           ((st.cache_x, xf), (st.cache_dt, dt), (st.cache_A, A_tok),
                                            (st.cache_B, B)))
        m = ext_x.shape[1] - L
        n2 = m + L - r  # positions s of ext whose state h_s is subtracted at s + r
        anchor = st.anchor
        if n2 > 0:
            # 2. term 2: h_s C_{s+r} for s in ext[0, n2), from the anchor; C_{s+r} is new token s + r - m
            sl = slice(0, n2)
            y2, anchor = self.inner.chunked(ext_x[:, sl], ext_dt[:, sl], ext_A[:, sl], ext_B[:, sl],
                                            C[:, r - m:], None, st.anchor, chunk_size)  # (b, n2, h, p)
            # window decay exp(sum_{j=s+1..s+r} a_j) (0-based ext tokens), from a float64 cumsum
            a = self.log_decay(ext_dt, ext_A)  # (b, m + L, h)
            cs = torch.nn.functional.pad(torch.cumsum(a, dim=1), (0, 0, 1, 0))  # cs[k] = sum_{j<k} a_j
            decay = torch.exp(cs[:, r + 1: r + 1 + n2] - cs[:, 1: 1 + n2])  # (b, n2, h)
            y_new = y[:, r - m:].to(y2.dtype) - decay.to(y2.dtype)[..., None] * y2
            y = torch.cat([y[:, : r - m], y_new.to(y.dtype)], dim=1)
        # 3. the last min(T + L, r) inputs, their summed log-decay, and the state just before them
        keep = min(ext_x.shape[1], r)
        # (clone: a view would keep the whole piece's storage alive, memory would grow with L)
        cache = [t[:, -keep:].clone() for t in (ext_x, ext_dt, ext_A, ext_B)]
        log_decay = self.log_decay(cache[1], cache[2]).sum(dim=1)  # (b, h) float64
        new = WindowState(h, anchor, *cache, log_decay, st.seen + L, self.made_by)
        return y.to(x.dtype), new

    def step(self, x, dt, A, B, C, D, state):
        _check_call(self, x, dt, A, B, C, D, state)
        st = state if state is not None else WindowState(made_by=self.made_by)
        xf = x.to(_compute_dtype(x.dtype))
        # h_t and the full-context output h_t C_t + D x_t
        y, h = self.inner.step(xf, dt, A, B, C, D, st.h)  # (b, h, p)
        A_tok = _per_token_A(A, dt)
        a = self.log_decay(dt, A_tok)  # (b, h) float64
        # push the new token
        push = (xf[:, None], dt[:, None], A_tok[:, None], B[:, None])
        if st.cache_x is None:
            cache = list(push)
            log_decay = a
        else:
            cache = [torch.cat([c, p], dim=1)
                     for c, p in zip((st.cache_x, st.cache_dt, st.cache_A, st.cache_B), push)]
            log_decay = st.log_decay + a
        anchor = st.anchor
        if cache[0].shape[1] > self.window:
            # pop the oldest token t-r and advance the anchor h_{t-r-1} -> h_{t-r} with it
            ox, odt, oA, oB = (c[:, 0] for c in cache)
            _, anchor = self.inner.step(ox, odt, oA, oB, oB, None, anchor)
            log_decay = log_decay - self.log_decay(odt, oA)
            cache = [c[:, 1:] for c in cache]
        if st.seen + 1 > self.window:
            # y_t = h_t C_t + D x_t - alpha_{t-r+1..t} h_{t-r} C_t
            y = y.to(anchor.dtype) - torch.exp(log_decay).to(anchor.dtype)[..., None] * _read_out(anchor, C)
        return y.to(x.dtype), WindowState(h, anchor, *cache, log_decay, st.seen + 1, self.made_by)


def sliding_window_ssd(x, dt, A, B, C, *, window, D=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """y_t = (h_t - alpha_{t-window+1..t} h_{t-window}) C_t + D x_t from a zero initial state.

    Args: x (b, l, h, p); dt (b, l, h) > 0; A (h,) or (b, l, h) < 0; B, C (b, l, g, n); D (h,) or None;
          window r >= 1 tokens; chunk_size of the underlying SSD scan (the result does not depend on it).
    Returns: y (b, l, h, p) in x.dtype, equal to running each position t from a zero state over only
             tokens t-r+1..t (see sliding_window_quadratic for that reference).
    """
    y, _ = SlidingWindowScan(minimamba.DefaultScan(), window).chunked(x, dt, A, B, C, D, None, chunk_size)
    return y


def sliding_window_quadratic(x, dt, A, B, C, *, window, D=None):
    """The banded quadratic ("attention-like") form of the sliding window, O(l^2): the reference.

        y_t = sum_{i=max(1,t-r+1)..t} exp(sum_{j=i+1..t} dt_j A_j) dt_i (C_t . B_i) x_i + D x_t
    Shapes as sliding_window_ssd. Computed in float64 if x is float64, else float32.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D)
    # checked as sliding_window checks it; >= l is all
    window = min(SlidingWindowScan(None, window).window, l)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = (dt.to(ct) * _per_token_A(A, dt).to(ct)).permute(0, 2, 1)  # (b, h, l)
    cs = torch.cumsum(a, dim=-1)
    seg = cs[..., :, None] - cs[..., None, :]  # (b, h, t, i): sum_{j=i+1..t} a_j
    t_idx = torch.arange(l, device=x.device)
    lag = t_idx[:, None] - t_idx[None, :]  # t - i
    band = (lag >= 0) & (lag < window)
    L = torch.exp(seg.masked_fill(~band, -math.inf))  # (b, h, t, i), 0 outside the band
    Bh, Ch = _heads_from_groups(B.to(ct), h), _heads_from_groups(C.to(ct), h)  # (b, l, h, n)
    y = torch.einsum("bthn,bihn,bhti,bih,bihp->bthp", Ch, Bh, L, dt.to(ct), x.to(ct))
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype)


def sliding_window(model, window: int):
    """`with sliding_window(model, window=512): ...` - every layer reads only its last `window` tokens'
    state (exact per layer given its inputs; an approximation of a window for the whole stack)."""
    spec = SlidingWindowScan(None, window)
    return _SwappedScans(model, lambda inner, i: SlidingWindowScan(inner, spec.window, layer=i))


# --------------------------------------------------------------------------------------------------
# 5. Diagnostics ([SC] "Diagnosis of SC"): state statistics, first-token retention, state size
# --------------------------------------------------------------------------------------------------


def state_size(config) -> int:
    """[SC] state size N_S = n_layer * [H*P*N + (d_conv - 1) * (d_inner + 2*G*N)]: SSM + conv state.

    Reproduces [SC] Table 2 (130M: 4.848M, 370M: 12.915M, 780M: 19.354M elements).
    """
    c = config
    ssm = c.nheads * c.headdim * c.d_state  # H * P * N
    conv = (c.d_conv - 1) * (c.d_inner + 2 * c.ngroups * c.d_state)  # what the conv remembers
    return c.n_layer * (ssm + conv)


def state_statistics(h: torch.Tensor, top_k: int = 4) -> dict[str, torch.Tensor]:
    """Per-head statistics of a state, pooled over the batch and the P*N entries of each head.

    Args: h (b, h, p, n); top_k channels to report.
    Returns a dict of tensors:
        mean, var (population variance), rms = sqrt(mean h^2), max_abs, norm (the largest Frobenius
        norm ||h||_F over the batch): each (h,);
        top_values (h, top_k): the largest mean-over-batch |h| entries, top_channels (h, top_k) their
        flat index p_i * N + n_i into the head's (p, n) state.
    """
    top_k = _check_statistics_args(h, top_k)
    b, nh, p, n = h.shape
    k = min(top_k, p * n)
    flat = h.double().permute(1, 0, 2, 3).reshape(nh, b * p * n)  # (h, b*p*n)
    mag = h.double().abs().mean(0).reshape(nh, p * n)  # (h, p*n)
    top_values, top_channels = mag.topk(k, dim=-1)
    return {"mean": flat.mean(-1), "var": flat.var(-1, unbiased=False), "rms": flat.pow(2).mean(-1).sqrt(),
            "max_abs": flat.abs().amax(-1),
            "norm": torch.linalg.vector_norm(h.double(), dim=(-2, -1)).amax(0),
            "top_values": top_values, "top_channels": top_channels}


def first_token_retention(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """How much of the first token's write is left at each position ([SC] alpha_{1:t}, per head):

        retention_t = prod_{j=2..t} alpha_j = exp(sum_{j=2..t} dt_j A_j),   retention_1 = 1.
    Args: dt (b, l, h); A (h,) or (b, l, h). Returns (b, l, h) float64 (a float64 cumsum: no underflow
    of a running product before the exp).
    """
    _check_retention_args(dt, A)
    a = dt.double() * _per_token_A(A, dt).double()  # (b, l, h)
    return torch.exp(torch.cumsum(a, dim=1) - a[:, :1])


@dataclass
class StateTrace:
    """State diagnostics of a long input, as plain data ready to plot: every array is indexed
    [point, layer, head] (and [..., k] for the top channels); points are at `positions` tokens."""

    positions: list[int]
    mean: torch.Tensor  # (T, n_layer, h) over batch and the P*N entries
    var: torch.Tensor
    rms: torch.Tensor
    max_abs: torch.Tensor
    norm: torch.Tensor  # largest ||h||_F over the batch
    top_values: torch.Tensor  # (T, n_layer, h, k)
    top_channels: torch.Tensor  # (T, n_layer, h, k) flat index p_i * N + n_i
    retention: torch.Tensor  # (T, n_layer, h) first-token retention alpha_{1:t}, mean over the batch
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Nested lists and numbers (json.dumps-able)."""
        out = {"positions": list(self.positions), **self.extra}
        for name in ("mean", "var", "rms", "max_abs", "norm", "top_values", "top_channels", "retention"):
            out[name] = getattr(self, name).tolist()
        return out


class RetentionRecorder(_Wrapper):
    """Wraps a layer's scan (trace_states; experiments/pretrained.py) and sums log alpha_j = dt_j A over the
    stream, j >= 2: exp(log_retention) = alpha_{1:t}, (b, h). A stream resumed at `position` > 0 passes
    the log_retention it had reached there."""

    def __init__(self, inner, log_retention: torch.Tensor | None = None, position: int = 0):
        self.inner, self.log_retention, self.position = inner, log_retention, position

    def _record(self, dt, A):
        a = self.log_decay(dt if dt.dim() == 3 else dt[:, None], A if A.dim() != 2 else A[:, None])
        if self.position == 0:
            a = a[:, 1:]  # the first token's own decay does not act on its write
        s = a.sum(dim=1)  # (b, h)
        self.log_retention = s if self.log_retention is None else self.log_retention + s
        self.position += dt.shape[1] if dt.dim() == 3 else 1

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        self._record(dt, A)
        return self.inner.chunked(x, dt, A, B, C, D, state, chunk_size, return_state=return_state)

    def step(self, x, dt, A, B, C, D, state):
        self._record(dt, A)
        return self.inner.step(x, dt, A, B, C, D, state)


def _state_tensor(s) -> torch.Tensor:
    """The (b, h, p, n) state a scan keeps: itself, a NormState's h, or a WindowState's window state."""
    if isinstance(s, torch.Tensor):
        return s
    if hasattr(s, "window_state"):
        return s.window_state()
    if hasattr(s, "h"):
        return s.h
    raise TypeError(f"cannot read a (b, h, p, n) state from a {type(s).__name__}")


@torch.no_grad()
def trace_states(model, input_ids: torch.Tensor, *, every: int = 128, top_k: int = 4,
                 on_progress=None) -> StateTrace:
    """Stream input_ids (b, l) through the model `every` tokens at a time, carrying the state, and
    record after each piece, per layer and head, the state statistics and first-token retention.

    Runs whatever mitigation is active (call it inside `with rri(...)` etc.). on_progress(done, total)
    is called after each piece (e.g. to draw a progress bar). Positions: every, 2*every, ..., and l.
    """
    every = _check_trace_args(input_ids, every, on_progress)
    l = input_ids.shape[1]
    recorders: list[RetentionRecorder] = []

    def make(inner, i):
        recorders.append(RetentionRecorder(inner))
        return recorders[-1]

    rows, positions, state = [], [], None
    with _SwappedScans(model, make):
        for start in range(0, l, every):
            end = min(start + every, l)
            _, state = model(input_ids[:, start:end], state)
            per_layer = [state_statistics(_state_tensor(s), top_k) for s in state.ssm]
            row = {k: torch.stack([d[k] for d in per_layer]) for k in per_layer[0]}
            row["retention"] = torch.stack([torch.exp(r.log_retention).mean(0)
                                            for r in recorders])  # (n_layer, h)
            rows.append(row)
            positions.append(end)
            if on_progress is not None:
                on_progress(end, l)
    stack = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return StateTrace(positions, **stack, extra={"every": every, "top_k": top_k,
                                                  "state_size": state_size(model.config)})


# --------------------------------------------------------------------------------------------------
# 6. The `with` blocks: swap each mixer's scan object for the duration of the block
# --------------------------------------------------------------------------------------------------
# Every Mamba2Mixer calls self.scan.chunked(...) in forward() and self.scan.step(...) in step(), and
# generate() is forward() then step(); so replacing mixer.scan changes all four paths at once. Each
# layer's scans form a chain (mixer.scan, its .inner, its .inner.inner, ...; a wrapper of your own should
# keep the scan it wraps in .inner too). A state made inside a block holds the mitigation's own objects
# (NormState, WindowState): continue it inside a block like the one that made it, not outside.
# Copies: a scan a block installed is marked in_block, and a copy of the model (copy.deepcopy, pickle,
# torch.save) gets the scan below it instead (_Wrapper.__reduce_ex__); one installed by hand is copied.


def _mixers(model) -> list:
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if layers is None:
        raise TypeError(f"expected a minimamba.Mamba2LM (with model.backbone.layers[i].mixer.scan), "
                        f"got {type(model).__name__}")
    return [layer.mixer for layer in layers]


class _SwappedScans:
    """A `with` block in which layer i uses make(its current scan, i). On exit each layer loses only the
    scan this block installed, wherever it now sits in the chain: blocks left out of order (enter A,
    enter B, exit A, exit B) or by an exception leave every layer as it was before. A scan that is no
    longer in the chain (replaced by hand inside the block) is not put back. A block can be entered
    again once it is left, not while it is open."""

    def __init__(self, model, make):
        self.model, self.mixers, self.make, self.installed = model, _mixers(model), make, None

    def __enter__(self):
        if self.installed is not None:
            raise RuntimeError("this block is already open: leave it before entering it again")
        old = [m.scan for m in self.mixers]
        # build all first: an error leaves the model as it was
        new = [self.make(scan, i) for i, scan in enumerate(old)]
        for m, scan, below in zip(self.mixers, new, old):
            if scan is not below and isinstance(scan, _Wrapper):
                scan.in_block = True  # left out of copies of the model
            m.scan = scan
        self.installed = list(zip(new, old))
        return self.model

    def __exit__(self, *exc):
        if self.installed is None:
            raise RuntimeError("this block is not open: there is nothing to leave")
        for m, (ours, below) in zip(self.mixers, self.installed):
            if ours is not below:  # make() may keep a layer's scan as it is
                _take_out(m, ours, below)
        self.installed = None
        return False


def _take_out(mixer, ours, below):
    """Unlink the scan `ours` from the mixer's chain: whoever holds it (mixer.scan or a wrapper's .inner)
    gets what it wraps now (its .inner; `below`, the scan it replaced, if it wraps nothing)."""
    replacement = getattr(ours, "inner", below)
    if mixer.scan is ours:
        mixer.scan = replacement
        return
    above = mixer.scan
    while getattr(above, "inner", None) is not None:
        if above.inner is ours:
            above.inner = replacement
            return
        above = above.inner


def _same(scan):
    """What a copy of a model gets in place of a scan a block installed: the scan below it."""
    return scan


# --------------------------------------------------------------------------------------------------
# 7. Refusals: argument checks, and a state continues only in the block that made it
# --------------------------------------------------------------------------------------------------
# Every message says what was expected and what was received.


def _checked(name: str, value, kind: type, ok, expected: str):
    """value as a Python `kind` (int or float) if it is one and ok(value), else a TypeError or ValueError
    that says what was expected and what was received. A bool is not a number here (True would pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    try:
        converted = kind(value)
    except OverflowError:  # an int too large for a float
        converted = math.inf
    if not ok(converted):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return converted


def _check_call(scan, x, dt, A, B, C, D, state, chunk_size=None, return_state=True):
    """Validate one call of a scan of this file: the inputs' shapes (minimamba.check_scan_inputs), and
    that `state` is one its block continues. scan.made_by names the sliding_window / state_norm in the
    block (None if there is none): without one, a state is None or the model's tensor (which the
    model's scan checks); with one, None or a state the same block made (method, parameters, layer),
    of the inputs' (b, h, p, n) and on their device."""
    b, _, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, None, None, step=x.dim() == 3)
    if x.dim() == 4:  # the chunked form
        _checked("chunk_size", chunk_size, int, lambda v: v >= 1, "a positive int (tokens per SSD chunk)")
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {return_state!r} ({type(return_state).__name__})")
    if isinstance(scan, StateNormScan) and scan.taus.shape[0] != h:
        raise ValueError(f"taus has {scan.taus.shape[0]} thresholds, the inputs have h = {h} heads")
    ours = isinstance(state, (NormState, WindowState))
    if state is None or (scan.made_by is None and not ours):
        return
    if scan.made_by is None:
        raise TypeError(f"this state was made by {state.made_by}; this block is {scan.name}, which continues "
                        "the model's (b, h, p, n) tensor: continue the state inside a block like the one "
                        "that made it")
    if not ours:
        raise TypeError(f"this block is {scan.made_by}, which continues only a state made by the same block, "
                        f"got a {type(state).__name__} (a tensor state comes from the model's scan, rri or "
                        "delta_scaling): start the block from state None")
    if state.made_by != scan.made_by:
        raise ValueError(f"this state was made by {state.made_by}; this block is {scan.made_by}")
    if state.h is not None and tuple(state.h.shape) != (b, h, p, n):
        raise ValueError(f"this state is (b, h, p, n) = {tuple(state.h.shape)}, "
                         f"the inputs need {(b, h, p, n)}")
    if state.h is not None and state.h.device != x.device:
        raise ValueError(f"this state is on {state.h.device}, the inputs on {x.device}")
    cache_B = getattr(state, "cache_B", None)
    if cache_B is not None and cache_B.shape[-2] != g:
        raise ValueError(f"this state's cached B has g = {cache_B.shape[-2]} groups, the inputs' B has {g}")


def _check_directly_on_the_model_scan(method: str, inner):
    """state_norm and sliding_window need the model's (linear) scan with a tensor state below them."""
    if isinstance(inner, (StateNormScan, SlidingWindowScan, _InputTransform)):
        raise ValueError(f"{method} needs the model's (linear) scan directly below it: "
                         f"enter {method}() before rri()/delta_scaling(), and not on top of state_norm() "
                         f"or sliding_window(); found {type(inner).__name__}")


def _thresholds(taus, shape: tuple | None = None) -> torch.Tensor:
    """taus as a real tensor of thresholds > 0 (inf = never clamp): (n_layer, h) = shape, or any (h,)."""
    expected = f"a {f'(n_layer, h) = {shape}' if shape else '(h,)'} tensor of thresholds > 0 (inf = off)"
    try:
        t = torch.as_tensor(taus)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dtype == torch.bool or t.is_complex():
        got = f"{taus!r} ({type(taus).__name__})" if t is None else f"a {t.dtype} tensor"
        raise TypeError(f"taus must be {expected}, got {got}")
    if (tuple(t.shape) != shape) if shape else t.dim() != 1:
        raise ValueError(f"taus must be {expected}, got shape {tuple(t.shape)}")
    t = t if t.is_floating_point() else t.float()  # kept in its precision (float64 stays)
    if not bool((t > 0).all()):  # also refuses nan
        raise ValueError(f"taus must be {expected}, got {t[~(t > 0)].tolist()} among them")
    return t


def _check_clamp_args(h, tau):
    if h.dim() != 4 or tuple(tau.shape) != (h.shape[1],):
        raise ValueError(f"clamp_state needs h (b, h, p, n) and tau (h,), "
                         f"got {tuple(h.shape)} and {tuple(tau.shape)}")


def _check_statistics_args(h, top_k) -> int:
    if not isinstance(h, torch.Tensor) or h.dim() != 4:
        raise ValueError(f"h must be a (b, h, p, n) tensor, got {_described(h)}")
    return _checked("top_k", top_k, int, lambda v: v >= 1, "a positive int (channels to report)")


def _check_retention_args(dt, A):
    if not isinstance(dt, torch.Tensor) or not isinstance(A, torch.Tensor) or dt.dim() != 3 \
            or tuple(A.shape) not in ((dt.shape[-1],), tuple(dt.shape)):
        raise ValueError(f"dt must be a (b, l, h) tensor and A (h,) or dt's shape, got "
                         f"{_described(dt)} and {_described(A)}")


def _check_trace_args(input_ids, every, on_progress) -> int:
    every = _checked("every", every, int, lambda v: v >= 1, "a positive int (tokens between records)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (b, l) tensor with l >= 1, got {_described(input_ids)}")
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress must be a function (done, total) or None, got {on_progress!r}")
    return every


def _described(t) -> str:
    """'shape (2, 3)' for a tensor, else the type's name: what an error message says was received."""
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _in_layer(layer) -> str:
    """' in layer i' for a state's record of the block that made it ('' when no layer is given)."""
    if layer is None:
        return ""
    return f" in layer {_checked('layer', layer, int, lambda v: v >= 0, 'a layer index >= 0')}"
