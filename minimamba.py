"""minimamba: Mamba-2 in one file of pure PyTorch.

A Mamba-2 language model that loads the official checkpoints (state-spaces/mamba2-* and Hugging Face Mamba2ForCausalLM
layouts) and reproduces their logits. Copy this file alone and it works: it imports only torch and the standard library,
and the code you read is the code that runs (minimamba_kernels.py installs a faster scan and conv, mitigations.py wraps the scan:
both plug in through `mixer.scan` and `mixer.conv`, one way).

Papers
    [SSD]     Dao & Gu, "Transformers are SSMs", arXiv 2405.21060 (Mamba-2; Listing 1 is the SSD scan).
    [Stuffed] Chen et al., "Stuffed Mamba", arXiv 2410.07145 (state collapse: why this file exposes the state).

Reading order: 1. Mamba2Config -> 2. ssd_step, ssd (the recurrence: one token; chunked, SSD steps 1-4) -> 3. DefaultScan
(the plug-in point) -> 4. Mamba2Mixer (in_proj -> conv -> SSM -> gated norm -> out_proj) -> 5. Mamba2LM (embedding ->
blocks -> norm_f -> tied lm_head; streaming forward, step, generate) -> 6. loading checkpoints.

Glossary (dimension letters in shapes and einsum strings; [SSD] symbols in brackets)
    b batch          l sequence length [T]    d d_model [D]     h heads = d_inner / p
    p headdim [P]    n d_state [N]            g ngroups (heads sharing B, C)   k d_conv   q chunk_size [Q]
    c chunks = ceil(l / q)   s a source position in a chunk

The state space model of one head (a P x N matrix state S), [SSD] eq. (1) / [Stuffed] sec. 2:
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        (decay alpha_t = exp(dt_t A) in (0, 1))
    y_t = S_t C_t + D * x_t
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# === 1. Configuration ================================================================================
@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 hyper-parameters with mamba_ssm's names and defaults; only d_model, n_layer and vocab_size
    are required. Derived sizes are properties (a config cannot disagree with itself). Types are strict
    (a JSON "false" is not a bool, "0.001" not a float) and floats finite (dt_limit's high may be inf)."""
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
            if type(value) not in (int, float) or math.isnan(value) or finite and math.isinf(value):  # bool: no
                raise ValueError(f"Mamba2Config.{name} must be a {'finite ' if finite else ''}number, got {value!r}")
            return float(value)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Mamba2Config.{f.name} must be a positive int, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise ValueError(f"Mamba2Config.{f.name} must be true or false (a bool), got {v!r}")
            if f.type == "float":
                number(f.name, v)
            if f.type.startswith("tuple"):  # JSON gives lists: keep tuples, so the config stays hashable
                if not isinstance(v, (tuple, list)) or len(v) != 2:
                    raise ValueError(f"Mamba2Config.{f.name} must be a (low, high) pair, got {v!r}")
                object.__setattr__(self, f.name, (number(f.name, v[0]), number(f.name, v[1], f.name != "dt_limit")))
        for ok, name, rule in [(self.d_inner % self.headdim == 0, "headdim", f"to divide d_inner = {self.d_inner}"),
                               (self.nheads % self.ngroups == 0, "ngroups", f"to divide nheads = {self.nheads}"),
                               (0 < self.dt_min <= self.dt_max, "dt_min", f"0 < dt_min <= dt_max = {self.dt_max}"),
                               (self.dt_init_floor > 0, "dt_init_floor", "> 0"),
                               (0 <= self.dt_limit[0] < self.dt_limit[1], "dt_limit", "0 <= low < high"),
                               (0 < self.A_init_range[0] <= self.A_init_range[1], "A_init_range", "0 < low <= high"),
                               (self.norm_eps > 0, "norm_eps", "> 0")]:
            if not ok:
                raise ValueError(f"Mamba2Config.{name} needs {rule}, got {getattr(self, name)}")

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
        return -(-self.vocab_size // self.pad_vocab_size_multiple) * self.pad_vocab_size_multiple


# === 2. The SSM scan: one token (the recurrence) and a whole sequence (chunked SSD) ==================
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:  # SSM state math runs in float32 at least; float64 stays
    return torch.float64 if dtype == torch.float64 else torch.float32

def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:  # in float32, or float64 if it is float64
    return t.to(_compute_dtype(t.dtype))

def _heads_from_groups(t, nheads: int) -> torch.Tensor:  # (..., g, n) -> (..., h, n): head i reads group i // (h / g)
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)

