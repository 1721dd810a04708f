"""minimamba: Mamba-2 in one file of pure PyTorch.

A language model built from Mamba-2 mixer layers that loads the official checkpoints
(state-spaces/mamba2-* and Hugging Face Mamba2ForCausalLM layouts) and reproduces their logits.
Copy this file alone and it works: it imports only torch and the standard library (kernels.py, if
it is importable next to it, adds a faster scan; it is optional).

Papers
    [SSD]     Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
              Structured State Space Duality", arXiv 2405.21060 (Mamba-2; Listing 1 is the SSD scan).
    [Stuffed] Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
              Long-Context Modeling", arXiv 2410.07145 (why this file exposes the state).

Reading order
    1. Mamba2Config            the hyper-parameters, official names and defaults
    2. ssd_step, ssd            the state space recurrence, one token and chunked (SSD steps 1-4)
    3. DefaultScan             which scan a layer uses (and the hook mitigations.py replaces)
    4. Mamba2Mixer             one Mamba-2 layer: in_proj -> conv -> SSM -> gated norm -> out_proj
    5. Mamba2LM                embedding -> n_layer residual blocks -> norm_f -> tied lm_head;
                               forward (streaming with Mamba2State), step, generate
    6. checkpoints             from_pretrained / save_pretrained, a tiny safetensors reader/writer

Glossary (dimension letters used in shapes and einsum strings)
    b  batch size
    l  sequence length (tokens)                      [SSD] T
    d  d_model, the residual stream width            [SSD] D
    h  number of heads = d_inner / p
    p  headdim, channels of x per head               [SSD] P
    n  d_state, state size per channel               [SSD] N
    g  ngroups, heads sharing one B and C            (1 in every released checkpoint)
    k  d_conv, the causal convolution width
    q  chunk_size of the chunked scan                [SSD] Q
    c  number of chunks = ceil(l / q)
    s  a second position index inside a chunk (source position)

The state space model of one head (a P x N matrix state S), [SSD] eq. (1) / [Stuffed] sec. 2:
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        (decay alpha_t = exp(dt_t A) in (0, 1))
    y_t = S_t C_t + D * x_t
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------------

SCAN_IMPLS = ("auto", "ssd", "chunked", "compiled", "sequential")


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 language model hyper-parameters, with the field names and defaults of mamba_ssm.

    Only d_model, n_layer and vocab_size have no default. The derived sizes (d_inner, nheads,
    conv_dim, padded_vocab_size) are properties, so a config can never disagree with itself.
    """

    d_model: int  # d, width of the residual stream
    n_layer: int  # number of Mamba-2 blocks
    vocab_size: int  # tokens the tokenizer can produce (the embedding is padded, see below)
    d_state: int = 128  # n, [SSD] N: state size per channel
    d_conv: int = 4  # k, width of the causal depthwise convolution
    expand: int = 2  # e, d_inner = expand * d_model
    headdim: int = 64  # p, [SSD] P: channels per head
    ngroups: int = 1  # g, heads sharing one B and C (like grouped-query attention)
    chunk_size: int = 256  # q, [SSD] Q: block size of the chunked scan (any q gives the same result)
    pad_vocab_size_multiple: int = 16  # embedding rows are vocab_size rounded up to this multiple
    norm_eps: float = 1e-5  # epsilon of every RMSNorm (blocks, norm_f, the gated norm)
    dt_min: float = 1e-3  # initial step sizes Delta are log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # ... and at least dt_init_floor
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Delta is clamped to this range (default: none)
    A_init_range: tuple[float, float] = (1.0, 16.0)  # initial -A = exp(A_log) uniform in this range
    bias: bool = False  # bias in in_proj and out_proj (False in every released checkpoint)
    conv_bias: bool = True  # bias in conv1d
    residual_in_fp32: bool = True  # keep the residual stream in float32
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    scan: str = "auto"  # which SSM scan forward() uses; a runtime choice, not saved in checkpoints:
    # "ssd" (this file), "chunked" (kernels.ssd_chunked), "compiled" (torch.compile of it),
    # "sequential" (kernels.ssd_sequential, slow oracle), "auto" (with kernels.py importable: the
    # compiled scan on CUDA, the eager kernels.ssd_chunked elsewhere; without it, this file's ssd)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim",
                     "ngroups", "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"headdim ({self.headdim}) must divide d_inner = expand * d_model "
                             f"= {self.expand} * {self.d_model} = {self.d_inner}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"ngroups ({self.ngroups}) must divide nheads = d_inner / headdim "
                             f"= {self.nheads}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if not self.dt_init_floor > 0:
            raise ValueError(f"dt_init_floor must be > 0, got {self.dt_init_floor}")
        lo, hi = self.dt_limit
        if not 0 <= lo < hi:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.scan not in SCAN_IMPLS:
            raise ValueError(f"scan must be one of {SCAN_IMPLS}, got {self.scan!r}")
        # JSON gives lists; keep tuples so the frozen config stays hashable
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))

    @property
    def d_inner(self) -> int:  # e * d
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:  # h
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:  # channels that go through the conv: x, B and C
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self) -> int:  # rows of the embedding and of the logits
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


