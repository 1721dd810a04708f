"""kernels: the fast and the reference SSM scans behind minimamba.

Same signatures and shapes as minimamba.ssd (see its glossary: b, l, h, p, g, n, q, c):
    ssd_sequential   the plain recurrence, one token at a time: the oracle every other path is
                     tested against (slow; O(l) Python steps).
    ssd_chunked      the chunked SSD [SSD, arXiv 2405.21060, Listing 1] restructured for speed:
                     every heavy term is a batched matmul, C B^T is computed once per group (not per
                     head), the chunk-to-chunk pass is linear in the number of chunks, x keeps its
                     own memory layout (no transposed copies for steps 2 and 4), inference builds its
                     big temporaries in place, training uses a hand-written backward that recomputes
                     the intermediates instead of keeping them, and the whole function compiles with
                     torch.compile(fullgraph=True) without recompiling for every new length.
    ssd_chunked_compiled   torch.compile(ssd_chunked, fullgraph=True, dynamic=True), built on first use.

Speed on CPU (experiments/bench.py measures it; README "Performance"): apart from the matmuls, the
scan is bound by memory traffic, and a fresh multi-megabyte tensor costs page faults on first touch
(several times a pass over memory that is already mapped). Hence: few temporaries, in place where
autograd allows (no autograd, or tensors autograd does not keep), one fused multiply-add per chunk
in the chunk-to-chunk loop, long inputs in segments of SCAN_SEGMENT tokens (bounded temporaries that
get reused), and, where the decays allow it, step 1 without per-head (q, q) blocks
(FACTORED_DECAY_RANGE). Compiling does not pay off on CPU (minutes of compile time, no speed-up
measured at l = 4096); it is for GPUs.

Reading order: ssd_sequential (what is computed), then ssd_chunked (how it is computed fast):
_chunk_layout, _ssd_chunked_forward (steps 1-4; _diag_factored), _ssd_chunked_backward (the same
steps, reversed), the segmented drivers, _SSDChunked (the autograd glue), ssd_chunked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minimamba import _compute_dtype, check_scan_inputs

# ---------------------------------------------------------------------------------------------------
# The oracle: the recurrence itself
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


def ssd_sequential_chunked(x, dt, A, B, C, *, chunk_size=None, D=None, initial_state=None):
    """ssd_sequential with the chunked signature (chunk_size is accepted and has no effect)."""
    return ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_state)


# ---------------------------------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------------------------------


def _pass_states_loop(states, decay, S0, out=None):
    """Step 3 as a loop over chunks (cheapest in eager mode: one pass over the states).

    S_in[0] = S0;  S_in[c+1] = decay_c * S_in[c] + states_c.
    states (b, c, h, p, n), decay (b, c, h) = exp(sum of a over each chunk), S0 (b, h, p, n)
    -> (states entering each chunk (b, c, h, p, n), final state (b, h, p, n)).
    out: an optional (b, c, h, p, n) buffer for the entering states (no autograd only).

    Without autograd every step is one fused multiply-add written in place into a preallocated
    buffer: on CPU a fresh multi-megabyte tensor per chunk costs more in page faults than the
    arithmetic. With autograd the steps must stay out of place (autograd keeps each S_in[c]).
    """
    b, c = states.shape[:2]
    d = decay[..., None, None]  # (b, c, h, 1, 1)
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
    ceil(log2 c) rounds of O(c) work: O(c log c), no c x c matrix, and no Python loop whose length
    is the number of chunks (such a loop would make the compiler specialize on every length; here
    it only sees comparisons d < c, so one graph serves every c between two powers of two).
    Shapes as _pass_states_loop. The decays multiply (no log-space sum): each factor is in (0, 1],
    so products underflow gracefully to 0 and never overflow.
    """
    b, c = states.shape[:2]
    # fold the initial state into chunk 0: S_end[0] = alpha_0 S0 + s_0
    first = decay[:, :1, :, None, None] * S0[:, None] + states[:, :1]
    s = torch.cat([first, states[:, 1:]], dim=1)  # (b, c, h, p, n)
    alpha = decay  # (b, c, h)
    d = 1
    while d < c:
        s = s + alpha[..., None, None] * F.pad(s, (0, 0, 0, 0, 0, 0, d, 0))[:, :c]
        alpha = alpha * F.pad(alpha, (0, 0, d, 0), value=1.0)[:, :c]
        d *= 2
    entering = torch.cat([S0[:, None], s[:, :-1]], dim=1)  # state before chunk c = after chunk c-1
    return entering, s[:, -1]


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
    # Compiled, the pad is always applied (a Python `if pad` would be one more guard). Known limit:
    # padding (F.pad, or a cat) by a symbolic amount still guards on "l % q == 0", so lengths that
    # are a multiple of q compile one extra graph per power-of-two bucket.
    if torch.compiler.is_compiling() or pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    # Discretize: X = x * dt (what gets written), a = dt * A (log of the decay alpha).
    a = dt * (A if A.dim() == 1 else F.pad(A, (0, 0, 0, pad)))  # (b, c*q, h)
    X = (x * dt[..., None]).reshape(b, c, q, g, r, p).transpose(2, 3)  # (b, c, g, q, r, p) a view
    a = a.reshape(b, c, q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    Bc = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cc = C.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    return X, torch.cumsum(a, dim=-1), Bc, Cc, x, dt


# Step 1 may split the decay mask as L[i, s] = exp(cs_i) exp(-cs_s), cs = a_cumsum from the chunk's
# start, which turns the per-head (q, q) blocks into one (q, q) @ (q, r*p) matmul per group (same
# flops). Exact wherever the factors stay in float32's range: output row i uses exp(-cs_s) for s <= i
# only, the largest being exp(-cs_i), so row i is computed this way when |cs_s| <= this many nats for
# every s <= i (then each term is below e^60 ~ 1e26 and no sum of them can overflow). That test depends
# on tokens up to i only, so outputs stay exactly causal. Rows past it (chunks that forget faster) are
# recomputed from the per-head blocks built from differences of cumsums (minimamba.segsum's rule).
# Eager CPU only (deciding whether any row needs the blocks is a device sync on a GPU). The backward
# (CPU) decides per (chunk, head): the factored mask where |cs| stays in range over the chunk, the
# blocks for the other pairs.
FACTORED_DECAY_RANGE = 60.0


def _can_factor_decay(a_cumsum, grad):
    """Whether step 1 may use the factored decay mask (see FACTORED_DECAY_RANGE) at all."""
    return not grad and not torch.compiler.is_compiling() and a_cumsum.device.type == "cpu"


def _factor_in_backward(x):
    """Whether the backward of step 1 uses the factored mask where it can (CPU: choosing the pairs that
    need blocks is a device sync on a GPU); otherwise every head goes through its (q, q) block."""
    return x.device.type == "cpu"


def _head_blocks(a_cumsum, CB, bad):
    """The per-head (q, q) blocks M = CB o L for the (chunk, head) pairs where `bad` (b, c, g, r) holds
    (the factored mask does not reach them). a_cumsum (b, c, g, r, q), CB (b, c, g, q, q) masked.
    Returns the pairs' index tensors (ib, ic, ig, ir), M (k, q, q) and L (k, q, q)."""
    ib, ic, ig, ir = bad.nonzero().unbind(1)
    a = a_cumsum[ib, ic, ig, ir]  # (k, q)
    L = (a[:, :, None] - a[:, None, :]).clamp_(max=0.0).exp_()  # (k, q, q); above the diagonal CB = 0
    return (ib, ic, ig, ir), L * CB[ib, ic, ig], L


def _diag_factored(a_cumsum, CB, X):
    """Y_diag of step 1 through the factored mask, rows beyond FACTORED_DECAY_RANGE from the blocks.
    a_cumsum (b, c, g, r, q), CB (b, c, g, q, q) masked, X (b, c, g, q, r, p) -> (b, c, g, q, r, p)."""
    b, c, g, q, r, p = X.shape
    log_down = (-a_cumsum).clamp_(max=FACTORED_DECAY_RANGE)  # (b, c, g, r, q): finite factors only
    up = torch.exp(a_cumsum.clamp(max=FACTORED_DECAY_RANGE)).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    down = torch.exp(log_down).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    Y_diag = (CB @ (X * down).view(b, c, g, q, r * p)).view(b, c, g, q, r, p).mul_(up)
    # rows whose factors left the range: |cs_s| > FACTORED_DECAY_RANGE for some s <= i (a running max)
    bad = torch.cummax(a_cumsum.abs(), dim=-1).values > FACTORED_DECAY_RANGE  # (b, c, g, r, q)
    pairs = bad.any(-1)  # (b, c, g, r): the (chunk, head) pairs with such rows
    if pairs.any():
        idx, M, _ = _head_blocks(a_cumsum, CB, pairs)
        Xh, Yh = X.permute(0, 1, 2, 4, 3, 5), Y_diag.permute(0, 1, 2, 4, 3, 5)  # (b, c, g, r, q, p) views
        blocks = M @ Xh[idx]  # (k, q, p)
        Yh[idx] = torch.where(bad[idx][..., None], blocks, Yh[idx])
    return Y_diag


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


def _ssd_chunked_forward(x, dt, A, B, C, D, S0, q, y_out=None, entering_out=None):
    """Steps 1-4 of ssd_chunked on float inputs in the compute dtype; S0 (b, h, p, n) (zeros if none).
    Returns y (b, l, h, p), the final state (b, h, p, n) and the states entering each chunk
    (b, c, h, p, n), which the hand-written backward keeps instead of every intermediate.
    Without autograd, y_out (b, c*q, h, p) and entering_out (b, c, h, p, n) may be given: buffers
    (slices of the caller's output) that receive the results, so segments need no concatenation."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, S0))
    X, a_cumsum, Bc, Cc, xf, _ = _chunk_layout(x, dt, A, B, C, q, g)
    c = X.shape[1]

    # Step 1: Y_diag = (C B^T o L) X. C B^T once per group (masked to the causal triangle), the
    # decay mask L per head.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()  # (q, q) i >= s
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    if _can_factor_decay(a_cumsum, grad):
        # L[i, s] = exp(cs_i) exp(-cs_s): Y_diag = diag(e^cs) (C B^T) diag(e^-cs) X, see FACTORED_DECAY_RANGE
        Y_diag = _diag_factored(a_cumsum, CB, X)  # (b, c, g, q, r, p)
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
    pass_states = _pass_states_doubling if torch.compiler.is_compiling() else _pass_states_loop
    entering, final = (pass_states(states, chunk_decay, S0) if entering_out is None else
                       _pass_states_loop(states, chunk_decay, S0, out=entering_out))  # (b, c, h, p, n), (b, h, p, n)

    # Step 4: Y_off = exp(a_cumsum) * (C S_in^T), one (q, n) @ (n, r*p) matmul per group, which
    # lands in x's own (q, r, p) layout; then Y = Y_diag + Y_off (+ D x).
    S_in = entering.view(b, c, g, r * p, n).transpose(-1, -2)  # (b, c, g, n, r*p)
    Y_off = (Cc @ S_in).view(b, c, g, q, r, p)  # (b, c, g, q, r, p)
    exp_cs = torch.exp(a_cumsum).transpose(3, 4)[..., None]  # (b, c, g, q, r, 1)
    if grad or torch.compiler.is_compiling():
        Y = (Y_off * exp_cs).add_(Y_diag).transpose(2, 3).reshape(b, c * q, h, p)  # (b, c*q, h, p)
    else:  # one fused pass that writes straight into the output, in its (b, c*q, h, p) layout
        Y = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device) if y_out is None else y_out
        torch.addcmul(Y_diag, Y_off, exp_cs, out=Y.view(b, c, q, g, r, p).transpose(2, 3))
    if D is not None:
        Y = Y.addcmul_(xf, D[:, None])
    return Y[:, :l], final, entering


def _ssd_chunked_backward(x, dt, A, B, C, D, S0, q, entering, dY, dfinal):
    """Gradients of _ssd_chunked_forward with respect to x, dt, A, B, C, D, S0, by hand: each step's
    intermediates are recomputed from the inputs (cheap, matmul-shaped) instead of kept.

    With s = a_cumsum inside a chunk, w_j = exp(s_last - s_j), E_i = exp(s_i), per head:
        step 4  Y_off = diag(E) Z, Z = C S_in^T dZ = diag(E) dY:  dC += dZ S_in,  dS_in += dZ^T C,
                                                ds_i += sum_p dZ_ip Z_ip
        step 3  S_in[c+1] = e^{s_last} S_in[c] + states_c, run backwards from dfinal:
                G_c = e^{s_last,c} G_{c+1} + dS_in[c] (G_c = gradient of S_in[c]), dstates_c = G_{c+1},
                ds_last += e^{s_last} <G_{c+1}, S_in[c]>;  dS0 = G_0
        step 2  states = (X o w)^T B            d(Xw) = B dstates^T:  dX += d(Xw) o w,  dB += (X o w) dstates,
                                                P_j = w_j sum_p d(Xw)_jp X_jp:  ds_last += sum_j P_j,  ds_j -= P_j
        step 1  Y_diag = (CB o L) X             dX += M^T dY,  dM = dY X^T,  dCB = sum over heads (dM o L),
                                                dC += dCB B,  dB += dCB^T C,  Q = dM o M:  ds_i += sum_s Q_is - sum_j Q_ji
    Then a = cumsum^-1(s): da_j = sum_{i >= j} ds_i (a reversed cumsum), and the discretization
    X = x dt, a = dt A gives dx = dX dt + D dY, ddt = <dX, x> + da A, dA = da dt, dD = <dY, x>.
    Shapes: inputs as _ssd_chunked_forward; entering (b, c, h, p, n); dY (b, l, h, p); dfinal (b, h, p, n).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    X, a_cumsum, Bc, Cc, xf, dtf = _chunk_layout(x, dt, A, B, C, q, g)
    c = X.shape[1]
    dYp = F.pad(dY, (0, 0, 0, 0, 0, c * q - l))  # (b, c*q, h, p)
    dYc = dYp.view(b, c, q, g, r, p).transpose(2, 3)  # (b, c, g, q, r, p)
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
    dot = (dstates * entering).sum((-1, -2)).view(b, c, g, r)  # (a batched (1, pn) @ (pn, 1) matmul is slower)
    ds[..., -1] += dot * chunk_decay.view(b, c, g, r)

    # step 2: states = (X o w)^T B
    w = torch.exp(a_cumsum[..., -1:] - a_cumsum).transpose(3, 4)  # (b, c, g, q, r)
    dstates_g = dstates.view(b, c, g, r * p, n)  # (b, c, g, r*p, n)
    dXw = (Bc @ dstates_g.transpose(-1, -2)).view(b, c, g, q, r, p)  # (b, c, g, q, r, p)
    Xw = (X * w[..., None]).view(b, c, g, q, r * p)  # (b, c, g, q, r*p)
    dB = Xw @ dstates_g  # (b, c, g, q, n)
    P = (dXw * X).sum(-1).mul_(w).transpose(3, 4)  # (b, c, g, r, q)
    ds -= P
    ds[..., -1] += P.sum(-1)
    dX = dXw.mul_(w[..., None])  # (b, c, g, q, r, p)

    # step 1: Y_diag = (CB o L) X, per head
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (b, c, g, q, q)
    if _factor_in_backward(x):
        # the factored mask L = diag(e^cs) 1 diag(e^-cs) (see FACTORED_DECAY_RANGE) for the heads whose
        # |cs| stays in range over the chunk: with U = e^cs dY and V = e^-cs X per head, stacked as
        # (q, r*p) per group,  dX += e^-cs (CB^T U),  dCB = U V^T,  and the rows and columns of
        # Q = dM o M sum to  sum_s Q_is = dY_i . Y_diag_i  and  sum_i Q_is = X_s . (M^T dY)_s:
        # no per-head (q, q) block. The other (chunk, head) pairs get zero factors here and the blocks below.
        R = FACTORED_DECAY_RANGE
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
        if bad.any():  # the blocks of the other pairs, as in the general case below
            idx, M, L = _head_blocks(a_cumsum, CB, bad)
            Xh, dYh = X.permute(0, 1, 2, 4, 3, 5)[idx], dYc.permute(0, 1, 2, 4, 3, 5)[idx]  # (k, q, p)
            dXh, dsh, dML = _head_block_grads(M, L, Xh, dYh)
            dX.permute(0, 1, 2, 4, 3, 5)[idx] += dXh
            ds[idx] += dsh
            dCB.index_put_(idx[:3], dML, accumulate=True)
    else:  # every head through its (q, q) block
        seg = a_cumsum[..., :, None] - a_cumsum[..., None, :]  # (b, c, g, r, q, q)
        L = seg.clamp_(max=0.0).exp_()  # (b, c, g, r, q, q); above the diagonal M = CB o L = 0 anyway
        M = L * CB[:, :, :, None]  # (b, c, g, r, q, q)
        dXh, dsh, dML = _head_block_grads(M, L, X.transpose(3, 4), dYc.transpose(3, 4))
        dX += dXh.transpose(3, 4)
        ds += dsh
        dCB = dML.sum(3)  # (b, c, g, q, q): the heads of a group share C B^T
    dCB.masked_fill_(~causal, 0.0)
    dC += dCB @ Bc
    dB += dCB.transpose(-1, -2) @ Cc
    return _discretization_grads(x, dt, A, B, C, D, q, ds, dX, dB, dC, dY, dS0, xf, dtf)


def _head_block_grads(M, L, X_h, dY_h):
    """Step 1's backward through explicit per-head blocks, Y_h = M X_h with M = CB o L:
    M, L (..., q, q), X_h, dY_h (..., q, p) -> (M^T dY_h (..., q, p), the decay gradient
    sum_s Q_is - sum_j Q_ji (..., q) with Q = dM o M, dM = dY_h X_h^T, and dM o L (..., q, q), each
    head's share of dCB). Consumes M and dM in place."""
    dX_h = M.transpose(-1, -2) @ dY_h
    dM = dY_h @ X_h.transpose(-1, -2)  # (..., q, q)
    Q = M.mul_(dM)  # dM o M, zero above the diagonal
    return dX_h, Q.sum(-1) - Q.sum(-2), dM.mul_(L)


def _discretization_grads(x, dt, A, B, C, D, q, ds, dX, dB, dC, dY, dS0, xf, dtf):
    """The end of _ssd_chunked_backward: from the gradients of the chunk-layout quantities (s = a_cumsum,
    X = x dt, B, C) to those of the inputs."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    c = ds.shape[1]
    # discretization: a = dt A, X = x dt; s = cumsum(a) inside each chunk
    da = ds.flip(-1).cumsum(-1).flip(-1).permute(0, 1, 4, 2, 3).reshape(b, c * q, h)[:, :l]  # (b, l, h)
    dX = dX.transpose(2, 3).reshape(b, c * q, h, p)[:, :l]  # (b, l, h, p)
    x0, dt0 = xf[:, :l], dtf[:, :l]
    dx = dX * dt0[..., None]
    if D is not None:
        dx = dx.addcmul_(dY, D[:, None])
    ddt = (dX * x0).sum(-1)  # (b, l, h)
    ddt = ddt.addcmul_(da, A)
    dA = da * dt0 if A.dim() == 3 else (da * dt0).sum((0, 1))
    dD = None if D is None else (dY * x0).sum((0, 1, 3))
    dB = dB.transpose(2, 3).reshape(b, c * q, g, n)[:, :l]
    dC = dC.transpose(2, 3).reshape(b, c * q, g, n)[:, :l]
    return dx, ddt, dA, dB, dC, dD, dS0


# Eager CPU runs of long inputs go through steps 1-4 in segments of this many tokens (rounded down to
# whole chunks, at least one), the state carried from one to the next: the same sums, so the same
# result bit for bit, but every temporary is bounded by the segment instead of growing with l. On
# CPU a fresh multi-megabyte temporary costs page faults on first touch, and small ones stay in
# cache and get reused; measured at h 24, p 64, n 128, q 128, l 4096 (1 thread): segments of
# 256 / 512 / 1024 / 4096 tokens took 112 / 90 / 139 / 173 ms. The backward is segmented the same way.
SCAN_SEGMENT = 512


def _segments(x, q):
    """[(start, end)] of the segments of x's length (whole chunks of q); one segment if x is not on
    the CPU (a GPU wants all the parallel work at once) or under torch.compile."""
    l = x.shape[1]
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return [(0, l)]
    seg = max(1, SCAN_SEGMENT // q) * q
    return [(s, min(s + seg, l)) for s in range(0, l, seg)]


def _piece(t, s, e, A_per_head=False):
    """The tokens s:e of a (b, l, ...) input; A of shape (h,) is the same for every token."""
    return t if (t is None or A_per_head and t.dim() == 1) else t[:, s:e]


def _ssd_chunked_forward_segmented(x, dt, A, B, C, D, S0, q, keep_entering=True):
    """_ssd_chunked_forward over _segments with the state carried; same returns, except that the
    entering states are None unless keep_entering (only the backward needs them)."""
    segments = _segments(x, q)
    if len(segments) == 1:
        return _ssd_chunked_forward(x, dt, A, B, C, D, S0, q)
    b, l, h, p = x.shape
    c = -(-l // q)
    y = torch.empty(b, c * q, h, p, dtype=x.dtype, device=x.device)  # each segment writes its slice
    entering = torch.empty(b, c, h, p, B.shape[-1], dtype=x.dtype, device=x.device) if keep_entering else None
    S = S0
    for s, e in segments:
        c0, c1 = s // q, -(-e // q)  # the segment's chunks
        _, S, _ = _ssd_chunked_forward(x[:, s:e], dt[:, s:e], _piece(A, s, e, True), B[:, s:e], C[:, s:e], D, S, q,
                                       y_out=y[:, c0 * q:c1 * q],
                                       entering_out=None if entering is None else entering[:, c0:c1])
    return y[:, :l], S, entering


def _ssd_chunked_backward_segmented(x, dt, A, B, C, D, S0, q, entering, dY, dfinal):
    """_ssd_chunked_backward over _segments, last to first, the state's gradient carried backwards;
    the gradients of A (h,) and D add up over segments. Same returns."""
    segments = _segments(x, q)
    if len(segments) == 1:
        return _ssd_chunked_backward(x, dt, A, B, C, D, S0, q, entering, dY, dfinal)
    parts, dS = [], dfinal
    for s, e in reversed(segments):
        c0, c1 = s // q, -(-e // q)  # the segment's chunks
        *grads, dS = _ssd_chunked_backward(x[:, s:e], dt[:, s:e], _piece(A, s, e, True), B[:, s:e], C[:, s:e], D,
                                           entering[:, c0], q, entering[:, c0:c1], dY[:, s:e], dS)
        parts.append(grads)
    dx, ddt, dA, dB, dC, dD = (list(reversed(p)) for p in zip(*parts))
    dA = torch.cat(dA, dim=1) if A.dim() == 3 else torch.stack(dA).sum(0)
    dD = None if D is None else torch.stack(dD).sum(0)
    return (torch.cat(dx, dim=1), torch.cat(ddt, dim=1), dA, torch.cat(dB, dim=1), torch.cat(dC, dim=1), dD, dS)


class _SSDChunked(torch.autograd.Function):
    """ssd_chunked with a hand-written backward (_ssd_chunked_backward). Autograd through the forward
    would keep every per-head (q, q) block and temporary of steps 1-4, and its chunk loop costs
    O(c^2) in the backward (each of the c slices of the states gets a full-size zero gradient); this
    keeps only the inputs and the states entering each chunk (one (h, p, n) state per chunk)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, q):
        y, final, entering = _ssd_chunked_forward_segmented(x, dt, A, B, C, D, S0, q)
        ctx.q = q
        ctx.save_for_backward(x, dt, A, B, C, D, S0, entering)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY, dfinal):
        x, dt, A, B, C, D, S0, entering = ctx.saved_tensors
        grads = _ssd_chunked_backward_segmented(x, dt, A, B, C, D, S0, ctx.q, entering, dY, dfinal)
        return (*(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad)), None)