def check_scan_inputs(x, dt, A, B, C, D=None, state=None, chunk_size=None, step=False):
    """Validate a scan's inputs: x (b, l, h, p), dt (b, l, h), A (h,) or per token (b, l, h), B and C (b, l, g, n),
    D (h,), state (b, h, p, n); for a step, the same without l. Returns (b, l, h, p, g, n) (l = 1 for a step)."""
    lead, what = ("(b, h", "step") if step else ("(b, l, h", "scan")
    if not all(isinstance(t, torch.Tensor) for t in (x, dt, A, B, C)):
        raise TypeError(f"x, dt, A, B, C must be tensors, got {', '.join(type(t).__name__ for t in (x, dt, A, B, C))}")
    if x.dim() != (3 if step else 4) or 0 in x.shape or not x.is_floating_point():
        raise ValueError(f"x must be a non-empty floating-point {lead}, p) tensor, got {x.dtype} {tuple(x.shape)}")
    (b, h, p), l, seq = (x.shape, 1, ()) if step else ((x.shape[0], *x.shape[2:]), x.shape[1], (x.shape[1],))
    (g, n), shape = (B.shape[-2:] if B.dim() >= 2 else (0, 0)), lambda t: tuple(t.shape)
    for ok, msg in [(shape(dt) == (b, *seq, h), f"dt must be {lead}) = {(b, *seq, h)}, got {shape(dt)}"),
                    (shape(A) in ((h,), (b, *seq, h)), f"A must be (h,) = ({h},) or {(b, *seq, h)}, got {shape(A)}"),
                    (B.dim() == x.dim() and tuple(B.shape[:-2]) == (b, *seq) and g > 0 and h % g == 0,
                     f"B must be {lead[:-3]}, g, n) with g dividing h = {h}, got {tuple(B.shape)}"),
                    (tuple(C.shape) == tuple(B.shape), f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}"),
                    (D is None or tuple(D.shape) == (h,), f"D must be (h,) = ({h},), got {getattr(D, 'shape', D)}")]:
        if not ok:
            raise ValueError(msg)
    if state is not None and not isinstance(state, torch.Tensor):  # e.g. a mitigation's state outside its block
        raise TypeError(f"state must be a (b, h, p, n) tensor, got a {type(state).__name__}: a state made inside "
                        "a mitigations block continues only inside the same kind of block")
    if state is not None and (tuple(state.shape) != (b, h, p, n) or state.device != x.device):
        raise ValueError(f"the {what}'s state must be (b, h, p, n) = {(b, h, p, n)} on {x.device}, got "
                         f"{tuple(state.shape)} on {state.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return b, l, h, p, g, n

def ssd_step(x, dt, A, B, C, *, D=None, state=None):
    """One token of the recurrence, O(1) in the sequence length (step() and generate() use it).
    x (b, h, p); dt (b, h) > 0; A (h,) or (b, h) < 0; B, C (b, g, n); D (h,) or None; state (b, h, p, n)
    or None (zeros). Returns y (b, h, p) in x.dtype and the new state (b, h, p, n) in float32 (or 64)."""
    b, _, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, state, step=True)
    ct = _compute_dtype(x.dtype)
    xf, dtf, state = x.to(ct), dt.to(ct), (x.new_zeros(b, h, p, n, dtype=ct) if state is None else state.to(ct))
    # S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;   y_t = S_t C_t + D x_t
    state = state * torch.exp(dtf * A.to(ct))[..., None, None] + torch.einsum(
        "bh,bhp,bhn->bhpn", dtf, xf, _heads_from_groups(B.to(ct), h))
    y = torch.einsum("bhpn,bhn->bhp", state, _heads_from_groups(C.to(ct), h))
    return (y if D is None else y + D.to(ct)[:, None] * xf).to(x.dtype), state