# --------------------------------------------------------------------------------------------------
# 2. The SSM scan: one token (the recurrence) and a whole sequence (chunked SSD)
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SSM state math runs in float32 at least (float64 inputs stay float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): head i reads group i // (h / g) (repeat_interleave, not tile)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def check_scan_inputs(x, dt, A, B, C, D=None, state=None, chunk_size=None, step=False):
    """Validate the shapes of a scan's inputs; returns (b, l, h, p, g, n) (l = 1 for a step).

    Sequence form: x (b, l, h, p), dt (b, l, h), A (h,) or per-token (b, l, h), B and C (b, l, g, n),
    D (h,), state (b, h, p, n). Step form: the same without the l dimension.
    """
    lead = "(b, h" if step else "(b, l, h"
    if x.dim() != (3 if step else 4):
        raise ValueError(f"x must be {lead}, p), got shape {tuple(x.shape)}")
    if step:
        (b, h, p), l = x.shape, 1
    else:
        b, l, h, p = x.shape
    seq = () if step else (l,)
    if tuple(dt.shape) != (b, *seq, h):
        raise ValueError(f"dt must be {lead}) = {(b, *seq, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) not in ((h,), (b, *seq, h)):
        raise ValueError(f"A must be (h,) = ({h},) or per-token {(b, *seq, h)}, got {tuple(A.shape)}")
    if B.dim() != x.dim() or tuple(B.shape[:-2]) != (b, *seq):
        raise ValueError(f"B must be {lead[:-3]}, g, n) with leading dims {(b, *seq)}, got {tuple(B.shape)}")
    g, n = B.shape[-2:]
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if h % g != 0:
        raise ValueError(f"the number of groups g={g} must divide the number of heads h={h}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"D must be (h,) = ({h},), got {tuple(D.shape)}")
    if state is not None and not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a (b, h, p, n) tensor, got a {type(state).__name__}: a state made "
                        "inside a mitigations block continues only inside the same kind of block")
    if state is not None and state.device != x.device:
        raise ValueError(f"state is on {state.device}, the inputs on {x.device}")
    if state is not None and tuple(state.shape) != (b, h, p, n):
        raise ValueError(f"state must be (b, h, p, n) = {(b, h, p, n)}, got {tuple(state.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return b, l, h, p, g, n


def ssd_step(x, dt, A, B, C, *, D=None, state=None):
    """One token of the recurrence, O(1) in the sequence length (used by step() and generate()).

    Args: x (b, h, p); dt (b, h) > 0; A (h,) or (b, h) < 0; B, C (b, g, n); D (h,) or None;
          state (b, h, p, n) or None for zeros.
    Returns: y (b, h, p) in x.dtype, and the new state (b, h, p, n) in float32 (float64 stays).
    """
    b, _, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, state, step=True)
    ct = _compute_dtype(x.dtype)
    if state is None:
        state = x.new_zeros(b, h, p, n, dtype=ct)
    xf, dtf = x.to(ct), dt.to(ct)
    Bh = _heads_from_groups(B.to(ct), h)  # (b, h, n)
    Ch = _heads_from_groups(C.to(ct), h)  # (b, h, n)
    # S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T
    decay = torch.exp(dtf * A.to(ct))  # (b, h)
    state = state.to(ct) * decay[..., None, None] + torch.einsum("bh,bhp,bhn->bhpn", dtf, xf, Bh)
    # y_t = S_t C_t + D x_t
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.to(ct)[:, None] * xf
    return y.to(x.dtype), state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf for i < j.

    exp(segsum(a)) is the SSD paper's 1-semiseparable mask L (Listing 1). Built from a masked
    cumsum of differences, never as exp(cs_i) * exp(-cs_j), which overflows for long chunks.
    a (..., q) -> (..., q, q).
    """
    q = a.shape[-1]
    x = a[..., None].expand(*a.shape, q)  # x[..., i, j] = a_i
    strictly_lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    out = torch.cumsum(x, dim=-2)  # out[..., i, j] = sum_{j < m <= i} a_m
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, -math.inf)


def ssd(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None):
    """The chunked SSD scan, [SSD] Listing 1, in its four numbered steps; exact for any length.

    Args:
        x: (b, l, h, p) inputs; dt: (b, l, h) step sizes Delta > 0 (after softplus);
        A: (h,) negative decay rates, or per-token (b, l, h) (how a mitigation changes the decay);
        B, C: (b, l, g, n) input and output projections; D: (h,) skip or None;
        chunk_size: q, any positive int (the result does not depend on it);
        initial_state: (b, h, p, n) or None for zeros.
    Returns:
        y: (b, l, h, p) in x.dtype; final_state: (b, h, p, n) in float32 (float64 stays float64).
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    q = chunk_size
    # Discretize: X = x * dt (what gets written), a = dt * A (log of the decay alpha).
    X = x.to(ct) * dt.to(ct)[..., None]  # (b, l, h, p)
    a = dt.to(ct) * A.to(ct)  # (b, l, h)
    Bh = _heads_from_groups(B.to(ct), h)  # (b, l, h, n)
    Ch = _heads_from_groups(C.to(ct), h)  # (b, l, h, n)
    # Pad l to a multiple of q with zeros: a padded step has dt = 0, so it neither decays nor writes,
    # and the final state stays exact.
    pad = (-l) % q
    X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
    a = F.pad(a, (0, 0, 0, pad))
    c = (l + pad) // q
    X, Bh, Ch = (t.reshape(b, c, q, h, t.shape[-1]) for t in (X, Bh, Ch))  # (b, c, q, h, .)
    a = a.reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b, h, c, q)

    # Step 1 (diagonal blocks, within a chunk): Y_diag = (C B^T o L) X, L = exp(segsum(a)).
    L = torch.exp(segsum(a))  # (b, h, c, q, q)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)

    # Step 2 (chunk states): S_c = sum_s exp(a_cumsum[last] - a_cumsum[s]) X_s B_s^T.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, X)

    # Step 3 (between chunks): S_{c+1} = exp(sum of a over chunk c) S_c + states_c. A linear loop;
    # states_in[c] is the state entering chunk c.
    S = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
    chunk_decay = torch.exp(a_cumsum[..., -1])  # (b, h, c)
    states_in = []
    for i in range(c):
        states_in.append(S)
        S = chunk_decay[:, :, i, None, None] * S + states[:, i]
    states_in = torch.stack(states_in, dim=1)  # (b, c, h, p, n)

    # Step 4 (off-diagonal blocks): the entering state read out at each position,
    # Y_off = exp(a_cumsum) * (C S_in).
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states_in, torch.exp(a_cumsum))

    y = (Y_diag + Y_off).reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype), S


