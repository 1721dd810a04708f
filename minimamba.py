"""minimamba: Mamba-2 in one file of pure PyTorch.

A language model built from Mamba-2 mixer layers that loads the official checkpoints
(state-spaces/mamba2-* and Hugging Face Mamba2ForCausalLM layouts) and reproduces their logits.
Copy this file alone and it works: it imports only torch and the standard library, and the code
you read here is the code that runs. (kernels.py can install faster versions of the scan and the
conv into a model, `kernels.accelerate(model)`; mitigations.py wraps the scan. Both plug in
through `mixer.scan` and `mixer.conv`; this file never imports them.)

Papers
    [SSD]     Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
              Structured State Space Duality", arXiv 2405.21060 (Mamba-2; Listing 1 is the SSD scan).
    [Stuffed] Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
              Long-Context Modeling", arXiv 2410.07145 (why this file exposes the state).

Reading order
    1. Mamba2Config     the hyper-parameters, official names and defaults, strictly checked
    2. ssd_step, ssd    the state space recurrence, one token and chunked (SSD steps 1-4)
    3. DefaultScan      the SSM part of a layer as a replaceable object (the plug-in hook)
    4. Mamba2Mixer      one Mamba-2 layer: in_proj -> conv -> SSM -> gated norm -> out_proj
    5. Mamba2LM         embedding -> n_layer residual blocks -> norm_f -> tied lm_head;
                        forward (streaming with Mamba2State), step, generate
    6. loading          from_pretrained: config translation, a checked safetensors reader

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

import dataclasses
import hashlib
import json
import math
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 language model hyper-parameters, with the field names and defaults of mamba_ssm.

    Only d_model, n_layer and vocab_size have no default. The derived sizes (d_inner, nheads,
    conv_dim, padded_vocab_size) are properties, so a config can never disagree with itself.
    Types are strict (a JSON "false" is not a bool, "0.001" is not a float) and floats finite.
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

    def __post_init__(self):
        def number(name, value, finite=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or (
                    finite and math.isinf(value)):
                raise ValueError(f"Mamba2Config.{name} must be a {'finite ' if finite else ''}number, got {value!r}")
            return float(value)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Mamba2Config.{f.name} must be a positive int, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"Mamba2Config.{f.name} must be true or false (a bool), got {value!r}")
            if f.type == "float":
                number(f.name, value)
            if f.type.startswith("tuple"):
                if not isinstance(value, (tuple, list)) or len(value) != 2:
                    raise ValueError(f"Mamba2Config.{f.name} must be a (low, high) pair, got {value!r}")
                # JSON gives lists; keep tuples so the frozen config stays hashable (only dt_limit's high may be inf)
                object.__setattr__(self, f.name, (number(f.name, value[0]),
                                                  number(f.name, value[1], finite=f.name != "dt_limit")))
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"headdim ({self.headdim}) must divide d_inner = expand * d_model "
                             f"= {self.expand} * {self.d_model} = {self.d_inner}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"ngroups ({self.ngroups}) must divide nheads = d_inner / headdim = {self.nheads}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if not self.dt_init_floor > 0:
            raise ValueError(f"dt_init_floor must be > 0, got {self.dt_init_floor}")
        if not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

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


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_compute_dtype(t.dtype))


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
    (b, h, p), l = (x.shape, 1) if step else ((x.shape[0], *x.shape[2:]), x.shape[1])
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
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
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
    Bh, Ch = _heads_from_groups(B.to(ct), h), _heads_from_groups(C.to(ct), h)  # (b, h, n)
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
    cumsum, never as exp(cs_i) * exp(-cs_j), which overflows for long chunks. a (..., q) -> (..., q, q).
    """
    q = a.shape[-1]
    x = a[..., None].expand(*a.shape, q)  # x[..., i, j] = a_i
    x = x.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1), 0)
    out = torch.cumsum(x, dim=-2)  # out[..., i, j] = sum_{j < m <= i} a_m
    return out.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device)), -math.inf)


