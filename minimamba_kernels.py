"""minimamba_kernels: faster SSM scans and a faster causal conv for minimamba, installed by one call.
(Not named `kernels`: that is a PyPI package which transformers requires, and a top-level kernels.py
would shadow it.)

    import minimamba_kernels as kernels
    model = kernels.accelerate(minimamba.Mamba2LM(config))   # same function, faster; returns model
    kernels.restore(model)                                   # back to minimamba's own code

accelerate() puts a FastScan into every layer's `mixer.scan` and a conv with a hand-written backward
into `mixer.conv`: the two plug-in points of minimamba.Mamba2Mixer (mitigations.py wraps the same
`mixer.scan`, so enter mitigations after accelerating). It changes nothing else: two CPU helpers are
explicit opt-ins, never installed by accelerate():
    kernels.forward_in_pieces(model, 1024)   # long no-grad CPU calls run in pieces, state carried
    kernels.keep_freed_memory()              # PROCESS-WIDE: glibc's malloc keeps freed memory
This file imports minimamba, never the reverse; tests prove the accelerated model computes what the
plain one does (logits and gradients).

Paper: [SSD] Dao & Gu, "Transformers are SSMs", arXiv 2405.21060 (Listing 1 is the chunked scan).

Reading order (sections)
    1. ssd_sequential        the plain recurrence, one token at a time: the oracle
                             every path is tested against
    2. ssd_chunked           the chunked SSD restructured for speed and torch.compile (what a GPU runs):
                             every heavy term a batched matmul, C B^T once per group, the chunk-to-chunk
                             pass linear in the number of chunks; ssd_chunked_compiled compiles it, one
                             static graph per power-of-two bucket of chunk counts
    3. ssd_quadratic         training without a state: a sequence that fits one chunk, from a zero state,
                             whose final state nobody reads, needs only step 1 (attention-like form)
    4. eager training        a hand-written backward for ssd_chunked (autograd through the chunk loop
                             would keep every intermediate and cost O(c^2))
    5. CPU-only tricks       the factored decay mask, segments, in-place buffers, the conv's backward
                             (their knobs are the fields of CpuTricks); the opt-ins forward_in_pieces
                             and keep_freed_memory
    6. accelerate / restore  installing the fast scan and conv into a model

Glossary: as minimamba (b batch, l length, h heads, p headdim, n d_state, g groups, q chunk,
c chunks), and r = h / g heads per group.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import minimamba
from minimamba import _compute_dtype, check_scan_inputs

# ---------------------------------------------------------------------------------------------------
# 1. The oracle: the recurrence itself
# ---------------------------------------------------------------------------------------------------


def ssd_sequential(x, dt, A, B, C, *, D=None, initial_state=None):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t + D x_t, one token at a time.

    Args/Returns: as minimamba.ssd (x (b, l, h, p), dt (b, l, h), A (h,) or (b, l, h),
    B, C (b, l, g, n), D (h,), initial_state (b, h, p, n)) -> y (b, l, h, p), final_state.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state)
    ct = _compute_dtype(x.dtype)
    xf, dtf = x.to(ct), dt.to(ct)
    Af = A.to(ct).expand(b, l, h)
    Bh = B.to(ct).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(ct).repeat_interleave(h // g, dim=2)
    S = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af[:, t])  # (b, h)
        S = decay[..., None, None] * S + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(ct)[:, None] * xf
    return y.to(x.dtype), S


def ssd_sequential_chunked(x, dt, A, B, C, *, chunk_size=None, D=None, initial_state=None,
                           return_final_state=True):
    """ssd_sequential with minimamba.ssd's signature (chunk_size is accepted and has no effect)."""
    y, S = ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_state)
    return y, (S if return_final_state else None)


# ---------------------------------------------------------------------------------------------------
# 2. The chunked scan, matmul-shaped and compile-ready
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTricks:
    """What ssd_chunked does differently in eager mode on a CPU (section 5), each measured there:
    apart from the matmuls the scan is bound by memory traffic, and a fresh multi-megabyte tensor
    costs page faults on first touch. None of it changes the result beyond float rounding."""

    segment: int = 512  # long inputs run as whole-chunk segments of about this many tokens, state
    # carried (bounded, reused temporaries; at h 24, p 64, n 128, q 128, l 4096, 1 thread, segments of
    # 256 / 512 / 1024 / 4096 tokens took 112 / 90 / 139 / 173 ms)
    factored_range: float | None = 60.0  # nats: step 1 splits the decay mask where |cumsum| stays
    # below this (see _diag_factored); None: always the per-head blocks
    factored_backward: bool = True  # the backward of step 1 also uses the factored mask where it can

    def __post_init__(self):
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1:
            raise ValueError(f"segment must be a positive int (tokens), got {self.segment!r}")
        if not isinstance(self.factored_backward, bool):
            raise TypeError(f"factored_backward must be True or False, got {self.factored_backward!r}")
        if self.factored_range is not None and not 0 <= self.factored_range <= 80:
            raise ValueError(f"factored_range must be None or in [0, 80] nats (e^80 is near float32's "
                             f"largest value), got {self.factored_range!r}")


def _pass_states_loop(states, decay, S0, out=None):
    """Step 3 as a loop over chunks (cheapest in eager mode: one pass over the states).

    S_in[0] = S0;  S_in[c+1] = decay_c * S_in[c] + states_c.
    states (b, c, h, p, n), decay (b, c, h) = exp(sum of a over each chunk), S0 (b, h, p, n)
    -> (states entering each chunk (b, c, h, p, n), final state (b, h, p, n)).
    Without autograd every step is one fused multiply-add written in place into a buffer (out, or a
    new one); with autograd the steps stay out of place (autograd keeps each S_in[c]).
    """
    d = decay[..., None, None]  # (b, c, h, 1, 1)
    c = states.shape[1]
    if not (torch.is_grad_enabled() and (states.requires_grad or decay.requires_grad or S0.requires_grad)):
        entering = torch.empty_like(states) if out is None else out  # (b, c, h, p, n)
        entering[:, 0] = S0
        for i in range(c - 1):
            torch.addcmul(states[:, i], d[:, i], entering[:, i], out=entering[:, i + 1])
        return entering, torch.addcmul(states[:, -1], d[:, -1], entering[:, -1])
    S, out = S0, []
    for i in range(c):
        out.append(S)
        S = torch.addcmul(states[:, i], d[:, i], S)
    return torch.stack(out, dim=1), S


