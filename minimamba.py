"""minimamba: Mamba-2 in one file of pure PyTorch.

A Mamba-2 language model that loads the official checkpoints (state-spaces/mamba2-* and Hugging
Face Mamba2ForCausalLM) and reproduces their logits. It imports only torch and the standard library:
copy this file alone and it works. The code you read is the code that runs: minimamba_kernels.py (a
faster scan and conv) and mitigations.py (changed scans) plug into two attributes of every layer,
`mixer.scan` and `mixer.conv`; this file imports neither.

Papers
    [SSD]     Dao & Gu, "Transformers are SSMs", arXiv 2405.21060 (Mamba-2; Listing 1: the SSD scan).
    [Stuffed] Chen et al., "Stuffed Mamba", arXiv 2410.07145 (state collapse: why the model hands
              its state back to the caller).

Reading order
    1. Mamba2Config       hyper-parameters, with the papers' symbols
    2. ssd                the chunked scan of a whole sequence, in SSD's four steps
    3. ssd_step           the same recurrence, one token at a time
    4. Mamba2Mixer        one layer: in_proj -> conv -> SSM -> gated norm -> out_proj
    5. Mamba2LM           embedding -> layers -> norm_f -> lm_head; forward and step
    6. generate, sample   prefill with forward, then one token at a time
    7. loading            config.json and the weights of either official layout
    8. checks             the argument checks of the public functions

Glossary (the letters of shapes and einsum strings; [SSD]'s symbols in brackets)
    b  batch                         l  sequence length [T]; in a chunk, the target position
    h  heads = d_inner / p           s  a source position in a chunk
    p  headdim [P]                   n  d_state, the state size per channel [N]
    g  ngroups: heads sharing B, C   q  chunk_size [Q]
    c  chunks = ceil(l / q)          d  d_model;  k  d_conv, the width of the causal conv

The state space model of one head, with a P x N matrix state S ([SSD] eq. 1, [Stuffed] sec. 2):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        (decay alpha_t = exp(dt_t * A) in (0, 1))
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


# ==== 1. Configuration ===========================================================================

@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 hyper-parameters, with mamba_ssm's names and defaults; only d_model, n_layer and
    vocab_size are required. Derived sizes are properties: a config cannot disagree with itself."""
    d_model: int                 # d, width of the residual stream
    n_layer: int                 # number of Mamba-2 blocks
    vocab_size: int              # tokens the tokenizer can produce (the embedding is padded)
    d_state: int = 128           # n, [SSD] N: state size per channel
    d_conv: int = 4              # k, width of the causal depthwise convolution
    expand: int = 2              # e: d_inner = expand * d_model
    headdim: int = 64            # p, [SSD] P: channels per head
    ngroups: int = 1             # g: heads that share one B and C (like grouped-query attention)
    chunk_size: int = 256        # q, [SSD] Q: block size of the scan (results do not depend on it)
    pad_vocab_size_multiple: int = 16  # embedding rows: vocab_size rounded up to this multiple
    norm_eps: float = 1e-5       # epsilon of every RMSNorm
    dt_min: float = 1e-3         # initial step sizes Delta are log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # ... and at least dt_init_floor
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Delta is clamped to this range (default: none)
    A_init_range: tuple[float, float] = (1.0, 16.0)  # initial -A = exp(A_log) is uniform in this range
    bias: bool = False           # bias in in_proj and out_proj (False in every released checkpoint)
    conv_bias: bool = True       # bias in conv1d
    residual_in_fp32: bool = True  # keep the residual stream in float32
    tie_embeddings: bool = True  # lm_head shares the embedding matrix

    def __post_init__(self):
        _check_config(self)  # strict types; JSON's lists become tuples (a config stays hashable)

    @property
    def d_inner(self) -> int:  # e * d
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:  # h
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:  # the channels that go through the conv: x, B and C
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self) -> int:  # rows of the embedding and of the logits
        multiple = self.pad_vocab_size_multiple
        return -(-self.vocab_size // multiple) * multiple


# ==== 2. The chunked SSD scan of a whole sequence ([SSD] sec. 6, Listing 1) =====================

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state math runs in float32 at least; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_compute_dtype(t.dtype))