def ssd(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_final_state=True):
    """The chunked SSD scan, [SSD] Listing 1, in its four numbered steps; exact for any length.

    Args:
        x: (b, l, h, p) inputs; dt: (b, l, h) step sizes Delta > 0 (after softplus);
        A: (h,) negative decay rates, or per-token (b, l, h) (how a mitigation changes the decay);
        B, C: (b, l, g, n) input and output projections; D: (h,) skip or None;
        chunk_size: q, any positive int (the result does not depend on it);
        initial_state: (b, h, p, n) or None for zeros;
        return_final_state: False when nobody will read the final state (then None is returned).
    Returns:
        y: (b, l, h, p) in x.dtype; final_state: (b, h, p, n) in float32 (float64 stays float64).
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    q = chunk_size
    # Discretize: X = x * dt (what gets written), a = dt * A (log of the decay alpha).
    X = x.to(ct) * dt.to(ct)[..., None]  # (b, l, h, p)
    a = dt.to(ct) * A.to(ct)  # (b, l, h)
    Bh, Ch = _heads_from_groups(B.to(ct), h), _heads_from_groups(C.to(ct), h)  # (b, l, h, n)
    # Pad l to a multiple of q with zeros: a padded step has dt = 0, so it neither decays nor writes,
    # and the final state stays exact.
    pad = (-l) % q
    X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
    c = (l + pad) // q
    X, Bh, Ch = (t.reshape(b, c, q, h, t.shape[-1]) for t in (X, Bh, Ch))  # (b, c, q, h, .)
    a = F.pad(a, (0, 0, 0, pad)).reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b, h, c, q)

    # Step 1 (diagonal blocks, within a chunk): Y_diag = (C B^T o L) X, L = exp(segsum(a)).
    L = torch.exp(segsum(a))  # (b, h, c, q, q)
    Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)
    S = None
    # One chunk from a zero state with nobody reading the final state (plain training at T <= q):
    # step 1, the quadratic ("attention-like") form, is the whole answer; steps 2-4 would build a
    # (b, h, p, n) state per chunk only to throw it away.
    if c > 1 or initial_state is not None or return_final_state:
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
        # Step 4 (off-diagonal blocks): the entering state read out, Y_off = exp(a_cumsum) * (C S_in).
        Y = Y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, torch.stack(states_in, dim=1), torch.exp(a_cumsum))
    y = Y.reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype), (S if return_final_state else None)


# --------------------------------------------------------------------------------------------------
# 3. The SSM of a layer as a replaceable object: the hook kernels.py and mitigations.py use
# --------------------------------------------------------------------------------------------------


class DefaultScan:
    """The SSM part of a Mamba2Mixer, kept as a replaceable object (not an nn.Module).

    Every Mamba2Mixer has `mixer.scan`: forward() calls scan.chunked(...) on the whole piece and
    forward(one_token=True) calls scan.step(...) for one token, with dt already softplus-ed and clamped and
    A = -exp(A_log) in float32. kernels.py installs a faster object with the same two methods;
    a mitigation (mitigations.py) wraps whatever is there. A scan's state may be any object with
    a detach() method; Mamba2State carries it along unchanged.
    """

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        """A whole piece of the sequence: shapes as ssd(); returns (y, final_state). return_state=False
        is the caller's promise not to read the final state (it is then None)."""
        return ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state, return_final_state=return_state)

    def step(self, x, dt, A, B, C, D, state):
        """One token: shapes as ssd_step(); returns (y, new_state)."""
        return ssd_step(x, dt, A, B, C, D=D, state=state)


# --------------------------------------------------------------------------------------------------
# 4. One Mamba-2 layer
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = _at_least_fp32(x)
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * _at_least_fp32(self.weight)).to(self.weight.dtype)


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
        g = (_at_least_fp32(y) * F.silu(_at_least_fp32(z))).unflatten(-1, (-1, self.group_size))  # (..., g, d_inner / g)
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * _at_least_fp32(self.weight)).to(self.weight.dtype)


def causal_conv_silu(xBC, past, weight, bias):
    """silu of the causal depthwise conv over time of new raw inputs xBC (b, l, c), preceded by the
    k-1 raw inputs before them, past (b, k-1, c) (zeros at the start of a sequence):
        out_t = silu(bias + sum_{j<k} weight[j] * xpad_{t+j}),   xpad = [past | xBC], token t = xpad_{t+k-1}
    weight (k, c) (one row per tap: conv1d.weight[:, 0].T, contiguous), bias (c,) or None. Written as
    k shifted multiply-adds in the (b, l, c) layout (no transposes); returns (b, l, c)."""
    xpad, (k, l) = torch.cat([past, xBC], dim=1), (weight.shape[0], xBC.shape[1])
    out = sum(xpad[:, j:j + l] * weight[j] for j in range(k))
    return F.silu(out if bias is None else out + bias)