def _pass_states_doubling(states, decay, S0):
    """Step 3 as a parallel prefix scan (Hillis-Steele doubling) over chunks, for torch.compile.

    Elements (alpha_c, s_c) combine as (alpha1, s1) then (alpha2, s2) -> (alpha1 alpha2, alpha2 s1 + s2).
    After the round with shift d, position c holds the combination of chunks c-2d+1 .. c.
    ceil(log2 c) rounds of O(c) work and no Python loop whose length is the number of chunks (such a
    loop would make the compiler specialize on every length; here it only sees comparisons d < c, so
    one graph serves every c between two powers of two). Shapes as _pass_states_loop. The decays
    multiply (each factor in (0, 1]): products underflow gracefully to 0 and never overflow.
    """
    c = states.shape[1]
    # fold the initial state into chunk 0: S_end[0] = alpha_0 S0 + s_0
    s = torch.cat([decay[:, :1, :, None, None] * S0[:, None] + states[:, :1], states[:, 1:]], dim=1)
    alpha, d = decay, 1
    while d < c:
        s = s + alpha[..., None, None] * F.pad(s, (0, 0, 0, 0, 0, 0, d, 0))[:, :c]
        alpha = alpha * F.pad(alpha, (0, 0, d, 0), value=1.0)[:, :c]
        d *= 2
    return torch.cat([S0[:, None], s[:, :-1]], dim=1), s[:, -1]  # state before chunk c = after chunk c-1