def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf for i < j: exp(segsum(a))
    is [SSD]'s 1-semiseparable mask L. A masked cumsum, never exp(cs_i) * exp(-cs_j), which overflows."""
    ones = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device)
    x = a[..., None].expand(*a.shape, a.shape[-1]).masked_fill(~ones.tril(-1), 0)  # x[..., i, j] = a_i for i > j
    return torch.cumsum(x, dim=-2).masked_fill(~ones.tril(), -math.inf)  # sum_{j < m <= i} a_m

def ssd(x, dt, A, B, C, *, chunk_size, D=None, initial_state=None, return_final_state=True):
    """The chunked SSD scan, [SSD] Listing 1, in its four numbered steps; exact for any length. x (b, l, h, p); dt
    (b, l, h) step sizes Delta > 0 (after softplus); A (h,) negative rates, or per token (b, l, h) (how a mitigation
    changes the decay); B, C (b, l, g, n); D (h,) or None; chunk_size q: any positive int (the result does not
    depend on it); initial_state (b, h, p, n) or None (zeros); return_final_state=False when nobody reads it.
    Returns y (b, l, h, p) in x.dtype and the final state (b, h, p, n) in float32 (float64 stays)."""
    b, l, h, p, g, n = check_scan_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    ct, q = _compute_dtype(x.dtype), min(chunk_size, l)  # a chunk longer than the input is the input
    # Discretize: X = x * dt (what gets written), a = dt * A (log of the decay alpha).
    X = x.to(ct) * dt.to(ct)[..., None]  # (b, l, h, p)
    a = dt.to(ct) * A.to(ct)  # (b, l, h)
    Bh, Ch = _heads_from_groups(B.to(ct), h), _heads_from_groups(C.to(ct), h)  # (b, l, h, n)
    # Pad l to whole chunks with zeros: a padded step has dt = 0, it neither decays nor writes (state exact).
    pad, c = (-l) % q, -(-l // q)
    X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
    X, Bh, Ch = (t.reshape(b, c, q, h, t.shape[-1]) for t in (X, Bh, Ch))  # (b, c, q, h, .)
    a = F.pad(a, (0, 0, 0, pad)).reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b, h, c, q)

    # Step 1 (diagonal blocks, within a chunk): Y_diag = (C B^T o L) X, L = exp(segsum(a)).
    L = torch.exp(segsum(a))  # (b, h, c, q, q)
    Y, S = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X), None
    # One chunk from a zero state whose final state nobody reads (plain training at T <= q): step 1, the
    # quadratic ("attention-like") form, is the whole answer; steps 2-4 would build a state to throw away.
    if c > 1 or initial_state is not None or return_final_state:
        # Step 2 (chunk states): S_c = sum_s exp(a_cumsum[last] - a_cumsum[s]) X_s B_s^T.
        decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, q)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, X)
        # Step 3 (between chunks): S_{c+1} = exp(sum of a over chunk c) S_c + states_c, states_in[c] entering c.
        S = x.new_zeros(b, h, p, n, dtype=ct) if initial_state is None else initial_state.to(ct)
        chunk_decay = torch.exp(a_cumsum[..., -1])  # (b, h, c)
        states_in = []
        for i in range(c):
            states_in.append(S)
            S = chunk_decay[:, :, i, None, None] * S + states[:, i]
        # Step 4 (off-diagonal blocks): the entering state read out, Y_off = exp(a_cumsum) * (C S_in).
        Y = Y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, torch.stack(states_in, dim=1), torch.exp(a_cumsum))
    y = Y.reshape(b, c * q, h, p)[:, :l] + (0 if D is None else D.to(ct)[:, None] * x.to(ct))
    return y.to(x.dtype), (S if return_final_state else None)


# === 3. The SSM of a layer as a replaceable object: the hook minimamba_kernels.py and mitigations.py use =======
class DefaultScan:
    """A Mamba2Mixer's SSM as a replaceable object, `mixer.scan`: chunked() runs a piece of a sequence, step() one token
    (dt softplus-ed and clamped, A = -exp(A_log) in float32). minimamba_kernels.py installs a faster one with the same methods;
    a mitigation wraps whatever is there. Its state: any object with detach() (Mamba2State carries it unchanged)."""
    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):  # shapes as ssd()
        return ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=state, return_final_state=return_state)

    def step(self, x, dt, A, B, C, D, state):  # shapes as ssd_step()
        return ssd_step(x, dt, A, B, C, D=D, state=state)