def _heads_from_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): head i reads group i // (h / g) (repeat_interleave, not tile)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T):  out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf
    above the diagonal, so that exp(segsum(a)) is [SSD]'s 1-semiseparable mask L. A masked cumsum,
    never exp(cumsum_i) * exp(-cumsum_j), which overflows."""
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    x = a[..., None].expand(*a.shape, T)          # x[..., i, j] = a_i
    x = x.masked_fill(~ones.tril(-1), 0)          # only i > j
    out = torch.cumsum(x, dim=-2)                 # sum_{j < m <= i} a_m
    return out.masked_fill(~ones.tril(), -math.inf)


def ssd(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_final_state=True):
    """The recurrence of the module docstring over a whole sequence, chunked ([SSD] Listing 1);
    exact for any length and any chunk size q.

    Args: x (b, l, h, p); dt (b, l, h), the step sizes Delta > 0 (after softplus); A (h,) negative
        rates, or one per token (b, l, h) (how mitigations change the decay); B, C (b, l, g, n);
        D (h,) or None; initial_state (b, h, p, n) or None (zeros); return_final_state=False when
        nobody reads the final state (it is then not built).
    Returns: y (b, l, h, p) in x.dtype, and the final state (b, h, p, n) in float32 (float64
        stays) or None.
    """
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct = _compute_dtype(x.dtype)
    q = min(chunk_size, l)          # a chunk longer than the input is the input
    c = -(-l // q)                  # number of chunks
    pad = c * q - l

    # Discretize: X = x * dt is what a token writes, a = dt * A the log of its decay alpha.
    X = x.to(ct) * dt.to(ct)[..., None]           # (b, l, h, p)
    a = dt.to(ct) * A.to(ct)                      # (b, l, h)
    Bh = _heads_from_groups(B.to(ct), h)          # (b, l, h, n)
    Ch = _heads_from_groups(C.to(ct), h)          # (b, l, h, n)

    # Pad l to whole chunks with zeros: a padded step has dt = 0, so it neither decays nor writes.
    X, Bh, Ch = [F.pad(t, (0, 0, 0, 0, 0, pad)).reshape(b, c, q, h, -1) for t in (X, Bh, Ch)]
    a = F.pad(a, (0, 0, 0, pad)).reshape(b, c, q, h).permute(0, 3, 1, 2)     # (b, h, c, q)
    a_cumsum = torch.cumsum(a, dim=-1)                                       # (b, h, c, q)

    # Step 1, the diagonal blocks (within each chunk):  Y_diag = (C B^T o L) X,  L = exp(segsum(a))
    L = torch.exp(segsum(a))                                                 # (b, h, c, q, q)
    Y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)         # (b, c, q, h, p)

    # One chunk from a zero state whose final state nobody reads (plain training at l <= q):
    # step 1 is the whole answer, and steps 2-4 would build a state only to throw it away.
    S = None
    if c > 1 or initial_state is not None or return_final_state:
        # Step 2, what each chunk writes:  states_c = sum_s exp(a_cumsum[last] - a_cumsum[s]) X_s B_s^T
        decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)              # (b, h, c, q)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, X)  # (b, c, h, p, n)

        # Step 3, between chunks:  S_{c+1} = exp(sum of a over chunk c) * S_c + states_c
        chunk_decay = torch.exp(a_cumsum[..., -1])                           # (b, h, c)
        S = x.new_zeros(b, h, p, n, dtype=ct)
        if initial_state is not None:
            S = initial_state.to(ct)
        entering = []                             # entering[c]: the state before chunk c
        for i in range(c):
            entering.append(S)
            S = chunk_decay[:, :, i, None, None] * S + states[:, i]

        # Step 4, the off-diagonal blocks, the entering state read out:  Y_off = exp(a_cumsum) C S_in
        S_in = torch.stack(entering, dim=1)                                  # (b, c, h, p, n)
        Y = Y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, S_in, torch.exp(a_cumsum))

    y = Y.reshape(b, c * q, h, p)[:, :l]          # (b, l, h, p)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)      # the skip connection D * x
    if not return_final_state:
        S = None
    return y.to(x.dtype), S


# ==== 3. The recurrence, one token at a time ([SSD] eq. 1) ======================================

def ssd_step(x, dt, A, B, C, *, D=None, state=None):
    """One token of the recurrence, O(1) in the sequence length (step() and generate() use it).
    Args: x (b, h, p); dt (b, h) > 0; A (h,) or (b, h), negative; B, C (b, g, n); D (h,) or None;
        state (b, h, p, n) or None (zeros).
    Returns: y (b, h, p) in x.dtype, and the new state (b, h, p, n) in float32 (float64 stays)."""
    b, _, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, state, step=True)
    ct = _compute_dtype(x.dtype)
    xf, dtf = x.to(ct), dt.to(ct)                 # (b, h, p), (b, h)
    Bh = _heads_from_groups(B.to(ct), h)          # (b, h, n)
    Ch = _heads_from_groups(C.to(ct), h)          # (b, h, n)
    if state is None:
        state = x.new_zeros(b, h, p, n, dtype=ct)

    # S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    decay = torch.exp(dtf * A.to(ct))             # (b, h)
    state = state.to(ct) * decay[..., None, None] + torch.einsum("bh,bhp,bhn->bhpn", dtf, xf, Bh)
    # y_t = S_t C_t + D * x_t
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.to(ct)[:, None] * xf
    return y.to(x.dtype), state


# ==== 4. One Mamba-2 layer: the mixer ===========================================================

class DefaultScan:
    """The SSM of a layer as a replaceable object, `mixer.scan`: chunked() runs a piece of a
    sequence (as ssd), step() one token (as ssd_step). minimamba_kernels.py installs a faster one
    with the same two methods; a mitigation wraps whatever is there. Its state may be any object
    with detach()."""

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        return ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state,
                   return_final_state=return_state)

    def step(self, x, dt, A, B, C, D, state):
        return ssd_step(x, dt, A, B, C, D=D, state=state)


class RMSNorm(nn.Module):
    """RMSNorm in float32, optionally gated by z, per group of channels:
        x = y * silu(z)         (gate BEFORE the norm, as mamba_ssm's norm_before_gate=False)
        out = x / sqrt(mean(x^2 over each group of group_size channels) + eps) * weight
    The mixer normalizes per group of d_inner / ngroups channels, as mamba_ssm. Deviation from
    Hugging Face's older code, which normalized all of d_inner (different when g > 1)."""

    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z=None):
        x = _at_least_fp32(x)                                    # (..., dim)
        if z is not None:
            x = x * F.silu(_at_least_fp32(z))
        x = x.unflatten(-1, (-1, self.group_size))               # (..., groups, group_size)
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (x.flatten(-2) * _at_least_fp32(self.weight)).to(self.weight.dtype)


