"""kernels: the fast and the reference SSM scans behind minimamba.

Same signatures and shapes as minimamba.ssd (see its glossary: b, l, h, p, g, n, q, c):
    ssd_sequential   the plain recurrence, one token at a time: the oracle every other path is
                     tested against (slow; O(l) Python steps).
    ssd_chunked      the chunked SSD [SSD, arXiv 2405.21060, Listing 1] restructured for speed:
                     every heavy term is a batched matmul, C B^T is computed once per group (not per
                     head), the chunk-to-chunk pass is linear in the number of chunks, and the whole
                     function compiles with torch.compile(fullgraph=True) without recompiling for
                     every new length.
    ssd_chunked_compiled   torch.compile(ssd_chunked, fullgraph=True, dynamic=True), built on first use.

Reading order: ssd_sequential (what is computed), then ssd_chunked (how it is computed fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimamba import _compute_dtype, check_scan_inputs, segsum

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


def _pass_states_loop(states, log_decay, S0):
    """Step 3 as a loop over chunks (cheapest in eager mode: one pass over the states).
    states (b, c, h, p, n), log_decay (b, c, h), S0 (b, h, p, n) -> (states entering each chunk, final)."""
    S, entering = S0, []
    for i in range(states.shape[1]):
        entering.append(S)
        S = torch.exp(log_decay[:, i])[..., None, None] * S + states[:, i]
    return torch.stack(entering, dim=1), S


def _pass_states_doubling(states, log_decay, S0):
    """Step 3 as a parallel prefix scan (Hillis-Steele doubling) over chunks, for torch.compile.

    Elements (a_c, s_c) combine as (a1, s1) then (a2, s2) -> (a1 + a2, exp(a2) s1 + s2). After the
    round with shift d, position c holds the combination of chunks c-2d+1 .. c. ceil(log2 c) rounds
    of O(c) work: O(c log c), no c x c matrix, and no Python loop whose length is the number of
    chunks (such a loop would make the compiler specialize on every length; here it only sees
    comparisons d < c, so one graph serves every c between two powers of two).
    """
    b, c = states.shape[:2]
    # fold the initial state into chunk 0: S_end[0] = exp(a_0) S0 + s_0
    first = torch.exp(log_decay[:, :1])[..., None, None] * S0[:, None] + states[:, :1]
    s = torch.cat([first, states[:, 1:]], dim=1)  # (b, c, h, p, n)
    a = log_decay  # (b, c, h)
    d = 1
    while d < c:
        s = s + torch.exp(a)[..., None, None] * F.pad(s, (0, 0, 0, 0, 0, 0, d, 0))[:, :c]
        a = a + F.pad(a, (0, 0, d, 0))[:, :c]
        d *= 2
    entering = torch.cat([S0[:, None], s[:, :-1]], dim=1)  # state before chunk c = after chunk c-1
    return entering, s[:, -1]


def ssd_chunked(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """The chunked SSD scan in four matmul-shaped steps (same result as minimamba.ssd).

    Layout: heads are split as h = g * r (r = h / g heads per group), so every term that depends
    only on B or C is computed once per group, and heads of a group are batched into one matmul.
    Args/Returns: as minimamba.ssd.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    q, r = chunk_size, h // g
    pad = (-l) % q  # zero-dt padding: padded steps neither decay nor write
    c = (l + pad) // q
    dtf = dt.to(ct)
    a = dtf * A.to(ct)  # (b, l, h)   log decay per token
    X = x.to(ct) * dtf[..., None]  # (b, l, h, p)
    a = F.pad(a, (0, 0, 0, pad)).reshape(b, c, q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    X = F.pad(X, (0, 0, 0, 0, 0, pad)).reshape(b, c, q, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, q, p)
    Bc = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad)).reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cc = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad)).reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b, c, g, r, q)

    # Step 1: Y_diag = (C B^T o L) X. C B^T once per group, the decay mask L per head.
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, g, q, q)
    L = torch.exp(segsum(a))  # (b, c, g, r, q, q)
    Y = (CB[:, :, :, None] * L) @ X  # (b, c, g, r, q, p)

    # Step 2: chunk states S_c = sum_s exp(a_cumsum[last] - a_cumsum[s]) X_s B_s^T, the r heads of a
    # group stacked into one (r*p, q) @ (q, n) matmul.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, c, g, r, q)
    Xd = (X * decay_to_end[..., None]).permute(0, 1, 2, 3, 5, 4).reshape(b, c, g, r * p, q)
    states = (Xd @ Bc).reshape(b, c, h, p, n)  # (b, c, h, p, n)

    # Step 3: pass states between chunks, linear in c.
    S0 = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    chunk_log_decay = a_cumsum[..., -1].reshape(b, c, h)  # (b, c, h)
    pass_states = _pass_states_doubling if torch.compiler.is_compiling() else _pass_states_loop
    entering, final = pass_states(states, chunk_log_decay, S0)  # (b, c, h, p, n), (b, h, p, n)

    # Step 4: Y_off = exp(a_cumsum) * (C S_in^T), one (q, n) @ (n, r*p) matmul per group.
    S_in = entering.reshape(b, c, g, r * p, n).transpose(-1, -2)  # (b, c, g, n, r*p)
    Y_off = (Cc @ S_in).reshape(b, c, g, q, r, p).transpose(3, 4)  # (b, c, g, r, q, p)
    Y = Y + torch.exp(a_cumsum)[..., None] * Y_off

    y = Y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :l]  # (b, l, h, p)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
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