# --------------------------------------------------------------------------------------------------
# 3. Which scan a layer uses: the default, and the hook that mitigations.py replaces
# --------------------------------------------------------------------------------------------------


def _kernels():
    """kernels.py if it sits next to this file (or is installed), else None: it is optional.
    (An unrelated module of the same name, e.g. PyPI's `kernels`, is ignored: it has no ssd_chunked.)"""
    try:
        import kernels
    except ImportError:
        return None
    return kernels if hasattr(kernels, "ssd_chunked") else None


class DefaultScan:
    """The SSM part of a Mamba2Mixer, kept as a replaceable object (not an nn.Module).

    Every Mamba2Mixer has `mixer.scan`. forward() calls scan.chunked(...) on the whole piece and
    step() calls scan.step(...) for one token, with dt already softplus-ed and clamped and
    A = -exp(A_log) in float32. A mitigation (mitigations.py) swaps in its own object with the
    same two methods; its state may be any object, which Mamba2State carries along unchanged.
    """

    def __init__(self, impl: str = "auto"):
        if impl not in SCAN_IMPLS:
            raise ValueError(f"scan must be one of {SCAN_IMPLS}, got {impl!r}")
        self.impl = impl

    def _scan_fn(self, device: torch.device):
        impl = self.impl
        if impl == "ssd":
            return ssd
        k = _kernels()
        if impl == "auto":
            # On CPU compiling takes minutes and did not run faster than eager (experiments/bench.py).
            if k is None:
                return ssd
            return k.ssd_chunked_compiled if device.type == "cuda" else k.ssd_chunked
        if k is None:
            raise ImportError(f"scan={impl!r} needs kernels.py next to minimamba.py; "
                              "use scan='ssd' (this file's scan) instead")
        return {"chunked": k.ssd_chunked, "compiled": k.ssd_chunked_compiled,
                "sequential": k.ssd_sequential_chunked}[impl]

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        """A whole piece of the sequence: shapes as ssd(); returns (y, final_state). With
        return_state=False the caller will not read the final state (it may be returned as None)."""
        return self._scan_fn(x.device)(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state)

    def step(self, x, dt, A, B, C, D, state):
        """One token: shapes as ssd_step(); returns (y, new_state)."""
        return ssd_step(x, dt, A, B, C, D=D, state=state)


# --------------------------------------------------------------------------------------------------
# 4. One Mamba-2 layer
# --------------------------------------------------------------------------------------------------


def _rms_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2 over the last dim) + eps), keepdim; from the norm, a reduction that needs no
    x^2 temporary as large as x."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * _rms_inverse(xf, self.eps) * self.weight.float()).to(self.weight.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm, gate BEFORE the norm (mamba_ssm's norm_before_gate=False):
        g = y * silu(z);  out = g / sqrt(mean(g^2 over each group of d_inner/ngroups channels) + eps) * weight
    Per-group as in mamba_ssm (Hugging Face's older code normalized over all of d_inner, which
    differs when ngroups > 1)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        weight = self.weight.float().unflatten(-1, (-1, self.group_size))  # (g, d_inner / g)
        if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or weight.requires_grad):
            g = F.silu(z.float()) * y.float()  # (b, l, d_inner)
            g = g.unflatten(-1, (-1, self.group_size))  # (b, l, g, d_inner / g)
            g = g * _rms_inverse(g, self.eps) * weight
        else:  # the same operations in one buffer (inference)
            g = F.silu(z.float()).mul_(y).unflatten(-1, (-1, self.group_size))
            g = g.mul_(_rms_inverse(g, self.eps)).mul_(weight)
        return g.flatten(-2).to(self.weight.dtype)