class Mamba2Mixer(nn.Module):
    """One Mamba-2 layer, [SSD] sec. 7 (the parallel Mamba-2 block):
        1. z, xBC, dt = in_proj(u)                       split as [z | xBC | dt]
        2. xBC = silu(causal depthwise conv1d(xBC))      x, B, C = split(xBC)  (after the conv)
        3. dt = softplus(dt + dt_bias);  A = -exp(A_log)
        4. y = SSM(x, dt, A, B, C) + D x                 (self.scan)
        5. out = out_proj(GatedRMSNorm(y, z))
    Parameter names are mamba_ssm's, so checkpoints load without key surgery. Two plug-in points:
    self.scan (step 4, section 3) and self.conv (step 2, a function like causal_conv_silu).
    forward() runs a piece of a sequence, or one token (one_token=True: the recurrent step).
    """

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        cfg, h = config, config.nheads
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + h, bias=cfg.bias)
        # depthwise: one length-k filter per channel; an nn.Conv1d for the official names and init,
        # applied by self.conv with the left context filled in by hand (zeros, or the conv state)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))  # initialized in Mamba2LM._init_weights
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.scan = DefaultScan()
        self.conv = causal_conv_silu

    def forward(self, u, conv_state=None, ssm_state=None, return_state=True, one_token=False):
        """A piece of a sequence, u (b, l, d); or with one_token, one token u (b, d) through scan.step (O(1)).

        conv_state (b, conv_dim, k): the last k raw (pre-conv) xBC inputs, or None for zeros;
        ssm_state: what self.scan keeps (default (b, h, p, n)) or None; return_state=False: nobody
        reads the states after this piece (plain training), so they are not built (None, None).
        Returns: out (b, l, d) (or (b, d)), conv_state, ssm_state, ready to continue the sequence.
        """
        cfg = self.config
        z, xBC, dt = torch.split(self.in_proj(u[:, None] if one_token else u),
                                 [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)  # (b, l, .)
        # Causal conv: left context is the last k-1 raw inputs of the previous piece (zeros at the start).
        past = (xBC.new_zeros(xBC.shape[0], cfg.d_conv - 1, cfg.conv_dim) if conv_state is None
                else conv_state[:, :, 1:].transpose(1, 2).to(xBC.dtype))  # (b, k-1, conv_dim)
        taps = self.conv1d.weight[:, 0].T.contiguous()  # (k, conv_dim): one contiguous row per tap
        x, B, C = torch.split(self.conv(xBC, past, taps, self.conv1d.bias),
                              [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        x = x.unflatten(-1, (cfg.nheads, cfg.headdim))  # (b, l, h, p)
        B, C = B.unflatten(-1, (cfg.ngroups, cfg.d_state)), C.unflatten(-1, (cfg.ngroups, cfg.d_state))  # (b, l, g, n)
        dt = F.softplus(_at_least_fp32(dt) + _at_least_fp32(self.dt_bias))  # (b, l, h), SSM parameters in fp32
        if cfg.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*cfg.dt_limit)
        A = -torch.exp(_at_least_fp32(self.A_log))  # (h,)
        if one_token:
            y, ssm_state = self.scan.step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, ssm_state)
            y = y[:, None]
        else:
            y, ssm_state = self.scan.chunked(x, dt, A, B, C, self.D, ssm_state, cfg.chunk_size, return_state)
        out = self.out_proj(self.norm(y.flatten(-2), z))  # (b, l, d)
        if return_state:  # the last k raw inputs, (b, conv_dim, k)
            conv_state = torch.cat([past, xBC[:, -cfg.d_conv:]], dim=1)[:, -cfg.d_conv:].transpose(1, 2)
        return out[:, 0] if one_token else out, (conv_state if return_state else None), ssm_state


# --------------------------------------------------------------------------------------------------
# 5. The language model
# --------------------------------------------------------------------------------------------------


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
        cut = lambda s: None if s is None else s.detach()  # noqa: E731
        return Mamba2State([cut(c) for c in self.conv], [cut(s) for s in self.ssm], self.seqlen)


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
            m, h = block.mixer, cfg.nheads
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
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids (int64 or int32), got dtype {input_ids.dtype}")
        if input_ids.dim() != ndim or input_ids.numel() == 0:
            raise ValueError(f"input_ids must have shape {what} with at least one token, got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")

    def _check_state(self, state, input_ids):
        cfg, b = self.config, input_ids.shape[0]
        if state is None:
            return Mamba2State([None] * cfg.n_layer, [None] * cfg.n_layer, 0)
        if not isinstance(state, Mamba2State):
            raise TypeError(f"state must be a Mamba2State (returned by forward/step), got {type(state).__name__}")
        if len(state.conv) != cfg.n_layer or len(state.ssm) != cfg.n_layer:
            raise ValueError(f"state has {len(state.conv)} layers, the model has {cfg.n_layer}")
        for conv in state.conv:
            if conv is not None and (tuple(conv.shape) != (b, cfg.conv_dim, cfg.d_conv) or conv.device != input_ids.device):
                raise ValueError(f"state's conv part is {tuple(conv.shape)} on {conv.device}; this model and input "
                                 f"need (b, conv_dim, d_conv) = {(b, cfg.conv_dim, cfg.d_conv)} on {input_ids.device}")
        return state

    # ---- running the model -----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, state: Mamba2State | None = None, return_state: bool = True):
        """Args: input_ids (b, l) token ids, any l >= 1; state from an earlier call, or None;
              return_state: False when nobody reads the state after this call (plain training):
              then it is not built, and None is returned in its place.
        Returns: logits (b, l, padded_vocab_size) in float32 (float64 for a float64 model), and the state after the last token.
        """
        self._check_ids(input_ids, 2)
        return self._run(input_ids, self._check_state(state, input_ids), one_token=False, return_state=return_state)

    def step(self, input_ids: torch.Tensor, state: Mamba2State | None):
        """One token per sequence, O(1) in the context length.
        Args: input_ids (b,); state from forward() (prefill) or an earlier step(), or None.
        Returns: logits (b, padded_vocab_size) in float32, and the new state.
        """
        self._check_ids(input_ids, 1)
        return self._run(input_ids, self._check_state(state, input_ids), one_token=True)

    def _run(self, input_ids, state: Mamba2State, one_token: bool, return_state: bool = True):
        """The model itself, on checked inputs: a piece of l tokens (b, l), or one token (b,) through
        each mixer's step(). embedding -> [residual += mixer(RMSNorm(residual))] x n_layer -> norm_f -> lm_head."""
        hidden = self.backbone.embedding(input_ids)  # (b, l, d) or (b, d)
        residual = _at_least_fp32(hidden) if self.config.residual_in_fp32 else hidden
        conv, ssm = [], []
        for i, block in enumerate(self.backbone.layers):
            out, c, s = block.mixer(block.norm(residual), state.conv[i], state.ssm[i], return_state, one_token)
            residual = residual + out
            conv.append(c)
            ssm.append(s)
        logits = _at_least_fp32(self.lm_head(self.backbone.norm_f(residual)))
        n = 1 if one_token else input_ids.shape[1]
        return logits, (Mamba2State(conv, ssm, state.seqlen + n) if return_state else None)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None):
        """Prefill with forward(), then sample one token at a time with step().

        temperature 0 means greedy (argmax); top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches top_p (nucleus). Only real vocabulary ids
        (< vocab_size) are ever produced. Returns (b, l + max_new_tokens) token ids.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        logits, state = self(input_ids)
        logits, out = logits[:, -1], [input_ids]
        for i in range(max_new_tokens):
            token = sample(logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:  # sampled ids are valid: skip step()'s checks (a GPU sync)
                logits, state = self._run(token, state, one_token=True)
        return torch.cat(out, dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, **overrides) -> "Mamba2LM":
        """Load a local checkpoint directory in the state-spaces (mamba_ssm) or Hugging Face layout.

        The directory holds config.json and one of model.safetensors, a sharded
        model.safetensors.index.json, or pytorch_model.bin (read with weights_only=True). No network:
        fetch checkpoints with your own tools. overrides replace config fields (e.g. chunk_size=64).
        Missing or unexpected keys, shape mismatches, corrupt files, a folder holding two layouts and
        an interrupted save are errors that name the file and the problem.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a checkpoint directory")
        config = dataclasses.replace(config_from_dict(_read_json(config_file)), **overrides)
        model = cls(config)
        state_dict = {"backbone.embedding.weight" if k == "backbone.embeddings.weight" else k: v
                      for k, v in _read_weights(path).items()}
        expected = model.state_dict()
        if config.tie_embeddings:  # a tied lm_head is the embedding; a copy in the file is dropped
            expected.pop("lm_head.weight")
            state_dict.pop("lm_head.weight", None)
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
        bad = [k for k, v in state_dict.items() if not v.is_floating_point()]
        if missing or unexpected or shapes or bad:
            raise ValueError(f"checkpoint {path} does not match its config:\n  missing keys: {missing}\n"
                             f"  unexpected keys: {unexpected}\n  shape mismatches: {shapes}\n  not float: {bad}")
        model.load_state_dict(state_dict, strict=False)  # strict check done above (tied lm_head)
        return model.to(dtype) if dtype is not None else model


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
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------------
# 6. Loading checkpoints: config translation, weight files, a checked safetensors reader
# --------------------------------------------------------------------------------------------------