def causal_conv_silu(xBC, past, weight, bias):
    """The default `mixer.conv`: silu of the causal depthwise convolution over time,
        out_t = silu(bias + sum_{j<k} weight[j] * xpad_{t+j}),    xpad = [past | xBC]
    xBC (b, l, c) new raw inputs; past (b, k-1, c) the raw inputs before them (zeros at the
    start); weight (k, c) one row per tap; bias (c,) or None. Returns (b, l, c)."""
    k, l = weight.shape[0], xBC.shape[1]
    xpad = torch.cat([past, xBC], dim=1)                         # (b, k - 1 + l, c)
    out = sum(xpad[:, j:j + l] * weight[j] for j in range(k))
    if bias is not None:
        out = out + bias
    return F.silu(out)


class Mamba2Mixer(nn.Module):
    """One Mamba-2 layer ([SSD] sec. 7, the parallel Mamba-2 block) with mamba_ssm's names:
        1. z, xBC, dt = in_proj(u)                        split as [z | xBC | dt]
        2. x, B, C = split(silu(conv1d(xBC)))            causal, depthwise: self.conv
        3. dt = softplus(dt + dt_bias);  A = -exp(A_log)  in float32
        4. y = SSM(x, dt, A, B, C) + D * x               self.scan
        5. out = out_proj(RMSNorm(y * silu(z)))          gated, per group
    forward() runs a piece of a sequence, step() one token. Both carry two states: the conv state
    (b, conv_dim, k), the last k raw (pre-conv) xBC inputs, and the state of self.scan."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        cfg, h = config, config.nheads
        self.config = config
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + cfg.conv_dim + h, bias=cfg.bias)
        # one length-k filter per channel: an nn.Conv1d for the official names and init
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))  # set by Mamba2LM._init_weights
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = RMSNorm(cfg.d_inner, cfg.norm_eps, group_size=cfg.d_inner // cfg.ngroups)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.scan = DefaultScan()         # plug-in point of step 4
        self.conv = causal_conv_silu      # plug-in point of step 2

    def forward(self, u, conv_state=None, ssm_state=None, return_state=True):
        """A piece u (b, l, d) of a sequence; the states from the piece before, or None (zeros);
        return_state=False when nobody reads the states after it (they come back as None).
        Returns out (b, l, d), conv_state, ssm_state."""
        z, x, B, C, dt, A, conv_state = self._steps_1_to_3(u, conv_state)
        y, ssm_state = self.scan.chunked(x, dt, A, B, C, self.D, ssm_state,
                                         self.config.chunk_size, return_state)  # 4. (b, l, h, p)
        out = self.out_proj(self.norm(y.flatten(-2), z))                         # 5. (b, l, d)
        if not return_state:
            conv_state = None
        return out, conv_state, ssm_state

    def step(self, u, conv_state=None, ssm_state=None):
        """One token u (b, d), O(1) in the length of the context; the states as in forward().
        Returns out (b, d), conv_state, ssm_state."""
        z, x, B, C, dt, A, conv_state = self._steps_1_to_3(u[:, None], conv_state)
        y, ssm_state = self.scan.step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D,
                                      ssm_state)                        # 4. (b, h, p)
        out = self.out_proj(self.norm(y.flatten(-2), z[:, 0]))         # 5. (b, d)
        return out, conv_state, ssm_state

    def _steps_1_to_3(self, u, conv_state):
        """Steps 1-3 for a piece u (b, l, d): z (b, l, d_inner), x (b, l, h, p), B and C
        (b, l, g, n), dt (b, l, h), A (h,), and the new conv state (b, conv_dim, k)."""
        cfg, k = self.config, self.config.d_conv
        # 1. one projection, split as [z | xBC | dt]
        z, xBC, dt = torch.split(self.in_proj(u), [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)

        # 2. the causal conv continues from the last k-1 raw inputs of the previous piece
        if conv_state is None:
            past = xBC.new_zeros(xBC.shape[0], k - 1, cfg.conv_dim)  # (b, k-1, conv_dim)
        else:
            past = conv_state[:, :, 1:].transpose(1, 2).to(xBC.dtype)
        conv_state = torch.cat([past, xBC[:, -k:]], dim=1)[:, -k:].transpose(1, 2)
        taps = self.conv1d.weight[:, 0].T.contiguous()                # (k, conv_dim)
        xBC = self.conv(xBC, past, taps, self.conv1d.bias)
        x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state,
                                    cfg.ngroups * cfg.d_state], dim=-1)
        x = x.unflatten(-1, (cfg.nheads, cfg.headdim))                # (b, l, h, p)
        B = B.unflatten(-1, (cfg.ngroups, cfg.d_state))               # (b, l, g, n)
        C = C.unflatten(-1, (cfg.ngroups, cfg.d_state))               # (b, l, g, n)

        # 3. step sizes and rates, in float32 even in a half-precision model
        dt = F.softplus(_at_least_fp32(dt) + _at_least_fp32(self.dt_bias))  # (b, l, h)
        if cfg.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*cfg.dt_limit)
        A = -torch.exp(_at_least_fp32(self.A_log))                          # (h,)
        return z, x, B, C, dt, A, conv_state


# ==== 5. The language model =====================================================================

@dataclass
class Mamba2State:
    """What the model remembers of the tokens it has read, one entry per layer (None: zeros):
    conv, the last k raw (pre-conv) xBC inputs (b, conv_dim, k); ssm, the scan's state (b, h,
    p, n) in float32, or a mitigation's own object; seqlen, the tokens read (bookkeeping only)."""
    conv: list = field(default_factory=list)
    ssm: list = field(default_factory=list)
    seqlen: int = 0

    def detach(self) -> "Mamba2State":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        conv = [None if c is None else c.detach() for c in self.conv]
        ssm = [None if s is None else s.detach() for s in self.ssm]
        return Mamba2State(conv, ssm, self.seqlen)