# === 4. One Mamba-2 layer ============================================================================
class RMSNorm(nn.Module):
    """out = x / sqrt(mean(x^2 over each group of group_size channels (default: all)) + eps) * weight, in fp32.
    Mamba-2's output norm is its gated form, gate BEFORE the norm (mamba_ssm's norm_before_gate=False), per
    group as in mamba_ssm (Hugging Face's older code normalized all of d_inner: different when ngroups > 1):
        x = y * silu(z);  out = x / sqrt(mean(x^2 over each group of d_inner / ngroups channels) + eps) * weight"""
    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z=None):
        x = _at_least_fp32(x) if z is None else _at_least_fp32(x) * F.silu(_at_least_fp32(z))  # (..., dim)
        x = x.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (x.flatten(-2) * _at_least_fp32(self.weight)).to(self.weight.dtype)

def causal_conv_silu(xBC, past, weight, bias):
    """silu of the causal depthwise conv over time of new raw inputs xBC (b, l, c) after the k-1 before
    them, past (b, k-1, c) (zeros at the start); weight (k, c) one row per tap; bias (c,) or None:
        out_t = silu(bias + sum_{j<k} weight[j] * xpad_{t+j}),   xpad = [past | xBC], token t = xpad_{t+k-1}
    k shifted multiply-adds in the (b, l, c) layout (no transposes). Returns (b, l, c)."""
    xpad, (k, l) = torch.cat([past, xBC], dim=1), (weight.shape[0], xBC.shape[1])
    out = sum(xpad[:, j:j + l] * weight[j] for j in range(k))
    return F.silu(out if bias is None else out + bias)