# Hugging Face Mamba2Config name -> our (mamba_ssm) name
HF_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
            "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
            "n_groups": "ngroups", "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps",
            "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
            "time_step_limit": "dt_limit", "use_bias": "bias", "use_conv_bias": "conv_bias",
            "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}
# mamba_ssm's Mamba2 constructor arguments (ssm_cfg) we support (same names as ours)
SSM_CFG_NAMES = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_min", "dt_max",
                 "dt_init_floor", "dt_limit", "A_init_range", "bias", "conv_bias")
# mamba_ssm options that change the architecture: supported only at these values
_SSM_CFG_FIXED = {"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False,
                  "d_ssm": None, "activation": "silu"}
_SSM_CFG_IGNORED = {"dt_init", "dt_scale", "use_mem_eff_path", "process_group", "sequence_parallel",
                    "device", "dtype", "layer_idx"}  # initialization/runtime details with no effect on the function
MANIFEST = "checkpoint.json"  # written last by checkpoints.save_pretrained: which files, their sha256


def config_from_dict(raw: dict) -> Mamba2Config:
    """A Mamba2Config from a config.json of either layout (detected by its keys)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    if "d_model" in raw:  # state-spaces / mamba_ssm
        ssm_cfg = raw.get("ssm_cfg") or {}
        if not isinstance(ssm_cfg, dict) or ssm_cfg.get("layer") != "Mamba2":
            raise ValueError(f"ssm_cfg.layer is {ssm_cfg.get('layer') if isinstance(ssm_cfg, dict) else ssm_cfg!r}: "
                             "only Mamba2 checkpoints are supported")
        for key, value in _SSM_CFG_FIXED.items():
            if key in ssm_cfg and ssm_cfg[key] != value:
                raise ValueError(f"unsupported ssm_cfg.{key}={ssm_cfg[key]!r} (minimamba implements {value!r})")
        unknown = set(ssm_cfg) - set(SSM_CFG_NAMES) - set(_SSM_CFG_FIXED) - _SSM_CFG_IGNORED
        if unknown:
            raise ValueError(f"unknown ssm_cfg keys {sorted(unknown)}")
        if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
            raise ValueError("hybrid checkpoints (MLP or attention layers) are not supported")
        if raw.get("rms_norm", True) is not True:
            raise ValueError("rms_norm=False (LayerNorm blocks) is not supported")
        kwargs = {k: ssm_cfg[k] for k in SSM_CFG_NAMES if k in ssm_cfg}
        kwargs.update({k: raw[k] for k in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple",
                                           "residual_in_fp32", "tie_embeddings") if k in raw})
        if "norm_epsilon" in raw:
            kwargs["norm_eps"] = raw["norm_epsilon"]
        return Mamba2Config(**kwargs)
    if "hidden_size" in raw:  # Hugging Face Mamba2ForCausalLM (vocab_size is already padded)
        if raw.get("model_type", "mamba2") != "mamba2":
            raise ValueError(f"model_type is {raw.get('model_type')!r}, expected 'mamba2'")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported (Mamba-2 uses silu)")
        kwargs = {ours: _json_float(raw[theirs]) for theirs, ours in HF_NAMES.items() if theirs in raw}
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
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    return [_json_float(v) for v in value] if isinstance(value, list) else value


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_weights(path: Path) -> dict:
    """{name: tensor} from the one weight layout of a folder (a checkpoints.save_pretrained manifest,
    when there is one, names the files and their sha256; an interrupted save has an incomplete one)."""
    files = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin") if (path / f).is_file()]
    if (path / MANIFEST).is_file():
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("complete") is not True:
            raise ValueError(f"{path / MANIFEST} says an earlier save into {path} was interrupted: the folder "
                             "may mix old and new files; save again")
        for name, digest in manifest["files"].items():
            if not (path / name).is_file() or sha256_of(path / name) != digest:
                raise ValueError(f"{path / name} is missing or is not the file {path / MANIFEST} names (sha256 differs)")
        files = [f for f in files if f in manifest["files"]]
    if len(files) > 1:
        raise ValueError(f"{path} holds {' and '.join(files)}: which weights are current is ambiguous; keep one")
    if not files:
        raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if files[0] == "pytorch_model.bin":
        try:
            weights = torch.load(path / files[0], map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # the file asks to build objects other than tensors: refused
            raise pickle.UnpicklingError(f"{path / files[0]}: refused, it holds more than tensors: {e}") from None
        except Exception as e:
            raise ValueError(f"{path / files[0]} is not a readable torch checkpoint: {e}") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(f"{path / files[0]} must hold a dict of tensors")
        return weights
    if files[0] == "model.safetensors":
        return read_safetensors(path / files[0])
    index = _read_json(path / files[0])
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path / files[0]} has no weight_map of tensor name -> shard file")
    weights = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise ValueError(f"{path / files[0]} names shard {shard!r}: shards must be files inside {path}")
        part = read_safetensors(path / shard)
        if set(part) & set(weights) or any(weight_map.get(k) != shard for k in part):
            raise ValueError(f"{path / shard} holds tensors that another shard also holds or that "
                             f"{files[0]} assigns elsewhere: {sorted(k for k in part if weight_map.get(k) != shard or k in weights)[:5]}")
        weights.update(part)
    if set(weights) != set(weight_map):
        raise ValueError(f"{path / files[0]} lists tensors no shard holds: {sorted(set(weight_map) - set(weights))[:5]}")
    return weights


# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian bytes. (https://github.com/huggingface/safetensors)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """Read a .safetensors file into {name: tensor} on the CPU (no third-party package needed).

    The header is checked against the file before anything is read or allocated: its length, each
    entry's dtype and shape, offsets inside the data section, no overlaps, bytes = numel * itemsize.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        def bad(why):
            return ValueError(f"{path} is not a valid safetensors file: {why}")

        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if not 0 < header_len <= size - 8:
            raise bad(f"header length {header_len} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        base, data_len, spans = 8 + header_len, size - 8 - header_len, []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or info.get("dtype") not in ST_DTYPES:
                raise bad(f"tensor {name!r} has no supported dtype ({info.get('dtype') if isinstance(info, dict) else info!r})")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                    and isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
                raise bad(f"tensor {name!r} needs a shape of ints >= 0 and data_offsets [start, end], got {info}")
            start, end = offsets
            nbytes = math.prod(shape) * ST_DTYPES[info["dtype"]].itemsize
            if not 0 <= start <= end <= data_len or end - start != nbytes:
                raise bad(f"tensor {name!r} ({info['dtype']} {shape}: {nbytes} bytes) has data_offsets {offsets} "
                          f"outside the {data_len}-byte data section or of the wrong size")
            spans.append((start, end, name))
        for (_, end1, name1), (start2, _, name2) in zip(sorted(spans), sorted(spans)[1:]):
            if start2 < end1:
                raise bad(f"the data of tensors {name1!r} and {name2!r} overlap")
        out = {}
        for start, end, name in spans:
            f.seek(base + start)
            data = bytearray(f.read(end - start))
            dtype = ST_DTYPES[header[name]["dtype"]]
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(header[name]["shape"])
    return out


if __name__ == "__main__":  # a tour in a few seconds: python minimamba.py
    import time

    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=256, n_layer=4, vocab_size=256, d_state=64, headdim=32, chunk_size=64)).eval()
    print(f"Mamba2LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 4096))
        t0 = time.perf_counter()
        logits, state = model(ids)
        t1 = time.perf_counter()
        print(f"forward, l = 4096: {4096 / (t1 - t0):,.0f} tokens/s")
        first, state = model(ids[:, :1000])
        rest, _ = model(ids[:, 1000:1064], state)
        print(f"streaming: 1000 tokens then 64 more = one call, max |diff| {(rest - logits[:, 1000:1064]).abs().max():.1e}")
        out = model.generate(ids[:, :16], 64, temperature=1.0, top_k=20)
        print(f"generate 64 tokens (prefill 16) in {time.perf_counter() - t1:.2f} s: {out[0, 16:32].tolist()}")