class Mamba2LM(nn.Module):
    """The Mamba-2 language model, with the official parameter names:
        embedding -> n_layer x [residual += mixer(RMSNorm(residual))] -> RMSNorm (norm_f) -> lm_head
    lm_head is tied to the embedding; the residual stream is float32. The model streams: the state
    a call returns, passed into the next call, continues the sequence exactly."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        _check_is_config(config)
        self.config = config
        d, eps = config.d_model, config.norm_eps
        self.backbone = nn.ModuleDict(dict(
            embedding=nn.Embedding(config.padded_vocab_size, d),
            layers=nn.ModuleList(
                nn.ModuleDict(dict(norm=RMSNorm(d, eps), mixer=Mamba2Mixer(config, i)))
                for i in range(config.n_layer)),
            norm_f=RMSNorm(d, eps)))
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The official (mamba_ssm) initialization:
            dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], at least dt_init_floor
            A_log = log(U(A_init_range));  D = 1;  embedding N(0, 0.02);  biases 0
            out_proj: kaiming-uniform / sqrt(n_layer) (GPT-2's scaled residual initialization)
        in_proj and conv1d keep PyTorch's; dt_bias, A_log, D are excluded from weight decay."""
        cfg, h = self.config, self.config.nheads
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.backbone.layers:
            m = block.mixer
            log_dt = torch.empty(h).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max))
            dt = log_dt.exp().clamp(min=cfg.dt_init_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
            m.A_log.copy_(torch.log(torch.empty(h).uniform_(*cfg.A_init_range)))
            m.D.fill_(1.0)
            for linear in (m.in_proj, m.out_proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
            for param in (m.dt_bias, m.A_log, m.D):
                param._no_weight_decay = True  # the official marker

    def forward(self, input_ids: torch.Tensor, state: Mamba2State | None = None,
                return_state: bool = True):
        """input_ids (b, l), any l >= 1; state from an earlier call, or None to start;
        return_state=False when nobody reads the state after this call (plain training): it is
        then not built, and None comes back. Returns logits (b, l, padded_vocab_size), float32
        (float64 in a float64 model), and the state."""
        _check_ids_and_state(self, input_ids, state, ndim=2)
        if state is None:
            state = self._empty_state()
        residual = self._embed(input_ids)                            # (b, l, d)
        conv, ssm = [], []
        for i, block in enumerate(self.backbone.layers):
            out, c, s = block.mixer(block.norm(residual), state.conv[i], state.ssm[i], return_state)
            residual = residual + out
            conv.append(c)
            ssm.append(s)
        logits = self._logits(residual)
        if not return_state:
            return logits, None
        return logits, Mamba2State(conv, ssm, state.seqlen + input_ids.shape[1])

    def step(self, input_ids: torch.Tensor, state: Mamba2State | None):
        """One token per sequence, O(1) in the length of the context: input_ids (b,); state from
        forward() (the prefill), step() or None. Returns logits (b, padded_vocab_size), the state."""
        _check_ids_and_state(self, input_ids, state, ndim=1)
        return self._step(input_ids, state)

    def _step(self, input_ids, state):  # step() without its checks: generate() feeds it valid ids
        if state is None:
            state = self._empty_state()
        residual = self._embed(input_ids)                            # (b, d)
        conv, ssm = [], []
        for i, block in enumerate(self.backbone.layers):
            out, c, s = block.mixer.step(block.norm(residual), state.conv[i], state.ssm[i])
            residual = residual + out
            conv.append(c)
            ssm.append(s)
        return self._logits(residual), Mamba2State(conv, ssm, state.seqlen + 1)

    def _empty_state(self) -> Mamba2State:
        return Mamba2State([None] * self.config.n_layer, [None] * self.config.n_layer, 0)

    def _embed(self, input_ids):
        hidden = self.backbone.embedding(input_ids)
        if self.config.residual_in_fp32:
            hidden = _at_least_fp32(hidden)
        return hidden

    def _logits(self, residual):
        return _at_least_fp32(self.lm_head(self.backbone.norm_f(residual)))

    # ---- 6. Generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None):
        """Prefill with forward(), then sample one token at a time with step() (see sample()).
        Only real vocabulary ids (< vocab_size) come out. Returns (b, l + max_new_tokens)."""
        _check_generate_args(max_new_tokens, temperature, top_k, top_p)
        logits, state = self(input_ids)
        logits = logits[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            token = sample(logits[:, :self.config.vocab_size], temperature, top_k, top_p, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:  # the ids it sampled are valid: no checks (a GPU sync)
                logits, state = self._step(token, state)
        return torch.cat(out, dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, verify: bool = True,
                        **overrides) -> "Mamba2LM":
        """Load a local checkpoint folder of either official layout (section 7). A folder saved
        by checkpoints.save_pretrained has a manifest with the sha256 of every file, all verified
        first (verify=False skips this, e.g. after editing config.json by hand). overrides
        replace config fields (e.g. chunk_size=64). No network."""
        path = Path(path)
        _check_load_args(path, dtype)
        saved = verified_files(path) if verify else None
        config = config_from_dict(read_json(path / "config.json"))
        weights = read_weights(weight_file(path, saved))
        return build_model(cls, config, weights, path, dtype, **overrides)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (b, V), (b,): greedy at temperature 0, else drawn from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the nucleus,
    the smallest set of most likely tokens whose probability reaches top_p."""
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


# ==== 7. Loading the official checkpoints =======================================================
# Both folder layouts load into one module layout (the official parameter names, no key surgery):
#   state-spaces/mamba2-*  config.json in mamba_ssm's names (the Mamba2 options in "ssm_cfg") and
#                          pytorch_model.bin, with a tied copy of lm_head.weight
#   Hugging Face           config.json in Mamba2Config's names (vocab_size already padded) and
#                          model.safetensors; "backbone.embeddings" (plural), no tied lm_head
# checkpoints.load_pretrained also loads sharded checkpoints and checks every file further.

HF_NAMES = {  # Hugging Face config name -> ours (mamba_ssm's)
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
    "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
    "n_groups": "ngroups", "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps",
    "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
    "time_step_limit": "dt_limit", "use_bias": "bias", "use_conv_bias": "conv_bias",
    "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}
SSM_CFG_NAMES = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_min",
                 "dt_max", "dt_init_floor", "dt_limit", "A_init_range", "bias", "conv_bias")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MANIFEST = "checkpoint.json"  # checkpoints.save_pretrained's record: {"files": {name: sha256}}


def config_from_dict(raw: dict) -> Mamba2Config:
    """A Mamba2Config from a config.json of either layout (told apart by their keys)."""
    _check_config_json(raw)
    if "hidden_size" in raw:  # Hugging Face, whose defaults differ from mamba_ssm's
        kwargs = {"ngroups": 8, "tie_embeddings": False, "pad_vocab_size_multiple": 1}
        kwargs.update({ours: raw[theirs] for theirs, ours in HF_NAMES.items() if theirs in raw})
        config = Mamba2Config(**kwargs)
        if raw.get("num_heads", config.nheads) != config.nheads:
            raise ValueError(f"num_heads={raw['num_heads']} but expand * hidden_size / head_dim "
                             f"= {config.nheads}")
        return config
    top_level = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple",
                 "residual_in_fp32", "tie_embeddings")
    kwargs = {name: raw["ssm_cfg"][name] for name in SSM_CFG_NAMES if name in raw["ssm_cfg"]}
    kwargs.update({name: raw[name] for name in top_level if name in raw})
    if "norm_epsilon" in raw:
        kwargs["norm_eps"] = raw["norm_epsilon"]
    return Mamba2Config(**kwargs)


def read_json(path: Path):
    """A JSON file; transformers >= 5 writes infinity as {"__float__": "Infinity"}."""
    def floats(d):
        return float(d["__float__"]) if set(d) == {"__float__"} else d
    try:
        return json.loads(Path(path).read_text(), object_hook=floats)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def sha256_of(path) -> str:
    """The hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def verified_files(path: Path) -> list | None:
    """The files a save recorded in the folder's manifest (checkpoints.save_pretrained writes
    one), each checked against the sha256 it had when it was saved; None without a manifest."""
    if not (path / MANIFEST).is_file():
        return None
    manifest = read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{path / MANIFEST} records no sha256 of the saved files: save the model "
                         "again, or load it unverified with verify=False")
    for name, digest in files.items():
        if not (path / name).is_file() or sha256_of(path / name) != digest:
            raise ValueError(f"{path / name} is missing or is not the file that was saved (sha256 in "
                             f"{MANIFEST}): it was edited or damaged, or a save into {path} was "
                             "interrupted. Save the model again, or load the files as they are "
                             "with verify=False")
    return list(files)


def weight_file(path: Path, saved: list | None = None) -> Path:
    """The one weight file of a folder; among the saved files, if a manifest lists them."""
    names = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if saved is not None:
        names = [name for name in names if name in saved]
    if not names:
        raise FileNotFoundError(f"{path} has none of {', '.join(WEIGHT_FILES)}")
    if len(names) > 1:
        raise ValueError(f"{path} holds {' and '.join(names)}: which weights are current is "
                         "ambiguous; keep one")
    return path / names[0]


def read_weights(file: Path) -> dict:
    """{name: tensor} from model.safetensors or pytorch_model.bin (unpickled with
    weights_only=True: a file that asks to build any other object, as code would, is refused)."""
    if file.name == "model.safetensors.index.json":
        raise ValueError(f"{file.parent} holds a sharded checkpoint: load it with "
                         "checkpoints.load_pretrained")
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{file}: refused, it holds more than tensors: {e}") from None
    except Exception as e:
        raise ValueError(f"{file} is not a readable torch checkpoint: {e}") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{file} must hold a dict of tensors")
    return weights


# safetensors: an 8-byte little-endian header length n, a JSON header of n bytes, {name: {"dtype",
# "shape", "data_offsets": [start, end]}}, then the little-endian data the offsets point into
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """{name: tensor} on the CPU from a .safetensors file, without the safetensors package. It
    reads nothing outside the file, and a file that does not parse is an error naming it
    (checkpoints.read_safetensors checks every header entry before reading)."""
    path, out = Path(path), {}
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"a {n}-byte header does not fit in {size} bytes")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                start, end = info["data_offsets"]
                if not 0 <= start <= end <= size - 8 - n:
                    raise ValueError(f"tensor {name!r} lies outside the file")
                f.seek(8 + n + start)
                data = bytearray(f.read(end - start))
                dtype = ST_DTYPES[info["dtype"]]
                flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                out[name] = flat.view(info["shape"])
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, struct.error) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return out


def build_model(cls, config: Mamba2Config, weights: dict, path: Path, dtype=None, **overrides):
    """cls (Mamba2LM) with weights {name: tensor} of either layout loaded strictly: a missing,
    unexpected, misshapen or integer tensor is named, with path, the folder they came from."""
    model = cls(dataclasses.replace(config, **overrides))
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v  # HF's plural
               for k, v in weights.items()}
    expected = model.state_dict()
    if model.config.tie_embeddings:  # a tied lm_head is the embedding: a copy in the file is dropped
        expected.pop("lm_head.weight")
        weights.pop("lm_head.weight", None)
    problems = {
        "missing keys": sorted(set(expected) - set(weights)),
        "unexpected keys": sorted(set(weights) - set(expected)),
        "shape mismatches": [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                             for k, v in expected.items() if k in weights and weights[k].shape != v.shape],
        "not floating point": [k for k, v in weights.items() if not v.is_floating_point()]}
    if any(problems.values()):
        found = "".join(f"\n  {what}: {names}" for what, names in problems.items() if names)
        raise ValueError(f"checkpoint {path} does not match its config:{found}")
    model.load_state_dict(weights, strict=False)  # strict: checked above (a tied lm_head is absent)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