def causal_conv(xBC, past, weight, bias):
    """The causal depthwise conv of new raw inputs xBC (b, l, c), preceded by the k-1 raw inputs
    before them, past (b, k-1, c) (zeros at the start of a sequence); weight (c, k), bias (c,) or None:
        out_t = bias + sum_{j<k} weight[:, j] * xpad_{t+j},   xpad = [past | xBC]  (xpad_{t+k-1} is token t)
    Written as k shifted multiply-adds in the (b, l, c) layout, accumulated in place into one buffer,
    with the few outputs that read `past` done apart: nn.Conv1d's (b, c, l) layout would cost two
    transposed copies of the activations, and concatenating [past | xBC] or a fresh tensor per tap one
    more pass over memory each (on CPU, each fresh tensor also costs page faults). Returns (b, l, c)."""
    k, l = weight.shape[1], xBC.shape[1]
    out = xBC * weight[:, k - 1]  # (b, l, c): the tap on token t itself
    for j in range(k - 1):
        s = k - 1 - j  # tap j reads the input s steps back: xBC_{t-s} for t >= s, past_{t+j} for t < s
        if s < l:
            out[:, s:].addcmul_(xBC[:, : l - s], weight[:, j])
        m = min(s, l)
        out[:, :m].addcmul_(past[:, j:j + m], weight[:, j])
    return out if bias is None else out.add_(bias)