def _chunk_layout(x, dt, A, B, C, q, g):
    """The inputs padded to whole chunks and discretized, in the chunk layout every step uses.

    x (b, l, h, p), dt (b, l, h), A (h,) or (b, l, h), B, C (b, l, g, n), all in the compute dtype ->
    X = x dt (b, c, g, q, r, p) (a view of a (b, c*q, h, p) tensor), a_cumsum (b, c, g, r, q),
    Bc, Cc (b, c, g, q, n) (views), and the padded x and dt.
    Padding is zero dt: padded steps neither decay nor write, so the final state stays exact.
    """
    b, l, h, p = x.shape
    n, r = B.shape[-1], h // g
    pad = (-l) % q
    c = (l + pad) // q
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    a = dt * (A if A.dim() == 1 else F.pad(A, (0, 0, 0, pad)))  # (b, c*q, h): a = dt A, log of the decay
    X = (x * dt[..., None]).reshape(b, c, q, g, r, p).transpose(2, 3)  # (b, c, g, q, r, p) a view
    a = a.reshape(b, c, q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    Bc = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cc = C.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    return X, torch.cumsum(a, dim=-1), Bc, Cc, x, dt


def _decay_blocks(a_cumsum, CB, grad):
    """M = C B^T o L per head, L[i, s] = exp(a_cumsum[i] - a_cumsum[s]) for i >= s (the difference of
    cumsums, as the official kernel does; a chunk is short, so the cancellation error stays ~1e-7
    relative). a_cumsum (b, c, g, r, q), CB (b, c, g, q, q) masked to i >= s -> M (b, c, g, r, q, q)."""
    q = a_cumsum.shape[-1]
    seg = a_cumsum[..., :, None] - a_cumsum[..., None, :]  # (b, c, g, r, q, q)
    if grad:
        causal = torch.ones(q, q, dtype=torch.bool, device=CB.device).tril_()
        return torch.exp(seg.masked_fill(~causal, -math.inf)) * CB[:, :, :, None]
    # the same three operations in place: one buffer instead of three (above the diagonal CB = 0)
    return seg.clamp_(max=0.0).exp_().mul_(CB[:, :, :, None])


def _ssd_chunked_forward(x, dt, A, B, C, D, S0, q, tricks=None, y_out=None, entering_out=None):
    """Steps 1-4 on float inputs in the compute dtype; S0 (b, h, p, n) (zeros if none).
    Returns y (b, l, h, p), the final state (b, h, p, n) and the states entering each chunk
    (b, c, h, p, n), which the hand-written backward keeps instead of every intermediate.
    tricks: a CpuTricks (eager CPU) or None. Without autograd, y_out (b, c*q, h, p) and entering_out
    (b, c, h, p, n) may be buffers (slices of the caller's output) that receive the results."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, S0))
    fused = not grad and not torch.compiler.is_compiling()  # in-place buffers are safe
    X, a_cumsum, Bc, Cc, xf, _ = _chunk_layout(x, dt, A, B, C, q, g)
    c = X.shape[1]

    # Step 1: Y_diag = (C B^T o L) X. C B^T once per group (masked to the causal triangle), the
    # decay mask L per head.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()  # (q, q) i >= s
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    if fused and tricks is not None and tricks.factored_range is not None:
        Y_diag = _diag_factored(a_cumsum, CB, X, tricks.factored_range)  # (b, c, g, q, r, p), section 5
    else:
        M = _decay_blocks(a_cumsum, CB, grad)  # (b, c, g, r, q, q)
        Y_diag = (M @ X.transpose(3, 4)).transpose(3, 4)  # (b, c, g, q, r, p), a view

    # Step 2: chunk states S_c = sum_s exp(a_cumsum[last] - a_cumsum[s]) X_s B_s^T, the r heads of a
    # group stacked into one (r*p, q) @ (q, n) matmul.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum).transpose(3, 4)  # (b, c, g, q, r)
    Xd = (X * decay_to_end[..., None]).view(b, c, g, q, r * p)  # (b, c, g, q, r*p)
    states = (Xd.transpose(-1, -2) @ Bc).view(b, c, h, p, n)  # (b, c, h, p, n)

    # Step 3: pass states between chunks, linear in c.
    chunk_decay = torch.exp(a_cumsum[..., -1]).reshape(b, c, h)  # (b, c, h)
    if torch.compiler.is_compiling():
        entering, final = _pass_states_doubling(states, chunk_decay, S0)
    else:
        entering, final = _pass_states_loop(states, chunk_decay, S0, out=entering_out)  # (b, c, h, p, n)

    # Step 4: Y_off = exp(a_cumsum) * (C S_in^T), one (q, n) @ (n, r*p) matmul per group, which
    # lands in x's own (q, r, p) layout; then Y = Y_diag + Y_off (+ D x).
    S_in = entering.view(b, c, g, r * p, n).transpose(-1, -2)  # (b, c, g, n, r*p)
    Y_off = (Cc @ S_in).view(b, c, g, q, r, p)  # (b, c, g, q, r, p)
    exp_cs = torch.exp(a_cumsum).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    if not fused:
        Y = (Y_off * exp_cs).add_(Y_diag).transpose(2, 3).reshape(b, c * q, h, p)  # (b, c*q, h, p)
    else:  # one fused pass that writes straight into the output, in its (b, c*q, h, p) layout
        Y = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device) if y_out is None else y_out
        torch.addcmul(Y_diag, Y_off, exp_cs, out=Y.view(b, c, q, g, r, p).transpose(2, 3))
    if D is not None:
        Y = Y.addcmul_(xf, D[:, None]) if fused else Y + xf * D[:, None]
    return Y[:, :l], final, entering


def ssd_chunked(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_final_state=True,
                cpu_tricks: CpuTricks | None = CpuTricks()):
    """The chunked SSD scan in four matmul-shaped steps (same result as minimamba.ssd).

    Layout: heads are split as h = g * r (r = h / g heads per group), so every term that depends
    only on B or C is computed once per group, and heads of a group are batched into one matmul.
    x keeps its natural (q, r*p) layout per chunk and group, so steps 2 and 4 are single
    (r*p, q) @ (q, n) and (q, n) @ (n, r*p) matmuls with no copies.
    With autograd in eager mode a hand-written backward (section 4) recomputes the intermediates
    instead of keeping them; compiled, autograd runs through the forward. cpu_tricks (section 5)
    apply in eager mode on a CPU; None switches them off.
    Args/Returns: as minimamba.ssd.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    S0 = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    args = [x.to(ct), dt.to(ct), A.to(ct), B.to(ct), C.to(ct), None if D is None else D.to(ct), S0]
    tricks = cpu_tricks if (x.device.type == "cpu" and not torch.compiler.is_compiling()) else None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    if grad and not torch.compiler.is_compiling():
        y, final = _SSDChunked.apply(*args, chunk_size, tricks)
    else:
        y, final, _ = _forward_segmented(*args, chunk_size, tricks, keep_entering=False)
    return y.to(x.dtype), (final if return_final_state else None)


_compiled = None
_warned_eager = False  # the eager fallback of ssd_chunked_compiled has said so once


def ssd_chunked_compiled(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_final_state=True):
    """torch.compile(ssd_chunked, fullgraph=True) with static shapes, on inputs padded to a bucket: the
    length is padded (dt = 0: padded steps neither decay nor write, so y and the final state are exact) to
    a power of two chunks, so one graph serves every length of a bucket (per batch size and dtype) and
    autograd runs through the compiled forward. Why not dynamic=True: in torch 2.13 the CPU backward of
    the dynamic-shape graph corrupts memory ("double free or corruption"); static bucketed graphs do not,
    and cost at most 2x padding.

    Every new variant (bucket x batch x dtype x grad mode x with or without a state ...) is one more graph,
    and torch allows torch._dynamo.config.recompile_limit (8) per function: past it, fullgraph=True raises
    FailOnRecompileLimitHit. Here such a call runs eager ssd_chunked instead (the same function) and warns
    once; the variants already compiled stay compiled.
    Args/Returns: as minimamba.ssd.
    """
    global _compiled, _warned_eager
    if _compiled is None:
        _compiled = torch.compile(ssd_chunked, fullgraph=True, dynamic=False)
    l, q = x.shape[1], chunk_size
    pad = q * 2 ** math.ceil(math.log2(max(1, -(-l // q)))) - l  # up to a power of two chunks
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt, A = F.pad(dt, (0, 0, 0, pad)), (A if A.dim() == 1 else F.pad(A, (0, 0, 0, pad)))
    try:
        y, S = _compiled(x, dt, A, B, C, chunk_size=q, D=D, initial_state=initial_state,
                         return_final_state=return_final_state)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        if not _warned_eager:
            _warned_eager = True
            warnings.warn(f"ssd_chunked_compiled: torch's recompile limit "
                          f"({torch._dynamo.config.recompile_limit} graphs) is reached; new input variants "
                          "run eager ssd_chunked (same results, slower). Raise "
                          "torch._dynamo.config.recompile_limit to compile more of them.",
                          RuntimeWarning, stacklevel=2)
        y, S = ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, initial_state=initial_state,
                           return_final_state=return_final_state)
    return y[:, :l], S


# ---------------------------------------------------------------------------------------------------
# 3. Training without a state: one chunk from a zero state, final state unread
# ---------------------------------------------------------------------------------------------------


def ssd_quadratic(x, dt, A, B, C, *, D=None, factored_range: float | None = None):
    """Step 1 of the SSD alone, the quadratic ("attention-like") form [SSD sec. 4]:
        y_i = sum_{s <= i} (C_i . B_s) exp(cs_i - cs_s) dt_s x_s + D x_i,   cs = cumsum(dt A)
    which is the whole scan for a sequence from a zero state when nobody reads the final state:
    no (b, h, p, n) state is ever built. O(l^2) per head: meant for l up to a chunk (plain training
    at T_train <= chunk_size).

    factored_range (nats, eager CPU): when every head's cumsum spans at most 2 * factored_range,
    L = exp(cs_i - m) exp(m - cs_s) (m = the middle of that span, so each factor is at most
    e^factored_range) and all heads of a group share ONE (l, l) @ (l, r*p) matmul with C B^T, with a
    hand-written backward (_QuadraticFactored); else (or None) per-head (l, l) blocks through
    autograd. Shapes as minimamba.ssd; returns y (b, l, h, p).
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D)
    ct, r = _compute_dtype(x.dtype), h // g
    xf, dtf, Af, Bf, Cf = x.to(ct), dt.to(ct), A.to(ct), B.to(ct), C.to(ct)
    Df = None if D is None else D.to(ct)
    if factored_range is not None:
        with torch.no_grad():
            cs = torch.cumsum(dtf * Af, dim=1)  # (b, l, h)
            spread = cs.amax(1) - cs.amin(1)  # (b, h)
        if bool((spread <= 2 * factored_range).all()):
            return _QuadraticFactored.apply(xf, dtf, Af, Bf, Cf, Df).to(x.dtype)
    cs = torch.cumsum(dtf * Af, dim=1).transpose(1, 2)  # (b, h, l)
    CB = torch.tril(Cf.transpose(1, 2) @ Bf.permute(0, 2, 3, 1))  # (b, g, l, l), i >= s
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril_()
    L = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf))  # (b, h, l, l)
    X = (xf * dtf[..., None]).view(b, l, g, r, p).permute(0, 2, 3, 1, 4)  # (b, g, r, l, p)
    y = ((L.view(b, g, r, l, l) * CB[:, :, None]) @ X).permute(0, 3, 1, 2, 4).reshape(b, l, h, p)
    return (y if Df is None else y + Df[:, None] * xf).to(x.dtype)


class _QuadraticFactored(torch.autograd.Function):
    """ssd_quadratic's factored form with its backward written out. With E = exp(cs - m), F = 1 / E
    (m the middle of cs's span, a constant: y does not depend on it), X = x dt, V = F X and
    Z = (C B^T) V per group (heads stacked as (l, r*p)):
        forward   y = E Z + D x
        backward  dZ = E dy,  dCB = tril(dZ V^T),  dV = CB^T dZ,  dC = dCB B,  dB = dCB^T C,
                  dX = F dV,  dcs = E <dy, Z>_p - <dV, V>_p = E <dy, Z>_p - <dX, X>_p,
                  da = reversed cumsum of dcs,  dx = dt dX + D dy,  ddt = <dX, x>_p + A da,
                  dA = dt da (summed over b, l when A is per head),  dD = <dy, x>
    Inputs in the compute dtype: x (b, l, h, p), dt (b, l, h), A (h,) or (b, l, h), B, C (b, l, g, n), D."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D):
        b, l, h, p = x.shape
        g = B.shape[2]
        cs = torch.cumsum(dt * A, dim=1)  # (b, l, h)
        E = torch.exp(cs - (cs.amax(1, keepdim=True) + cs.amin(1, keepdim=True)) / 2)  # (b, l, h), centred
        X = x * dt[..., None]  # (b, l, h, p)
        V = X / E[..., None]
        CB = torch.tril(C.transpose(1, 2) @ B.permute(0, 2, 3, 1))  # (b, g, l, l)
        Z = (CB @ V.view(b, l, g, -1).transpose(1, 2)).transpose(1, 2).reshape(b, l, h, p)
        ctx.save_for_backward(x, dt, A, B, C, D, E, X, V, CB, Z)
        y = Z * E[..., None]
        return y if D is None else y.addcmul_(x, D[:, None])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, dt, A, B, C, D, E, X, V, CB, Z = ctx.saved_tensors
        b, l, h, p = x.shape
        g = B.shape[2]
        dZ = (dy * E[..., None]).view(b, l, g, -1).transpose(1, 2)  # (b, g, l, r*p)
        dCB = torch.tril(dZ @ V.view(b, l, g, -1).permute(0, 2, 3, 1))  # (b, g, l, l)
        dX = (CB.transpose(-1, -2) @ dZ).transpose(1, 2).reshape(b, l, h, p) / E[..., None]
        dC = (dCB @ B.transpose(1, 2)).transpose(1, 2)  # (b, l, g, n)
        dB = (dCB.transpose(-1, -2) @ C.transpose(1, 2)).transpose(1, 2)
        dcs = (dy * Z).sum(-1) * E - (dX * X).sum(-1)  # (b, l, h)
        da = dcs.flip(1).cumsum(1).flip(1)
        dx = dX * dt[..., None]
        if D is not None:
            dx = dx.addcmul_(dy, D[:, None])
        ddt = (dX * x).sum(-1).addcmul_(da, A)
        dA = da * dt if A.dim() == 3 else (da * dt).sum((0, 1))
        dD = None if D is None else (dy * x).sum((0, 1, 3))
        return dx, ddt, dA, dB, dC, dD


# ---------------------------------------------------------------------------------------------------
# 4. Eager training: a hand-written backward for ssd_chunked
# ---------------------------------------------------------------------------------------------------


class _SSDChunked(torch.autograd.Function):
    """ssd_chunked with a hand-written backward (_ssd_chunked_backward). Autograd through the forward
    would keep every per-head (q, q) block and temporary of steps 1-4, and its chunk loop costs
    O(c^2) in the backward (each of the c slices of the states gets a full-size zero gradient); this
    keeps only the inputs and the states entering each chunk (one (h, p, n) state per chunk)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, q, tricks):
        y, final, entering = _forward_segmented(x, dt, A, B, C, D, S0, q, tricks)
        ctx.q, ctx.tricks = q, tricks
        ctx.save_for_backward(x, dt, A, B, C, D, S0, entering)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY, dfinal):
        x, dt, A, B, C, D, S0, entering = ctx.saved_tensors
        if dfinal is None:  # the final state was not used
            dfinal = torch.zeros_like(S0)
        grads = _backward_segmented(x, dt, A, B, C, D, S0, ctx.q, ctx.tricks, entering, dY, dfinal)
        return (*(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad)), None, None)


def _ssd_chunked_backward(x, dt, A, B, C, D, S0, q, tricks, entering, dY, dfinal):
    """Gradients of _ssd_chunked_forward with respect to x, dt, A, B, C, D, S0, by hand: each step's
    intermediates are recomputed from the inputs (cheap, matmul-shaped) instead of kept.

    With s = a_cumsum inside a chunk, w_j = exp(s_last - s_j), E_i = exp(s_i), per head:
        step 4  Y_off = diag(E) Z, Z = C S_in^T dZ = diag(E) dY:  dC += dZ S_in,  dS_in += dZ^T C,
                                                ds_i += sum_p dZ_ip Z_ip
        step 3  S_in[c+1] = e^{s_last} S_in[c] + states_c, run backwards from dfinal:
                G_c = e^{s_last,c} G_{c+1} + dS_in[c] (G_c = gradient of S_in[c]), dstates_c = G_{c+1},
                ds_last += e^{s_last} <G_{c+1}, S_in[c]>;  dS0 = G_0
        step 2  states = (X o w)^T B            d(Xw) = B dstates^T:  dX += d(Xw) o w,  dB += (X o w) dstates,
                                                P_j = w_j sum_p d(Xw)_jp X_jp:  ds_last += sum_j P_j,
                                                                                ds_j -= P_j
        step 1  Y_diag = (CB o L) X             dX += M^T dY,  dM = dY X^T,  dCB = sum over heads (dM o L),
                                                dC += dCB B,  dB += dCB^T C,
                                                Q = dM o M:  ds_i += sum_s Q_is - sum_j Q_ji
    Then a = cumsum^-1(s): da_j = sum_{i >= j} ds_i (a reversed cumsum), and the discretization
    X = x dt, a = dt A gives dx = dX dt + D dY, ddt = <dX, x> + da A, dA = da dt, dD = <dY, x>.
    Shapes: inputs as _ssd_chunked_forward; entering (b, c, h, p, n); dY (b, l, h, p); dfinal (b, h, p, n).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    X, a_cumsum, Bc, Cc, xf, dtf = _chunk_layout(x, dt, A, B, C, q, g)
    c = X.shape[1]
    dYc = F.pad(dY, (0, 0, 0, 0, 0, c * q - l)).view(b, c, q, g, r, p).transpose(2, 3)  # (b, c, g, q, r, p)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()  # (q, q) i >= s

    # step 4: Y_off = exp(s) (C S_in^T)
    S_in = entering.view(b, c, g, r * p, n)  # (b, c, g, r*p, n)
    exp_cs = torch.exp(a_cumsum).transpose(3, 4)  # (b, c, g, q, r)
    dZ = (dYc * exp_cs[..., None]).view(b, c, g, q, r * p)  # (b, c, g, q, r*p)
    Z = (Cc @ S_in.transpose(-1, -2)).view(b, c, g, q, r, p)  # (b, c, g, q, r, p): Y_off = E Z
    ds = Z.mul_(dZ.view(b, c, g, q, r, p)).sum(-1).transpose(3, 4)  # (b, c, g, r, q)
    dC = dZ @ S_in  # (b, c, g, q, n)
    dS_in = (dZ.transpose(-1, -2) @ Cc).view(b, c, h, p, n)  # (b, c, h, p, n)

    # step 3, backwards over chunks: dstates[c] = G_{c+1}
    chunk_decay = torch.exp(a_cumsum[..., -1]).reshape(b, c, h)  # (b, c, h)
    dstates = torch.empty_like(entering)  # (b, c, h, p, n)
    dstates[:, -1] = dfinal
    dec = chunk_decay[..., None, None]  # (b, c, h, 1, 1)
    for i in range(c - 1, 0, -1):
        torch.addcmul(dS_in[:, i], dec[:, i], dstates[:, i], out=dstates[:, i - 1])
    dS0 = torch.addcmul(dS_in[:, 0], dec[:, 0], dstates[:, 0])  # (b, h, p, n)
    # ds_last += e^{s_last} <G_{c+1}, S_in[c]>, a batched dot product per chunk and head
    ds[..., -1] += (dstates * entering).sum((-1, -2)).view(b, c, g, r) * chunk_decay.view(b, c, g, r)

    # step 2: states = (X o w)^T B
    w = torch.exp(a_cumsum[..., -1:] - a_cumsum).transpose(3, 4)  # (b, c, g, q, r)
    dstates_g = dstates.view(b, c, g, r * p, n)  # (b, c, g, r*p, n)
    dXw = (Bc @ dstates_g.transpose(-1, -2)).view(b, c, g, q, r, p)  # (b, c, g, q, r, p)
    dB = (X * w[..., None]).view(b, c, g, q, r * p) @ dstates_g  # (b, c, g, q, n)
    P = (dXw * X).sum(-1).mul_(w).transpose(3, 4)  # (b, c, g, r, q)
    ds -= P
    ds[..., -1] += P.sum(-1)
    dX = dXw.mul_(w[..., None])  # (b, c, g, q, r, p)

    # step 1: Y_diag = (CB o L) X, per head
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    if tricks is not None and tricks.factored_backward and tricks.factored_range is not None:
        dCB = _diag_factored_backward(a_cumsum, CB, X, dYc, dX, ds, tricks.factored_range)  # section 5
    else:  # every head through its (q, q) block
        L = (a_cumsum[..., :, None] - a_cumsum[..., None, :]).clamp_(max=0.0).exp_()  # (b, c, g, r, q, q)
        M = L * CB[:, :, :, None]  # (b, c, g, r, q, q); above the diagonal M = CB o L = 0 anyway
        dXh, dsh, dML = _head_block_grads(M, L, X.transpose(3, 4), dYc.transpose(3, 4))
        dX += dXh.transpose(3, 4)
        ds += dsh
        dCB = dML.sum(3)  # (b, c, g, q, q): the heads of a group share C B^T
    dCB.masked_fill_(~causal, 0.0)
    dC += dCB @ Bc
    dB += dCB.transpose(-1, -2) @ Cc

    # the discretization: a = dt A, X = x dt; s = cumsum(a) inside each chunk
    da = ds.flip(-1).cumsum(-1).flip(-1).permute(0, 1, 4, 2, 3).reshape(b, c * q, h)[:, :l]  # (b, l, h)
    dX = dX.transpose(2, 3).reshape(b, c * q, h, p)[:, :l]  # (b, l, h, p)
    x0, dt0 = xf[:, :l], dtf[:, :l]
    dx = dX * dt0[..., None]
    if D is not None:
        dx = dx.addcmul_(dY, D[:, None])
    ddt = (dX * x0).sum(-1).addcmul_(da, A)  # (b, l, h)
    dA = da * dt0 if A.dim() == 3 else (da * dt0).sum((0, 1))
    dD = None if D is None else (dY * x0).sum((0, 1, 3))
    dB = dB.transpose(2, 3).reshape(b, c * q, g, n)[:, :l]
    dC = dC.transpose(2, 3).reshape(b, c * q, g, n)[:, :l]
    return dx, ddt, dA, dB, dC, dD, dS0


def _head_block_grads(M, L, X_h, dY_h):
    """Step 1's backward through explicit per-head blocks, Y_h = M X_h with M = CB o L:
    M, L (..., q, q), X_h, dY_h (..., q, p) -> (M^T dY_h (..., q, p), the decay gradient
    sum_s Q_is - sum_j Q_ji (..., q) with Q = dM o M, dM = dY_h X_h^T, and dM o L (..., q, q), each
    head's share of dCB). Consumes M and dM in place."""
    dX_h = M.transpose(-1, -2) @ dY_h
    dM = dY_h @ X_h.transpose(-1, -2)  # (..., q, q)
    Q = M.mul_(dM)  # dM o M, zero above the diagonal
    return dX_h, Q.sum(-1) - Q.sum(-2), dM.mul_(L)


# ---------------------------------------------------------------------------------------------------
# 5. CPU-only tricks (eager mode): factored decay mask, segments, in-place buffers, the conv's backward,
#    long no-grad model calls in pieces
# ---------------------------------------------------------------------------------------------------
# The factored decay mask: step 1 may split L[i, s] = exp(cs_i) exp(-cs_s), cs = a_cumsum from the
# chunk's start, which turns the per-head (q, q) blocks into one (q, q) @ (q, r*p) matmul per group
# (same flops). Exact wherever the factors stay in float32's range: output row i uses exp(-cs_s) for
# s <= i only, the largest being exp(-cs_i), so row i is computed this way when |cs_s| <= R nats for
# every s <= i (each term below e^60 ~ 1e26 at R = 60: no sum of them can overflow). That test depends
# on tokens up to i only, so outputs stay exactly causal. Rows past it (chunks that forget faster) are
# recomputed from per-head blocks built from differences of cumsums (minimamba.segsum's rule).
# On a GPU deciding whether any row needs the blocks would be a device sync, hence CPU only.


def _head_blocks(a_cumsum, CB, bad):
    """The per-head (q, q) blocks M = CB o L for the (chunk, head) pairs where `bad` (b, c, g, r) holds
    (the factored mask does not reach them). a_cumsum (b, c, g, r, q), CB (b, c, g, q, q) masked.
    Returns the pairs' index tensors (ib, ic, ig, ir), M (k, q, q) and L (k, q, q)."""
    ib, ic, ig, ir = bad.nonzero().unbind(1)
    a = a_cumsum[ib, ic, ig, ir]  # (k, q)
    L = (a[:, :, None] - a[:, None, :]).clamp_(max=0.0).exp_()  # (k, q, q); above the diagonal CB = 0
    return (ib, ic, ig, ir), L * CB[ib, ic, ig], L


def _diag_factored(a_cumsum, CB, X, R):
    """Y_diag of step 1 through the factored mask, rows beyond R nats from the blocks.
    a_cumsum (b, c, g, r, q), CB (b, c, g, q, q) masked, X (b, c, g, q, r, p) -> (b, c, g, q, r, p)."""
    b, c, g, q, r, p = X.shape
    up = torch.exp(a_cumsum.clamp(max=R)).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    down = torch.exp((-a_cumsum).clamp_(max=R)).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    Y_diag = (CB @ (X * down).view(b, c, g, q, r * p)).view(b, c, g, q, r, p).mul_(up)
    # rows whose factors left the range: |cs_s| > R for some s <= i (a running max)
    bad = torch.cummax(a_cumsum.abs(), dim=-1).values > R  # (b, c, g, r, q)
    pairs = bad.any(-1)  # (b, c, g, r): the (chunk, head) pairs with such rows
    if pairs.any():
        idx, M, _ = _head_blocks(a_cumsum, CB, pairs)
        Xh, Yh = X.permute(0, 1, 2, 4, 3, 5), Y_diag.permute(0, 1, 2, 4, 3, 5)  # (b, c, g, r, q, p) views
        Yh[idx] = torch.where(bad[idx][..., None], M @ Xh[idx], Yh[idx])
    return Y_diag


def _diag_factored_backward(a_cumsum, CB, X, dYc, dX, ds, R):
    """Step 1's backward with the factored mask L = diag(e^cs) 1 diag(e^-cs) for the (chunk, head) pairs
    whose |cs| stays within R over the chunk: with U = e^cs dY and V = e^-cs X per head, stacked as
    (q, r*p) per group,  dX += e^-cs (CB^T U),  dCB = U V^T,  and the rows and columns of Q = dM o M sum
    to  sum_s Q_is = dY_i . Y_diag_i  and  sum_i Q_is = X_s . (M^T dY)_s: no per-head (q, q) block. The
    other pairs get zero factors here and their blocks after. Adds to dX and ds in place; returns dCB."""
    b, c, g, q, r, p = X.shape
    bad = a_cumsum.abs().amax(-1) > R  # (b, c, g, r)
    ok = (~bad).to(X.dtype)[:, :, :, None, :, None]  # (b, c, g, 1, r, 1)
    up = torch.exp(a_cumsum.clamp(max=R)).transpose(3, 4)[..., None] * ok  # (b, c, g, q, r, 1)
    down = torch.exp((-a_cumsum).clamp_(max=R)).transpose(3, 4)[..., None] * ok
    U = (dYc * up).view(b, c, g, q, r * p)  # (b, c, g, q, r*p)
    V = (X * down).view(b, c, g, q, r * p)
    dX1 = (CB.transpose(-1, -2) @ U).view(b, c, g, q, r, p).mul_(down)  # M^T dY per head
    Y1 = (CB @ V).view(b, c, g, q, r, p).mul_(up)  # Y_diag
    ds += (Y1.mul_(dYc).sum(-1) - (X * dX1).sum(-1)).transpose(3, 4)
    dX += dX1
    dCB = U @ V.transpose(-1, -2)  # (b, c, g, q, q)
    if bad.any():  # the blocks of the other pairs
        idx, M, L = _head_blocks(a_cumsum, CB, bad)
        Xh, dYh = X.permute(0, 1, 2, 4, 3, 5)[idx], dYc.permute(0, 1, 2, 4, 3, 5)[idx]  # (k, q, p)
        dXh, dsh, dML = _head_block_grads(M, L, Xh, dYh)
        dX.permute(0, 1, 2, 4, 3, 5)[idx] += dXh
        ds[idx] += dsh
        dCB.index_put_(idx[:3], dML, accumulate=True)
    return dCB


# Segments: eager CPU runs of long inputs go through steps 1-4 in segments of whole chunks with the
# state carried from one to the next: the same sums, so the same result bit for bit, but every
# temporary is bounded by the segment instead of growing with l (small buffers stay in cache and get
# reused; fresh multi-megabyte ones cost page faults). The backward is segmented the same way.


def _segments(x, q, tricks):
    """[(start, end)] of whole-chunk segments of x's length (one segment without tricks)."""
    l = x.shape[1]
    if tricks is None:
        return [(0, l)]
    seg = max(1, tricks.segment // q) * q
    return [(s, min(s + seg, l)) for s in range(0, l, seg)]


def _piece(A, s, e):
    """The tokens s:e of a per-token A (b, l, h); A of shape (h,) is the same for every token."""
    return A if A.dim() == 1 else A[:, s:e]


def _forward_segmented(x, dt, A, B, C, D, S0, q, tricks, keep_entering=True):
    """_ssd_chunked_forward over _segments with the state carried, each segment writing into slices
    of preallocated outputs; same returns, except that the entering states are None unless
    keep_entering (only the backward needs them)."""
    segments = _segments(x, q, tricks)
    if len(segments) == 1:
        return _ssd_chunked_forward(x, dt, A, B, C, D, S0, q, tricks)
    b, l, h, p = x.shape
    c = -(-l // q)
    y = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device)
    entering = torch.empty(b, c, h, p, B.shape[-1], dtype=x.dtype, device=x.device) if keep_entering else None
    S = S0
    for s, e in segments:
        c0, c1 = s // q, -(-e // q)  # the segment's chunks
        _, S, _ = _ssd_chunked_forward(x[:, s:e], dt[:, s:e], _piece(A, s, e), B[:, s:e], C[:, s:e],
                                       D, S, q, tricks,
                                       y_out=y[:, c0 * q:c1 * q],
                                       entering_out=None if entering is None else entering[:, c0:c1])
    return y[:, :l], S, entering


def _backward_segmented(x, dt, A, B, C, D, S0, q, tricks, entering, dY, dfinal):
    """_ssd_chunked_backward over _segments, last to first, the state's gradient carried backwards;
    the gradients of A (h,) and D add up over segments. Same returns."""
    segments = _segments(x, q, tricks)
    if len(segments) == 1:
        return _ssd_chunked_backward(x, dt, A, B, C, D, S0, q, tricks, entering, dY, dfinal)
    parts, dS = [], dfinal
    for s, e in reversed(segments):
        c0, c1 = s // q, -(-e // q)
        *grads, dS = _ssd_chunked_backward(x[:, s:e], dt[:, s:e], _piece(A, s, e), B[:, s:e], C[:, s:e], D,
                                           entering[:, c0], q, tricks, entering[:, c0:c1], dY[:, s:e], dS)
        parts.append(grads)
    dx, ddt, dA, dB, dC, dD = (list(reversed(p)) for p in zip(*parts))
    dA = torch.cat(dA, dim=1) if A.dim() == 3 else torch.stack(dA).sum(0)
    dD = None if D is None else torch.stack(dD).sum(0)
    return torch.cat(dx, dim=1), torch.cat(ddt, dim=1), dA, torch.cat(dB, dim=1), torch.cat(dC, dim=1), dD, dS


def causal_conv_inplace(xBC, past, weight, bias):
    """minimamba.causal_conv_silu's conv without the silu and without concatenating [past | xBC]:
    k shifted multiply-adds accumulated in place into one buffer, the few outputs that read `past`
    done apart (a fresh tensor per tap, or the concatenation, costs one more pass over memory each).
    xBC (b, l, c), past (b, k-1, c), weight (k, c), bias (c,) or None -> pre-activation (b, l, c)."""
    k, l = weight.shape[0], xBC.shape[1]
    out = xBC * weight[k - 1]  # (b, l, c): the tap on token t itself
    for j in range(k - 1):
        s = k - 1 - j  # tap j reads the input s steps back: xBC_{t-s} for t >= s, past_{t+j} for t < s
        if s < l:
            out[:, s:].addcmul_(xBC[:, : l - s], weight[j])
        m = min(s, l)
        out[:, :m].addcmul_(past[:, j:j + m], weight[j])
    return out if bias is None else out.add_(bias)


def keep_freed_memory() -> bool:
    """An explicit, PROCESS-WIDE opt-in (accelerate() never calls it; the experiment scripts that want it call
    it once at start-up, and the benchmark's --keep_freed_memory gives it to every worker alike).
    Ask glibc's malloc to keep freed memory in the process instead of returning it to the OS:
    blocks up to 32 MiB come from the heap (M_MMAP_THRESHOLD, glibc's largest) and the heap is not
    trimmed (M_TRIM_THRESHOLD). Otherwise every fresh multi-megabyte temporary of a training step is
    mapped anew and page-faulted in on first touch, which costs more than the arithmetic on it (measured
    on the toy training step, T_train 64: 1600 page faults and ~29 ms per step without, 8 and ~21 ms with).
    Process-wide and idempotent; the peak memory is unchanged, freed memory stays resident.
    Returns False where there is no glibc (macOS, Windows, musl): nothing is changed there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


class CausalConvSilu(torch.autograd.Function):
    """silu(causal_conv_inplace(xBC, past, weight, bias)) with a hand-written backward: autograd
    through the in-place shifted adds would keep a zero-filled full-size gradient per shifted slice
    and copy it back. It keeps the inputs and pre. With pre = the conv, sigma = sigmoid(pre):
        dpre = dout * sigma * (1 + pre (1 - sigma))                          (silu')
        dxpad_m = sum_j weight_j dpre_{m-j}   (0 <= m-j < l)                  (the conv, transposed)
        dweight_j = sum_{b,t} dpre_t xpad_{t+j};   dbias = sum_{b,t} dpre_t
    Same signature as minimamba.causal_conv_silu (use CausalConvSilu.apply)."""

    @staticmethod
    def forward(ctx, xBC, past, weight, bias):
        pre = causal_conv_inplace(xBC, past, weight, bias)  # (b, l, c)
        if not any(ctx.needs_input_grad):  # no autograd: nothing to keep
            return F.silu(pre, inplace=True)
        ctx.save_for_backward(xBC, past, weight, bias, pre)
        return F.silu(pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        xBC, past, weight, bias, pre = ctx.saved_tensors
        k, l = weight.shape[0], xBC.shape[1]
        dpre = torch.ops.aten.silu_backward(dout, pre)  # dout * silu'(pre), one fused pass (b, l, c)
        dxBC = dpre * weight[k - 1]
        dpast = torch.zeros_like(past)  # (b, k-1, c)
        dweight = torch.empty_like(weight)  # (k, c)
        dweight[k - 1] = (dpre * xBC).sum((0, 1))
        for j in range(k - 1):
            s, m = k - 1 - j, min(k - 1 - j, l)
            dw = (dpre[:, :m] * past[:, j:j + m]).sum((0, 1))
            if s < l:
                dxBC[:, : l - s].addcmul_(dpre[:, s:], weight[j])
                dw += (dpre[:, s:] * xBC[:, : l - s]).sum((0, 1))
            dpast[:, j:j + m].addcmul_(dpre[:, :m], weight[j])
            dweight[j] = dw
        return dxBC, dpast, dweight, None if bias is None else dpre.sum((0, 1))


class ForwardInPieces:
    """model.forward as forward_in_pieces() installs it (an instance attribute; an object, not a
    closure, so that copy.deepcopy and pickle of the model give a copy that runs its own weights): a
    no-grad CPU call longer than `tokens` runs as pieces of whole chunks, the state carried from one to
    the next, each piece's logits written into one preallocated output. The same computation as one
    call (every layer is causal and carries its state exactly; the benchmark model's logits and states
    come out bit for bit the same), but every layer's temporaries are bounded by a piece instead of
    growing with l. Calls with autograd, on other devices or no longer than a piece go to
    Mamba2LM.forward as they are."""

    def __init__(self, model, tokens: int):
        q = model.config.chunk_size
        self.model, self.piece = model, max(1, tokens // q) * q

    def __call__(self, input_ids, state=None, return_state=True):
        model, piece, plain = self.model, self.piece, type(self.model).forward
        if (torch.is_grad_enabled() or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or input_ids.device.type != "cpu" or input_ids.shape[1] <= piece):
            return plain(model, input_ids, state, return_state)
        b, l = input_ids.shape
        out = None
        for s in range(0, l, piece):
            last = s + piece >= l
            logits, state = plain(model, input_ids[:, s:s + piece], state, return_state or not last)
            if out is None:
                out = logits.new_empty(b, l, logits.shape[-1])
            out[:, s:s + piece] = logits
        return out, state


def forward_in_pieces(model, tokens: int = 1024):
    """An explicit opt-in: no-grad CPU calls of `model` longer than `tokens` run as pieces of whole chunks
    with the state carried (ForwardInPieces, installed as the instance attribute model.forward; restore()
    or forward_in_pieces(model, None) removes it). Same logits and states; the peak memory is bounded by a
    piece (d 256, 4 layers, l 16384, 1 thread: 1113 ms in one piece, 778 ms in pieces of 1024). Returns model.
    """
    _mixers(model)  # type check
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"forward_in_pieces: tokens must be a positive int or None, got {tokens!r}")
    model.__dict__.pop("forward", None)
    if tokens is not None:
        model.forward = ForwardInPieces(model, tokens)
    return model


# ---------------------------------------------------------------------------------------------------
# 6. Installing: accelerate(model), restore(model)
# ---------------------------------------------------------------------------------------------------


class FastScan:
    """A mixer's scan (minimamba.DefaultScan's two methods) backed by this file:
    chunked -> ssd_quadratic for one chunk from a zero state whose final state nobody reads (plain
               training), else ssd_chunked (eager; compiled when `compiled`);
    step    -> minimamba.ssd_step (one token is already O(1))."""

    def __init__(self, compiled: bool = False, cpu_tricks: CpuTricks | None = CpuTricks()):
        self.compiled, self.cpu_tricks = compiled, cpu_tricks

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        if state is None and not return_state and x.shape[1] <= chunk_size:
            factored = (self.cpu_tricks.factored_range
                        if (self.cpu_tricks and x.device.type == "cpu") else None)
            return ssd_quadratic(x, dt, A, B, C, D=D, factored_range=factored), None
        if self.compiled:
            return ssd_chunked_compiled(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state,
                                        return_final_state=return_state)
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state,
                           return_final_state=return_state, cpu_tricks=self.cpu_tricks)

    def step(self, x, dt, A, B, C, D, state):
        return minimamba.ssd_step(x, dt, A, B, C, D=D, state=state)


def accelerate(model, *, compiled: bool | None = None, cpu_tricks: CpuTricks | None = CpuTricks()):
    """Install this file's fast paths into every layer of a minimamba.Mamba2LM; returns the model.

    mixer.scan <- FastScan(compiled, cpu_tricks); mixer.conv <- CausalConvSilu.apply; nothing else (no
    process-wide setting, model.forward untouched: see forward_in_pieces and keep_freed_memory).
    compiled: True, False or None, use ssd_chunked_compiled (None: when the model's parameters are on CUDA;
    compiling on a CPU costs minutes and ran no faster there). cpu_tricks: a CpuTricks or None (eager CPU
    calls then run ssd_chunked's plain path). Call it before entering any mitigation (they wrap the scan);
    calling it twice re-installs. restore(model) puts minimamba's own code back.
    """
    mixers = _mixers(model)
    if compiled is not None and not isinstance(compiled, bool):
        raise TypeError(f"accelerate: compiled must be True, False or None, got {compiled!r} "
                        f"({type(compiled).__name__})")
    if cpu_tricks is not None and not isinstance(cpu_tricks, CpuTricks):
        raise TypeError(f"accelerate: cpu_tricks must be a kernels.CpuTricks or None, got {cpu_tricks!r} "
                        f"({type(cpu_tricks).__name__})")
    if compiled is None:
        compiled = next(model.parameters()).device.type == "cuda"
    for m in mixers:
        if not isinstance(m.scan, (minimamba.DefaultScan, FastScan)):
            raise RuntimeError(f"layer {m.layer_idx} runs {type(m.scan).__name__}, not the model's own scan: "
                               "call kernels.accelerate(model) before entering a mitigation, not inside one")
    for m in mixers:
        m.scan, m.conv = FastScan(compiled, cpu_tricks), CausalConvSilu.apply
    return model


def restore(model):
    """Undo accelerate() and forward_in_pieces(): every layer gets minimamba's DefaultScan and
    causal_conv_silu back, and model.forward is Mamba2LM.forward again."""
    for m in _mixers(model):
        if not isinstance(m.scan, (minimamba.DefaultScan, FastScan)):
            raise RuntimeError(f"layer {m.layer_idx} runs {type(m.scan).__name__}: exit the mitigation first")
        m.scan, m.conv = minimamba.DefaultScan(), minimamba.causal_conv_silu
    model.__dict__.pop("forward", None)  # Mamba2LM.forward again
    return model


def is_accelerated(model) -> bool:
    return all(isinstance(m.scan, FastScan) for m in _mixers(model))


def _mixers(model) -> list:
    if not isinstance(model, minimamba.Mamba2LM):
        raise TypeError(f"kernels.accelerate needs a minimamba.Mamba2LM, got {type(model).__name__}")
    return [block.mixer for block in model.backbone.layers]