# ==== 8. Argument checks: what each public function refuses, with a message to act on ===========

def _check_config(config: Mamba2Config) -> None:
    """Strict field types (a JSON "false" is not a bool, "0.001" not a float, true not an int),
    finite floats (dt_limit's high may be inf), and the rules between fields."""
    def number(name, value, finite=True):
        if type(value) not in (int, float) or math.isnan(value) or (finite and math.isinf(value)):
            kind = "a finite number" if finite else "a number"
            raise ValueError(f"Mamba2Config.{name} must be {kind}, got {value!r}")
        return float(value)

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and (type(value) is not int or value < 1):
            raise ValueError(f"Mamba2Config.{f.name} must be a positive int, got {value!r}")
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"Mamba2Config.{f.name} must be true or false (a bool), got {value!r}")
        if f.type == "float":
            number(f.name, value)
        if f.type.startswith("tuple"):
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"Mamba2Config.{f.name} must be a (low, high) pair, got {value!r}")
            pair = (number(f.name, value[0]), number(f.name, value[1], f.name != "dt_limit"))
            object.__setattr__(config, f.name, pair)
    for ok, name, rule in [
            (config.d_inner % config.headdim == 0, "headdim", f"to divide d_inner = {config.d_inner}"),
            (config.nheads % config.ngroups == 0, "ngroups", f"to divide nheads = {config.nheads}"),
            (0 < config.dt_min <= config.dt_max, "dt_min", f"0 < dt_min <= dt_max = {config.dt_max}"),
            (config.dt_init_floor > 0, "dt_init_floor", "> 0"),
            (0 <= config.dt_limit[0] < config.dt_limit[1], "dt_limit", "0 <= low < high"),
            (0 < config.A_init_range[0] <= config.A_init_range[1], "A_init_range", "0 < low <= high"),
            (config.norm_eps > 0, "norm_eps", "> 0")]:
        if not ok:
            raise ValueError(f"Mamba2Config.{name} needs {rule}, got {getattr(config, name)}")