class Mamba2Mixer(nn.Module):
    """One Mamba-2 layer, [SSD] sec. 7 (the parallel Mamba-2 block), with mamba_ssm's parameter names:
        1. z, xBC, dt = in_proj(u)                       split as [z | xBC | dt]
        2. xBC = silu(causal depthwise conv1d(xBC))      x, B, C = split(xBC)  (after the conv)  self.conv
        3. dt = softplus(dt + dt_bias);  A = -exp(A_log)
        4. y = SSM(x, dt, A, B, C) + D x                 self.scan (section 3)
        5. out = out_proj(RMSNorm(y * silu(z)))          per group of channels"""
    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        cfg, h = config, config.nheads
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + h, bias=cfg.bias)
        # depthwise, one length-k filter per channel: an nn.Conv1d for the official names and init, run by self.conv
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias, self.A_log, self.D = (nn.Parameter(torch.empty(h)) for _ in range(3))  # see _init_weights
        self.norm = RMSNorm(cfg.d_inner, cfg.norm_eps, group_size=cfg.d_inner // cfg.ngroups)  # gated, per group
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.scan = DefaultScan()
        self.conv = causal_conv_silu

    def forward(self, u, conv_state=None, ssm_state=None, return_state=True, one_token=False):
        """A piece of a sequence u (b, l, d), or with one_token one token u (b, d) through scan.step (O(1)). conv_state
        (b, conv_dim, k): the last k raw (pre-conv) xBC inputs, or None (zeros); ssm_state: what self.scan keeps
        or None; return_state=False: nobody reads the states after this piece, so they are not built.
        Returns out (b, l, d), conv_state, ssm_state."""
        cfg = self.config
        z, xBC, dt = torch.split(self.in_proj(u[:, None] if one_token else u),
                                 [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)  # (b, l, .)
        # Causal conv: left context is the last k-1 raw inputs of the previous piece (zeros at the start).
        past = (xBC.new_zeros(xBC.shape[0], cfg.d_conv - 1, cfg.conv_dim) if conv_state is None
                else conv_state[:, :, 1:].transpose(1, 2).to(xBC.dtype))  # (b, k-1, conv_dim)
        taps = self.conv1d.weight[:, 0].T.contiguous()  # (k, conv_dim): one contiguous row per tap
        x, B, C = torch.split(self.conv(xBC, past, taps, self.conv1d.bias),
                              [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        x, B, C = x.unflatten(-1, (cfg.nheads, cfg.headdim)), *(t.unflatten(-1, (cfg.ngroups, -1)) for t in (B, C))
        dt = F.softplus(_at_least_fp32(dt) + _at_least_fp32(self.dt_bias))  # (b, l, h), SSM parameters in fp32
        if cfg.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*cfg.dt_limit)
        A = -torch.exp(_at_least_fp32(self.A_log))  # (h,)
        y, ssm_state = (self.scan.step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, ssm_state) if one_token else
                        self.scan.chunked(x, dt, A, B, C, self.D, ssm_state, cfg.chunk_size, return_state))
        out = self.out_proj(self.norm((y[:, None] if one_token else y).flatten(-2), z))  # (b, l, d)
        if return_state:  # the last k raw inputs, (b, conv_dim, k)
            conv_state = torch.cat([past, xBC[:, -cfg.d_conv:]], dim=1)[:, -cfg.d_conv:].transpose(1, 2)
        return out[:, 0] if one_token else out, (conv_state if return_state else None), ssm_state


# === 5. The language model ===========================================================================
@dataclass
class Mamba2State:
    """What the model remembers of the tokens it has read, per layer: conv, the last k raw (pre-conv) xBC inputs
    (b, conv_dim, k); ssm, the scan's state ((b, h, p, n) float32 by default, None = zeros; a mitigation's
    scan keeps its own object); seqlen, tokens read (bookkeeping only)."""
    conv: list = field(default_factory=list)
    ssm: list = field(default_factory=list)
    seqlen: int = 0

    def detach(self) -> "Mamba2State":  # a copy cut from the autograd graph (truncated backpropagation through time)
        cut = lambda s: None if s is None else s.detach()  # noqa: E731
        return Mamba2State([cut(c) for c in self.conv], [cut(s) for s in self.ssm], self.seqlen)

class Mamba2LM(nn.Module):
    """Mamba-2 LM: embedding -> n_layer x [residual += mixer(norm(residual))] -> norm_f -> lm_head (tied). It streams:
    the returned state passed into the next call continues the sequence exactly (bounded memory)."""
    def __init__(self, config: Mamba2Config):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"Mamba2LM needs a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = nn.ModuleDict(dict(  # official names: backbone.{embedding, layers.{i}.{norm, mixer}, norm_f}
            embedding=nn.Embedding(config.padded_vocab_size, config.d_model),
            layers=nn.ModuleList(nn.ModuleDict(dict(norm=RMSNorm(config.d_model, config.norm_eps),  # pre-norm block
                                                    mixer=Mamba2Mixer(config, i))) for i in range(config.n_layer)),
            norm_f=RMSNorm(config.d_model, config.norm_eps)))
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The official (mamba_ssm) initialization: dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        floored at dt_init_floor; A_log = log U(A_init_range); D = 1; embedding N(0, 0.02); biases 0; out_proj
        kaiming-uniform / sqrt(n_layer) (GPT-2's residual scaling); in_proj and conv1d PyTorch's default."""
        cfg, h = self.config, self.config.nheads
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for m in (block.mixer for block in self.backbone.layers):
            dt = torch.empty(h).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max)).exp().clamp(min=cfg.dt_init_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            m.A_log.copy_(torch.log(torch.empty(h).uniform_(*cfg.A_init_range)))
            m.D.fill_(1.0)
            [nn.init.zeros_(bias) for bias in (m.in_proj.bias, m.out_proj.bias) if bias is not None]
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
            for p in (m.dt_bias, m.A_log, m.D):
                p._no_weight_decay = True  # the official marker: exclude from weight decay

    def _checked_state(self, input_ids, state, ndim):
        """Check input_ids ((b, l) or (b,) ids on the model's device) and state (None or this model's Mamba2State)."""
        cfg, what, dev = self.config, "(b, l)" if ndim == 2 else "(b,)", self.lm_head.weight.device
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids (an int64 or int32 tensor {what}), got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != ndim or input_ids.numel() == 0 or input_ids.device != dev:
            raise ValueError(f"input_ids must have shape {what} with at least one token on the model's device ({dev}); "
                             f"got {tuple(input_ids.shape)} on {input_ids.device}")
        if input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {input_ids.min().item()} to "
                             f"{input_ids.max().item()}")
        if state is None:
            return Mamba2State([None] * cfg.n_layer, [None] * cfg.n_layer, 0)
        if not isinstance(state, Mamba2State):
            raise TypeError(f"state must be a Mamba2State (returned by forward/step), got {type(state).__name__}")
        if len(state.conv) != cfg.n_layer or len(state.ssm) != cfg.n_layer:
            raise ValueError(f"state has {len(state.conv)} layers, the model has {cfg.n_layer}")
        want = (input_ids.shape[0], cfg.conv_dim, cfg.d_conv)
        for conv in state.conv:
            if conv is not None and (tuple(conv.shape) != want or conv.device != input_ids.device):
                raise ValueError(f"state's conv part is {tuple(conv.shape)} on {conv.device}; this model and input "
                                 f"need (b, conv_dim, d_conv) = {want} on {input_ids.device}")
        return state

    def forward(self, input_ids: torch.Tensor, state: Mamba2State | None = None, return_state: bool = True):
        """input_ids (b, l), any l >= 1; state from an earlier call or None; return_state=False when nobody
        reads the state after this call (plain training): it is not built and None comes back instead.
        Returns logits (b, l, padded_vocab_size) (float32; float64 for a float64 model) and the state."""
        return self._run(input_ids, self._checked_state(input_ids, state, 2), False, return_state)

    def step(self, input_ids: torch.Tensor, state: Mamba2State | None):
        """One token per sequence, O(1) in the context length: input_ids (b,), state from forward()
        (prefill), step() or None. Returns logits (b, padded_vocab_size) and the new state."""
        return self._run(input_ids, self._checked_state(input_ids, state, 1), True)

    def _run(self, input_ids, state: Mamba2State, one_token: bool, return_state: bool = True):
        """The layers on checked inputs: a piece (b, l), or one token (b,) through each mixer's recurrent step."""
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
        """Prefill with forward(), then sample one token at a time with step(): temperature 0 is greedy;
        top_k keeps the k most likely tokens; top_p the smallest set whose probability reaches top_p
        (nucleus). Only real vocabulary ids (< vocab_size) come out. Returns (b, l + max_new_tokens)."""
        num = lambda v: type(v) in (int, float)  # noqa: E731  (bool is not a number here)
        for name, value, ok, expected in [
                ("max_new_tokens", max_new_tokens, type(max_new_tokens) is int and max_new_tokens >= 0, "an int >= 0"),
                ("temperature", temperature, num(temperature) and 0 <= temperature < math.inf, "a finite number >= 0"),
                ("top_k", top_k, top_k is None or type(top_k) is int and top_k >= 1, "a positive int or None"),
                ("top_p", top_p, top_p is None or num(top_p) and 0 < top_p <= 1, "in (0, 1] or None")]:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        logits, state = self(input_ids)
        logits, out = logits[:, -1], [input_ids]
        for i in range(int(max_new_tokens)):
            token = sample(logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:  # sampled ids are valid: skip step()'s checks (a GPU sync)
                logits, state = self._run(token, state, one_token=True)
        return torch.cat(out, dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, **overrides) -> "Mamba2LM":
        """Load a local checkpoint folder, state-spaces (mamba_ssm) or Hugging Face layout: config.json and
        model.safetensors, a sharded model.safetensors.index.json or pytorch_model.bin (weights_only). No
        network: fetch checkpoints with your own tools. overrides replace config fields (e.g. chunk_size=64)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: expected a checkpoint folder")
        model = cls(dataclasses.replace(config_from_dict(_read_json(path / "config.json")), **overrides))
        weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in _read_weights(path).items()}
        expected = model.state_dict()
        if model.config.tie_embeddings:  # a tied lm_head is the embedding; a copy in the file is dropped
            expected.pop("lm_head.weight")
            weights.pop("lm_head.weight", None)
        problems = {"missing keys": sorted(set(expected) - set(weights)),
                    "unexpected keys": sorted(set(weights) - set(expected)),
                    "shape mismatches": [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                                         for k, v in expected.items() if k in weights and weights[k].shape != v.shape],
                    "not floating point": [k for k, v in weights.items() if not v.is_floating_point()]}
        if any(problems.values()):
            raise ValueError(f"checkpoint {path} does not match its config:" + "".join(
                f"\n  {what}: {found}" for what, found in problems.items() if found))
        model.load_state_dict(weights, strict=False)  # strict check done above (tied lm_head)
        return model.to(dtype=dtype) if dtype is not None else model

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


# === 6. Loading checkpoints: config translation, weight files, a checked safetensors reader ==========
# Hugging Face Mamba2Config name -> ours (mamba_ssm's); ssm_cfg (mamba_ssm's Mamba2 arguments) uses our names
HF_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
            "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
            "n_groups": "ngroups", "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps",
            "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
            "time_step_limit": "dt_limit", "use_bias": "bias", "use_conv_bias": "conv_bias",
            "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings"}
SSM_CFG_NAMES = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_min", "dt_max",
                 "dt_init_floor", "dt_limit", "A_init_range", "bias", "conv_bias")
# ssm_cfg options that change the architecture (supported at these values only), and ones without effect
_SSM_CFG_FIXED = {"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False,
                  "d_ssm": None, "activation": "silu"}
_SSM_CFG_IGNORED = {"dt_init", "dt_scale", "use_mem_eff_path", "process_group", "sequence_parallel", "device",
                    "dtype", "layer_idx"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MANIFEST = "checkpoint.json"  # written first and last by checkpoints.save_pretrained: {"complete", "files"}

def config_from_dict(raw: dict) -> Mamba2Config:
    """A Mamba2Config from a config.json of either layout (told apart by their keys)."""
    if not isinstance(raw, dict) or not ("d_model" in raw or "hidden_size" in raw):
        raise ValueError("config.json must hold a JSON object: a mamba_ssm config (d_model, ...) or a Hugging "
                         f"Face Mamba2 config (hidden_size, ...); got {str(raw)[:80]}")
    if "hidden_size" in raw:  # Hugging Face Mamba2ForCausalLM (vocab_size is already padded)
        if raw.get("model_type", "mamba2") != "mamba2" or raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"model_type={raw.get('model_type')!r}, hidden_act={raw.get('hidden_act')!r}: "
                             "expected a mamba2 model with silu")
        config = Mamba2Config(**{"ngroups": 8, "tie_embeddings": False, "pad_vocab_size_multiple": 1,  # HF defaults
                                 **{ours: raw[theirs] for theirs, ours in HF_NAMES.items() if theirs in raw}})
        if raw.get("num_heads", config.nheads) != config.nheads:
            raise ValueError(f"num_heads={raw['num_heads']} but expand * hidden_size / head_dim = {config.nheads}")
        return config
    ssm_cfg = raw.get("ssm_cfg") if isinstance(raw.get("ssm_cfg"), dict) else {}  # state-spaces / mamba_ssm
    unsupported = [f"ssm_cfg.{k}={ssm_cfg.get(k)!r} (minimamba implements {v!r})" for k, v in _SSM_CFG_FIXED.items()
                   if ssm_cfg.get(k, None if k == "layer" else v) != v]  # "layer" must be there
    unknown = set(ssm_cfg) - set(SSM_CFG_NAMES) - set(_SSM_CFG_FIXED) - _SSM_CFG_IGNORED
    unsupported += [f"unknown ssm_cfg keys {sorted(unknown)}"] * bool(unknown)
    unsupported += ["MLP or attention layers"] * bool(raw.get("d_intermediate") or raw.get("attn_layer_idx"))
    unsupported += ["LayerNorm blocks (rms_norm=False)"] * (raw.get("rms_norm", True) is not True)
    if unsupported:
        raise ValueError("only Mamba2 checkpoints are supported; this config has " + "; ".join(unsupported))
    kwargs = {k: ssm_cfg[k] for k in SSM_CFG_NAMES if k in ssm_cfg}
    kwargs.update({k: raw[k] for k in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple",
                                       "residual_in_fp32", "tie_embeddings") if k in raw})
    return Mamba2Config(**kwargs, **({"norm_eps": raw["norm_epsilon"]} if "norm_epsilon" in raw else {}))

def _read_json(path: Path):  # the file's JSON; transformers >= 5 writes inf as {"__float__": "Infinity"}
    try:
        return json.loads(path.read_text(), object_hook=lambda d: float(d["__float__"]) if set(d) == {"__float__"}
                          else d)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None

def _read_bin(file: Path) -> dict:
    """A torch.save'd dict of tensors, unpickled with weights_only=True: a file asking to build other objects
    (which a plain torch.load would run as code) is refused."""
    try:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{file}: refused, it holds more than tensors: {e}") from None
    except Exception as e:
        raise ValueError(f"{file} is not a readable torch checkpoint: {e}") from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{file} must hold a dict of tensors")
    return weights

def _read_weights(path: Path) -> dict:
    """{name: tensor} from the one weight layout of a folder. A manifest (written by checkpoints.save_pretrained
    before its first file and after its last) says whether that save completed, and which files it wrote."""
    files = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if (path / MANIFEST).is_file():
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("complete") is not True or not isinstance(
                manifest.get("files"), list):
            raise ValueError(f"{path / MANIFEST} says a save into {path} was interrupted: the folder may mix old "
                             "and new files; save again")
        files = [f for f in files if f in manifest["files"]]
    if len(files) != 1:
        raise (ValueError(f"{path} holds {' and '.join(files)}: which weights are current is ambiguous; keep one")
               if files else FileNotFoundError(f"{path} has none of {', '.join(WEIGHT_FILES)}"))
    file = path / files[0]
    if file.name != "model.safetensors.index.json":
        return read_safetensors(file) if file.name == "model.safetensors" else _read_bin(file)
    index = _read_json(file)  # a sharded checkpoint: every shard a file in this folder, every tensor in one shard
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v not in (".", "..")
                                                   for v in weight_map.values()):
        raise ValueError(f"{file} needs a weight_map of tensor name -> shard file; shards must be files inside {path}")
    weights = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(path / shard)
        if stray := sorted(k for k in part if weight_map.get(k) != shard or k in weights):
            raise ValueError(f"{path / shard} holds tensors that another shard also holds or that {file.name} "
                             f"assigns elsewhere: {stray[:5]}")
        weights.update(part)
    if set(weights) != set(weight_map):
        raise ValueError(f"{file} lists tensors no shard holds: {sorted(set(weight_map) - set(weights))[:5]}")
    return weights

# safetensors: 8-byte little-endian header length n, a JSON header {name: {dtype, shape, data_offsets}} of n
# bytes, then the raw little-endian data (https://github.com/huggingface/safetensors)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}

def read_safetensors(path) -> dict:
    """Read a .safetensors file into {name: tensor} on the CPU (no third-party package needed). The header is
    checked against the file before anything is read or allocated: its length; every entry's dtype, shape and
    data_offsets inside the data section, holding exactly numel * itemsize bytes; no two entries overlap."""
    path, out, uints = Path(path), {}, lambda v: isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)
    size, nbytes = path.stat().st_size, lambda info: math.prod(info["shape"]) * ST_DTYPES[info["dtype"]].itemsize
    bad = lambda why: ValueError(f"{path} is not a valid safetensors file: {why}")  # noqa: E731
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
        if not 0 < n <= size - 8:
            raise bad(f"its header length ({n}) does not fit in its {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            if not (isinstance(info, dict) and info.get("dtype") in ST_DTYPES and uints(info.get("shape"))
                    and uints(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
                raise bad(f"tensor {name!r} needs a known dtype, a shape of ints >= 0 and data_offsets; got {info}")
        entries = sorted((*info["data_offsets"], name, info) for name, info in header.items())
        for i, (start, end, name, info) in enumerate(entries):
            if not start <= end <= size - 8 - n or end - start != nbytes(info):
                raise bad(f"tensor {name!r} ({info}) must hold exactly its bytes inside the {size - 8 - n}-byte data")
            if i and start < entries[i - 1][1]:
                raise bad(f"the data of tensors {entries[i - 1][2]!r} and {name!r} overlap")
        for start, end, name, info in entries:
            f.seek(8 + n + start)
            buf, dtype = bytearray(f.read(end - start)), ST_DTYPES[info["dtype"]]
            out[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).view(info["shape"])
    return out