class _CausalConvSilu(torch.autograd.Function):
    """silu(causal_conv(xBC, past, weight, bias)) with a hand-written backward: autograd through
    causal_conv's in-place shifted adds would keep a zero-filled full-size gradient per shifted slice
    and copy it back (measured: the conv was the costliest part of the model's backward). It keeps
    the inputs and pre. With pre = causal_conv(...), sigma = sigmoid(pre), out = pre * sigma:
        dpre = dout * sigma * (1 + pre (1 - sigma))                          (silu')
        dxpad_m = sum_j weight_j dpre_{m-j}   (0 <= m-j < l)                  (the conv, transposed)
        dweight_j = sum_{b,t} dpre_t xpad_{t+j};   dbias = sum_{b,t} dpre_t
    """

    @staticmethod
    def forward(ctx, xBC, past, weight, bias):
        pre = causal_conv(xBC, past, weight, bias)  # (b, l, c)
        if not any(ctx.needs_input_grad):  # no autograd: nothing to keep
            return F.silu(pre, inplace=True)
        ctx.save_for_backward(xBC, past, weight, bias, pre)
        return F.silu(pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        xBC, past, weight, bias, pre = ctx.saved_tensors
        k, l = weight.shape[1], xBC.shape[1]
        sig = torch.sigmoid(pre)
        dpre = torch.mul(sig, pre)  # sigma pre, then dpre = (sigma + sigma pre (1 - sigma)) dout:
        dpre = dpre.addcmul_(dpre, sig, value=-1.0).add_(sig).mul_(dout)  # (b, l, c)
        dxBC = dpre * weight[:, k - 1]
        dpast = torch.zeros_like(past)  # (b, k-1, c)
        dweight = torch.empty_like(weight)  # (c, k)
        dweight[:, k - 1] = (dpre * xBC).sum((0, 1))
        for j in range(k - 1):
            s, m = k - 1 - j, min(k - 1 - j, l)
            dw = (dpre[:, :m] * past[:, j:j + m]).sum((0, 1))
            if s < l:
                dxBC[:, : l - s].addcmul_(dpre[:, s:], weight[:, j])
                dw += (dpre[:, s:] * xBC[:, : l - s]).sum((0, 1))
            dpast[:, j:j + m].addcmul_(dpre[:, :m], weight[:, j])
            dweight[:, j] = dw
        dbias = None if bias is None else dpre.sum((0, 1))
        return dxBC, dpast, dweight, dbias


class Mamba2Mixer(nn.Module):
    """One Mamba-2 layer, [SSD] sec. 7 (the parallel Mamba-2 block):
        1. z, xBC, dt = in_proj(u)                       split as [z | xBC | dt]
        2. xBC = silu(causal depthwise conv1d(xBC))      x, B, C = split(xBC)  (after the conv)
        3. dt = softplus(dt + dt_bias);  A = -exp(A_log)
        4. y = SSM(x, dt, A, B, C) + D x                 (self.scan)
        5. out = out_proj(GatedRMSNorm(y, z))
    Parameter names are mamba_ssm's, so checkpoints load without key surgery.
    """

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        cfg, h = config, config.nheads
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + h  # [z | x B C | dt]
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=cfg.bias)
        # depthwise: one length-k filter per channel. An nn.Conv1d for the official parameter names and
        # init; applied by causal_conv, with the padding done by hand (zeros, or the conv state)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))  # initialized in Mamba2LM._init_weights
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.scan = DefaultScan(cfg.scan)

    def _split(self, zxbcdt):
        """in_proj output (..., d_in_proj) -> z (..., d_inner), xBC (..., conv_dim), dt (..., h)."""
        cfg = self.config
        return torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

    def _ssm_inputs(self, xBC, dt):
        """After the conv: x (..., h, p), B and C (..., g, n), dt = softplus(dt + dt_bias) clamped,
        and A = -exp(A_log), all SSM parameters in float32."""
        cfg = self.config
        x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        x = x.unflatten(-1, (cfg.nheads, cfg.headdim))
        B = B.unflatten(-1, (cfg.ngroups, cfg.d_state))
        C = C.unflatten(-1, (cfg.ngroups, cfg.d_state))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if cfg.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*cfg.dt_limit)
        A = -torch.exp(self.A_log.float())  # (h,)
        return x, dt, A, B, C

    def _conv_silu(self, xBC, past):
        """silu(causal_conv(xBC, past)): xBC (b, l, conv_dim) raw inputs, past (b, k-1, conv_dim)."""
        return _CausalConvSilu.apply(xBC, past, self.conv1d.weight[:, 0, :], self.conv1d.bias)

    def forward(self, u, conv_state=None, ssm_state=None):
        """A piece of a sequence.

        Args: u (b, l, d); conv_state (b, conv_dim, k): the last k raw (pre-conv) xBC inputs,
              or None for zeros; ssm_state: what self.scan keeps (default (b, h, p, n)) or None.
        Returns: out (b, l, d), conv_state, ssm_state, ready to continue the sequence.
        """
        b, l, _ = u.shape
        k = self.config.d_conv
        z, xBC, dt = self._split(self.in_proj(u))  # xBC (b, l, conv_dim)
        # Causal conv: left context is the last k-1 raw inputs of the previous piece (zeros at the start).
        past = xBC.new_zeros(b, k - 1, xBC.shape[-1]) if conv_state is None else conv_state[:, :, 1:].transpose(1, 2)
        past = past.to(xBC.dtype)  # (b, k-1, conv_dim)
        conv_state = torch.cat([past, xBC[:, -k:]], dim=1)[:, -k:].transpose(1, 2)  # (b, conv_dim, k)
        x, dt, A, B, C = self._ssm_inputs(self._conv_silu(xBC, past), dt)
        y, ssm_state = self.scan.chunked(x, dt, A, B, C, self.D, ssm_state, self.config.chunk_size)
        y = self.norm(y.flatten(-2), z)  # (b, l, d_inner)
        return self.out_proj(y), conv_state, ssm_state

    def step(self, u, conv_state, ssm_state):
        """One token: u (b, d), conv_state (b, conv_dim, k) or None; returns (out (b, d), states)."""
        z, xBC, dt = self._split(self.in_proj(u))
        if conv_state is None:
            conv_state = xBC.new_zeros(*xBC.shape, self.config.d_conv)
        conv_state = torch.cat([conv_state[:, :, 1:].to(xBC.dtype), xBC[:, :, None]], dim=-1)  # (b, conv_dim, k)
        x, dt, A, B, C = self._ssm_inputs(self._conv_silu(xBC[:, None], conv_state[:, :, :-1].transpose(1, 2))[:, 0], dt)
        y, ssm_state = self.scan.step(x, dt, A, B, C, self.D, ssm_state)
        y = self.norm(y.flatten(-2), z)  # (b, d_inner)
        return self.out_proj(y), conv_state, ssm_state


# --------------------------------------------------------------------------------------------------
# 5. The language model
# --------------------------------------------------------------------------------------------------


def _detach(obj):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj)
    if hasattr(obj, "detach"):
        return obj.detach()
    raise TypeError(f"cannot detach a state of type {type(obj).__name__}: give it a detach() method")


@dataclass
class Mamba2State:
    """Everything the model remembers about the tokens it has read, per layer.

    conv: (b, conv_dim, k) per layer: the last k raw (pre-conv) xBC inputs.
    ssm:  per layer, the scan's state: (b, h, p, n) float32 with the default scan (None = zeros);
          a mitigation's scan may keep its own object here.
    seqlen: tokens read so far (for bookkeeping; the math does not use it).
    """

    conv: list = field(default_factory=list)
    ssm: list = field(default_factory=list)
    seqlen: int = 0

    def detach(self) -> "Mamba2State":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        return Mamba2State([_detach(c) for c in self.conv], [_detach(s) for s in self.ssm], self.seqlen)