def check_scan_inputs(x, dt, A, B, C, D=None, state=None, chunk_size=None, step=False):
    """A scan's inputs: x (b, l, h, p), dt (b, l, h), A (h,) or (b, l, h), B and C (b, l, g, n)
    with g dividing h, D (h,), state (b, h, p, n); for a step, the same without l.
    Returns (b, l, h, p, g, n), with l = 1 for a step."""
    lead, what, ndim = ("(b, h", "step", 3) if step else ("(b, l, h", "scan", 4)
    if not all(isinstance(t, torch.Tensor) for t in (x, dt, A, B, C)):
        types = ", ".join(type(t).__name__ for t in (x, dt, A, B, C))
        raise TypeError(f"x, dt, A, B, C must be tensors, got {types}")
    if x.dim() != ndim or 0 in x.shape or not x.is_floating_point():
        raise ValueError(f"x must be a non-empty floating-point {lead}, p) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    b, h, p = x.shape[0], x.shape[-2], x.shape[-1]
    seq = tuple(x.shape[1:-2])                    # (l,), or () for a step
    g, n = tuple(B.shape[-2:]) if B.dim() >= 2 else (0, 0)
    for ok, message in [
            (dt.shape == (b, *seq, h), f"dt must be {lead}) = {(b, *seq, h)}, got {tuple(dt.shape)}"),
            (A.shape in ((h,), (b, *seq, h)), f"A must be (h,) = ({h},) or {(b, *seq, h)}, got "
                                              f"{tuple(A.shape)}"),
            (B.dim() == x.dim() and B.shape[:-2] == (b, *seq) and g > 0 and h % g == 0,
             f"B must be {lead[:-3]}, g, n) with g dividing h = {h}, got {tuple(B.shape)}"),
            (C.shape == B.shape, f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}"),
            (D is None or D.shape == (h,), f"D must be (h,) = ({h},), got {getattr(D, 'shape', D)}")]:
        if not ok:
            raise ValueError(message)
    if state is not None and not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a (b, h, p, n) tensor, got a {type(state).__name__}: a state "
                        "made inside a mitigations block continues only inside the same kind of block")
    if state is not None and (state.shape != (b, h, p, n) or state.device != x.device):
        raise ValueError(f"the {what}'s state must be (b, h, p, n) = {(b, h, p, n)} on {x.device}, "
                         f"got {tuple(state.shape)} on {state.device}")
    if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    l = 1 if step else x.shape[1]
    return b, l, h, p, g, n