def ssd_chunked(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """The chunked SSD scan in four matmul-shaped steps (same result as minimamba.ssd).

    Layout: heads are split as h = g * r (r = h / g heads per group), so every term that depends
    only on B or C is computed once per group, and heads of a group are batched into one matmul.
    x keeps its natural (q, r*p) layout per chunk and group, so steps 2 and 4 are single
    (r*p, q) @ (q, n) and (q, n) @ (n, r*p) matmuls with no copies.
    Without autograd (inference) the big per-head (q, q) decay blocks are built in place, or not at
    all where the factored mask applies (FACTORED_DECAY_RANGE): on CPU every fresh multi-megabyte
    temporary costs page faults, so fewer temporaries is most of the speed; long inputs run in
    SCAN_SEGMENT-token segments. With autograd (eager), a hand-written backward (_SSDChunked)
    recomputes the intermediates instead of keeping them; compiled, autograd runs through the forward.
    Args/Returns: as minimamba.ssd.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    S0 = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    args = [x.to(ct), dt.to(ct), A.to(ct), B.to(ct), C.to(ct), None if D is None else D.to(ct), S0]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    if grad and not torch.compiler.is_compiling():
        y, final = _SSDChunked.apply(*args, chunk_size)
    else:
        y, final, _ = _ssd_chunked_forward_segmented(*args, chunk_size, keep_entering=False)
    return y.to(x.dtype), final


_compiled = None


def ssd_chunked_compiled(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """torch.compile(ssd_chunked, fullgraph=True, dynamic=True), compiled on the first call.

    dynamic=True makes the length symbolic, so new lengths reuse the graph (a new graph only when
    the number of chunks crosses a power of two, from the doubling scan's comparisons).
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(ssd_chunked, fullgraph=True, dynamic=True)
    return _compiled(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state)