class Block(nn.Module):
    """Pre-norm residual block: residual = residual + mixer(RMSNorm(residual))."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config, layer_idx)


class Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


# On CPU, forward() without autograd runs inputs longer than this many tokens (rounded down to whole
# chunks, at least one) as consecutive segments with the state carried, which gives the same result
# bit for bit (streaming is exact). Why: a layer's temporaries grow with l, and on CPU a fresh
# multi-megabyte buffer costs page faults on first touch (glibc returns big blocks to the OS on
# free), so a 16K-token call cost ~9x a 4K-token call. Bounded segments keep memory bounded, the
# buffers small enough to be reused, and the cost linear in l. Measured with the benchmark's model
# (d_model 256, 4 layers, 1 thread, ms): segments of 512 / 1024 / 2048 / 4096 tokens took
# 264 / 272 / 304 / 327 at l = 4096 and 1572 / 1666 / 1858 / 1899 at l = 16384. On a GPU one call
# is best (no page faults, more parallel work), so nothing is split there.
INFERENCE_SEGMENT = 512


class Mamba2LM(nn.Module):
    """Mamba-2 language model: embedding -> n_layer x Block -> norm_f -> lm_head (tied).

    forward(input_ids, state) streams: passing the returned state into the next call continues
    the sequence exactly, so millions of tokens run in bounded memory.
    """

    def __init__(self, config: Mamba2Config):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"Mamba2LM needs a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The official (mamba_ssm) initialization; a fresh model trains well with it.

        dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor;
        A_log = log(U(A_init_range)); D = 1; embedding N(0, 0.02); linear biases 0; out_proj
        kaiming-uniform / sqrt(n_layer) (GPT-2's residual scaling, one residual per layer).
        in_proj and conv1d keep PyTorch's default init, as in mamba_ssm.
        """
        cfg = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.backbone.layers:
            m = block.mixer
            h = cfg.nheads
            dt = torch.exp(torch.rand(h) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            m.A_log.copy_(torch.log(torch.empty(h).uniform_(*cfg.A_init_range)))
            m.D.fill_(1.0)
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
            for p in (m.dt_bias, m.A_log, m.D):
                p._no_weight_decay = True  # the official marker: exclude from weight decay

    # ---- input checks ----------------------------------------------------------------------------

    def _check_ids(self, input_ids, ndim):
        what = "(b, l)" if ndim == 2 else "(b,)"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor of shape {what}, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != ndim:
            raise ValueError(f"input_ids must have shape {what}, got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): need at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")

    def _check_state(self, state, batch):
        if state is None:
            return Mamba2State([None] * self.config.n_layer, [None] * self.config.n_layer, 0)
        if not isinstance(state, Mamba2State):
            raise TypeError(f"state must be a Mamba2State (returned by forward/step), got {type(state).__name__}")
        if len(state.conv) != self.config.n_layer or len(state.ssm) != self.config.n_layer:
            raise ValueError(f"state has {len(state.conv)} layers, the model has {self.config.n_layer}")
        conv = state.conv[0]
        if conv is not None and conv.shape[0] != batch:
            raise ValueError(f"state was made for batch size {conv.shape[0]}, input has batch size {batch}")
        return state

    # ---- running the model -----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, state: Mamba2State | None = None):
        """Args: input_ids (b, l) token ids, any l >= 1; state from an earlier call, or None.
        Returns: logits (b, l, padded_vocab_size) in float32, and the state after the last token.
        """
        self._check_ids(input_ids, 2)
        state = self._check_state(state, input_ids.shape[0])
        q = self.config.chunk_size
        segment = max(1, INFERENCE_SEGMENT // q) * q  # whole chunks: the scan then does the very same sums
        l = input_ids.shape[1]
        if torch.is_grad_enabled() or l <= segment or input_ids.device.type != "cpu":
            return self._run(input_ids, state, one_token=False)
        # Inference on a long input: segments with the state carried, exactly as streaming does
        # (see INFERENCE_SEGMENT); backpropagation needs every activation anyway, so it gets one call.
        pieces = []
        for start in range(0, l, segment):
            logits, state = self._run(input_ids[:, start:start + segment], state, one_token=False)
            pieces.append(logits)
        return torch.cat(pieces, dim=1), state

    def step(self, input_ids: torch.Tensor, state: Mamba2State | None):
        """One token per sequence, O(1) in the context length.
        Args: input_ids (b,); state from forward() (prefill) or an earlier step(), or None.
        Returns: logits (b, padded_vocab_size) in float32, and the new state.
        """
        self._check_ids(input_ids, 1)
        return self._run(input_ids, self._check_state(state, input_ids.shape[0]), one_token=True)

    def _run(self, input_ids, state: Mamba2State, one_token: bool):
        """The model itself, on checked inputs: a piece of l tokens (b, l), or one token (b,) through
        each mixer's step(). embedding -> [residual += mixer(RMSNorm(residual))] x n_layer -> norm_f -> lm_head."""
        hidden = self.backbone.embedding(input_ids)  # (b, l, d) or (b, d)
        residual = hidden.float() if self.config.residual_in_fp32 else hidden
        conv, ssm = [], []
        for i, block in enumerate(self.backbone.layers):
            mixer = block.mixer.step if one_token else block.mixer
            out, c, s = mixer(block.norm(residual), state.conv[i], state.ssm[i])
            residual = residual + out
            conv.append(c)
            ssm.append(s)
        logits = self.lm_head(self.backbone.norm_f(residual)).float()
        n = 1 if one_token else input_ids.shape[1]
        return logits, Mamba2State(conv, ssm, state.seqlen + n)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None):
        """Prefill with forward(), then sample one token at a time with step().

        temperature 0 means greedy (argmax); top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches top_p (nucleus). Only real vocabulary ids
        (< vocab_size) are ever produced. Returns (b, l + max_new_tokens) token ids.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        logits, state = self(input_ids)
        logits = logits[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            token = sample(logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:  # sampled ids are valid: skip step()'s checks (a GPU sync)
                logits, state = self._run(token, state, one_token=True)
        return torch.cat(out, dim=1)

    # ---- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, **overrides) -> "Mamba2LM":
        """Load a local checkpoint directory in the state-spaces (mamba_ssm) or Hugging Face layout.

        The directory holds config.json and model.safetensors (or a sharded
        model.safetensors.index.json) or pytorch_model.bin (read with weights_only=True). No network:
        fetch checkpoints with your own tools. overrides set runtime config fields (e.g. scan="ssd").
        Missing or unexpected keys and shape mismatches raise an error that names them.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a checkpoint directory")
        raw = json.loads((path / "config.json").read_text())
        config = dataclasses.replace(config_from_dict(raw), **overrides)
        model = cls(config)
        weights = _read_weights(path)
        state_dict = _to_minimamba_keys(weights, config)
        expected = model.state_dict()
        if config.tie_embeddings:
            expected.pop("lm_head.weight")
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"checkpoint {path} does not match the config:\n  missing keys: {missing}\n"
                             f"  unexpected keys: {unexpected}\n  shape mismatches: {shapes}")
        model.load_state_dict(state_dict, strict=False)  # strict check done above (tied lm_head)
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, path, layout: str = "hf"):
        """Write config.json and the weights to a directory.

        layout "hf": model.safetensors and a Mamba2ForCausalLM config that transformers reads too;
        layout "mamba_ssm": pytorch_model.bin and a state-spaces config. Files are written to a
        temporary name and renamed, so a killed save never leaves a half-written file.
        """
        if layout not in ("hf", "mamba_ssm"):
            raise ValueError(f"layout must be 'hf' or 'mamba_ssm', got {layout!r}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if layout == "hf":
            if self.config.tie_embeddings:
                sd.pop("lm_head.weight")
            sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
            _atomic_write(path / "model.safetensors", lambda f: _write_safetensors(f, sd))
        else:
            _atomic_write(path / "pytorch_model.bin", lambda f: torch.save(sd, f))
        text = json.dumps(config_to_dict(self.config, layout), indent=2)
        _atomic_write(path / "config.json", lambda f: f.write(text.encode()))


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token id per row of logits (b, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k most likely and to the nucleus of mass top_p. Returns (b,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------------
# 6. Checkpoints: config translation, key mapping, a small safetensors reader and writer
# --------------------------------------------------------------------------------------------------

# Hugging Face Mamba2Config name -> our (mamba_ssm) name
_HF_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
             "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
             "n_groups": "ngroups", "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps",
             "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
             "time_step_limit": "dt_limit", "use_bias": "bias", "use_conv_bias": "conv_bias",
             "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}
# mamba_ssm's Mamba2 constructor arguments (ssm_cfg) we support -> our name
_SSM_CFG_NAMES = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "headdim": "headdim",
                  "ngroups": "ngroups", "chunk_size": "chunk_size", "dt_min": "dt_min", "dt_max": "dt_max",
                  "dt_init_floor": "dt_init_floor", "dt_limit": "dt_limit", "A_init_range": "A_init_range",
                  "bias": "bias", "conv_bias": "conv_bias"}
# mamba_ssm options that change the architecture: supported only at these values
_SSM_CFG_FIXED = {"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False,
                  "d_ssm": None, "activation": "silu"}
_SSM_CFG_IGNORED = {"dt_init", "dt_scale", "use_mem_eff_path", "process_group", "sequence_parallel",
                    "device", "dtype", "layer_idx"}  # initialization/runtime details with no effect on the function


def config_from_dict(raw: dict) -> Mamba2Config:
    """A Mamba2Config from a config.json of either layout (detected by its keys)."""
    if "d_model" in raw:  # state-spaces / mamba_ssm
        ssm_cfg = dict(raw.get("ssm_cfg") or {})
        if ssm_cfg.get("layer") != "Mamba2":
            raise ValueError(f"ssm_cfg.layer is {ssm_cfg.get('layer')!r}: only Mamba2 checkpoints are supported")
        for key, value in _SSM_CFG_FIXED.items():
            if key in ssm_cfg and ssm_cfg[key] != value:
                raise ValueError(f"unsupported ssm_cfg.{key}={ssm_cfg[key]!r} (minimamba implements {value!r})")
        unknown = set(ssm_cfg) - set(_SSM_CFG_NAMES) - set(_SSM_CFG_FIXED) - _SSM_CFG_IGNORED
        if unknown:
            raise ValueError(f"unknown ssm_cfg keys {sorted(unknown)}")
        if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
            raise ValueError("hybrid checkpoints (MLP or attention layers) are not supported")
        if raw.get("rms_norm", True) is not True:
            raise ValueError("rms_norm=False (LayerNorm blocks) is not supported")
        kwargs = {ours: ssm_cfg[theirs] for theirs, ours in _SSM_CFG_NAMES.items() if theirs in ssm_cfg}
        for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "residual_in_fp32"):
            if key in raw:
                kwargs[key] = raw[key]
        if "tie_embeddings" in raw:
            kwargs["tie_embeddings"] = raw["tie_embeddings"]
        if "norm_epsilon" in raw:
            kwargs["norm_eps"] = raw["norm_epsilon"]
        return Mamba2Config(**kwargs)
    if "hidden_size" in raw:  # Hugging Face Mamba2ForCausalLM (vocab_size is already padded)
        if raw.get("model_type", "mamba2") != "mamba2":
            raise ValueError(f"model_type is {raw.get('model_type')!r}, expected 'mamba2'")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported (Mamba-2 uses silu)")
        kwargs = {ours: _json_float(raw[theirs]) for theirs, ours in _HF_NAMES.items() if theirs in raw}
        kwargs.setdefault("ngroups", 8)  # transformers' defaults where the file is silent
        kwargs.setdefault("tie_embeddings", False)
        config = Mamba2Config(**kwargs, pad_vocab_size_multiple=1)
        if "num_heads" in raw and raw["num_heads"] != config.nheads:
            raise ValueError(f"num_heads={raw['num_heads']} but expand*hidden_size/head_dim = {config.nheads}")
        return config
    raise ValueError("config.json is neither a mamba_ssm config (d_model, ...) nor a Hugging Face "
                     "Mamba2 config (hidden_size, ...)")


def _json_float(value):
    """transformers >= 5 writes infinity as {"__float__": "Infinity"}; older files say Infinity."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    if isinstance(value, list):
        return [_json_float(v) for v in value]
    return value


def config_to_dict(config: Mamba2Config, layout: str) -> dict:
    """The config.json of a layout ("hf" or "mamba_ssm") for config."""
    if layout == "hf":
        out = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "num_heads": config.nheads}
        for theirs, ours in _HF_NAMES.items():
            value = getattr(config, ours)
            out[theirs] = list(value) if isinstance(value, tuple) else value
        out["vocab_size"] = config.padded_vocab_size
        return out
    ssm_cfg = {"layer": "Mamba2"}
    for theirs, ours in _SSM_CFG_NAMES.items():
        value = getattr(config, ours)
        ssm_cfg[theirs] = list(value) if isinstance(value, tuple) else value
    return {"d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
            "tie_embeddings": config.tie_embeddings, "norm_epsilon": config.norm_eps}


def _to_minimamba_keys(weights: dict, config: Mamba2Config) -> dict:
    """Map either layout's keys to ours (Hugging Face says backbone.embeddings, mamba_ssm .embedding)."""
    out = {}
    for key, value in weights.items():
        if key == "backbone.embeddings.weight":
            key = "backbone.embedding.weight"
        out[key] = value
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # a tied copy, if the file has one
    return out


def _read_weights(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        weights = {}
        for shard in sorted(set(index["weight_map"].values())):
            weights.update(read_safetensors(path / shard))
        return weights
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian bytes. (https://github.com/huggingface/safetensors)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_ALIGN = 8  # header padded with spaces so tensor data starts 8-byte aligned


def read_safetensors(path) -> dict:
    """Read a .safetensors file into {name: tensor} on the CPU (no third-party package needed)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            f.seek(base + start)
            data = bytearray(f.read(end - start))
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
    return out


def _write_safetensors(f, tensors: dict):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _ST_ALIGN)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for t in tensors.values():
        if t.numel():
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def write_safetensors(path, tensors: dict):
    """Write {name: tensor} to a .safetensors file (tensors are copied to contiguous CPU memory)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda f: _write_safetensors(f, tensors))


def _atomic_write(path: Path, write):
    """Write through a temporary file in the same folder, then rename: all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":  # a tour in a few seconds: python minimamba.py
    import time

    torch.manual_seed(0)
    config = Mamba2Config(d_model=256, n_layer=4, vocab_size=256, d_state=64, headdim=32, chunk_size=64)
    model = Mamba2LM(config).eval()
    print(f"Mamba2LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, scan={config.scan}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(tmp)
        again = Mamba2LM.from_pretrained(tmp).eval()
        ids = torch.randint(0, 256, (1, 4096))
        same = torch.equal(model(ids[:, :64])[0], again(ids[:, :64])[0])
        print(f"save_pretrained -> from_pretrained gives identical logits: {same}")
        t0 = time.perf_counter()
        logits, state = model(ids)
        t1 = time.perf_counter()
        print(f"forward, l = 4096: {4096 / (t1 - t0):,.0f} tokens/s")
        out = model.generate(ids[:, :16], 64, temperature=1.0, top_k=20)
        t2 = time.perf_counter()
        print(f"generate 64 tokens (prefill 16): {64 / (t2 - t1):,.0f} tokens/s; sample: {out[0, 16:32].tolist()}")