def _check_is_config(config) -> None:
    if not isinstance(config, Mamba2Config):
        raise TypeError(f"Mamba2LM needs a Mamba2Config, got {type(config).__name__}")


def _check_ids_and_state(model: Mamba2LM, input_ids, state, ndim: int) -> None:
    """input_ids (b, l) or (b,), on the model's device; state None or one of this model's."""
    cfg, device = model.config, model.lm_head.weight.device
    what = "(b, l)" if ndim == 2 else "(b,)"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise TypeError(f"input_ids must hold integer token ids (an int64 or int32 tensor {what}), "
                        f"got {got}")
    if input_ids.dim() != ndim or input_ids.numel() == 0 or input_ids.device != device:
        raise ValueError(f"input_ids must have shape {what} with at least one token on the model's "
                         f"device ({device}); got {tuple(input_ids.shape)} on {input_ids.device}")
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {low} to {high}")
    if state is None:
        return
    if not isinstance(state, Mamba2State):
        raise TypeError(f"state must be a Mamba2State (returned by forward/step), got "
                        f"{type(state).__name__}")
    if len(state.conv) != cfg.n_layer or len(state.ssm) != cfg.n_layer:
        raise ValueError(f"state has {len(state.conv)} layers, the model has {cfg.n_layer}")
    want = (input_ids.shape[0], cfg.conv_dim, cfg.d_conv)
    for conv in state.conv:
        if conv is not None and (conv.shape != want or conv.device != input_ids.device):
            raise ValueError(f"state's conv part is {tuple(conv.shape)} on {conv.device}; this model "
                             f"and input need (b, conv_dim, d_conv) = {want} on {input_ids.device}")


def _check_generate_args(max_new_tokens, temperature, top_k, top_p) -> None:
    def number(v):  # a bool is not a number here
        return type(v) in (int, float)
    for name, value, ok, expected in [
            ("max_new_tokens", max_new_tokens, type(max_new_tokens) is int and max_new_tokens >= 0,
             "an int >= 0"),
            ("temperature", temperature, number(temperature) and 0 <= temperature < math.inf,
             "a finite number >= 0"),
            ("top_k", top_k, top_k is None or (type(top_k) is int and top_k >= 1),
             "a positive int or None"),
            ("top_p", top_p, top_p is None or (number(top_p) and 0 < top_p <= 1),
             "in (0, 1] or None")]:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_load_args(path: Path, dtype) -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"from_pretrained needs a torch.dtype (e.g. torch.float16) or None, got "
                        f"dtype={type(dtype).__name__} {dtype!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a checkpoint folder")


# mamba_ssm's Mamba2 options that change the architecture (implemented at these values only),
# and the ones without effect on the model
SSM_CFG_FIXED = {"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False,
                 "D_has_hdim": False, "d_ssm": None, "activation": "silu"}
SSM_CFG_IGNORED = {"dt_init", "dt_scale", "use_mem_eff_path", "process_group",
                   "sequence_parallel", "device", "dtype", "layer_idx"}


def _check_config_json(raw) -> None:
    """A config.json of either layout that describes a model this file implements."""
    if not isinstance(raw, dict) or not ("d_model" in raw or "hidden_size" in raw):
        raise ValueError("config.json must hold a JSON object: a mamba_ssm config (d_model, ...) or a "
                         f"Hugging Face Mamba2 config (hidden_size, ...); got {str(raw)[:80]}")
    if "hidden_size" in raw:
        model_type, act = raw.get("model_type", "mamba2"), raw.get("hidden_act", "silu")
        if model_type != "mamba2" or act != "silu":
            raise ValueError(f"model_type={model_type!r}, hidden_act={act!r}: expected a mamba2 model "
                             "with silu")
        return
    ssm_cfg, problems = raw.get("ssm_cfg"), []
    if not isinstance(ssm_cfg, dict):
        ssm_cfg = {}
    for key, value in SSM_CFG_FIXED.items():
        if ssm_cfg.get(key, None if key == "layer" else value) != value:  # "layer" must be given
            problems.append(f"ssm_cfg.{key}={ssm_cfg.get(key)!r} (minimamba implements {value!r})")
    unknown = set(ssm_cfg) - set(SSM_CFG_NAMES) - set(SSM_CFG_FIXED) - SSM_CFG_IGNORED
    if unknown:
        problems.append(f"unknown ssm_cfg keys {sorted(unknown)}")
    if raw.get("d_intermediate") or raw.get("attn_layer_idx"):
        problems.append("MLP or attention layers")
    if raw.get("rms_norm", True) is not True:
        problems.append("LayerNorm blocks (rms_norm=False)")
    if problems:
        raise ValueError("only Mamba2 checkpoints are supported; this config has " + "; ".join(problems))
