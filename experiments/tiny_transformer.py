"""A tiny causal Transformer: the attention baseline of the experiments (not part of the library).

Why it is here
    The forgetting-curve paper (arXiv 2410.04727) contrasts Transformers, which copy perfectly up to
    a length ("fine-grained memory"), with RNNs such as Mamba, which it finds have none. To ask the
    same question at toy scale we train this model on exactly the same byte data as the Mamba-2
    models (experiments/forgetting_curves.py) and measure both with forgetting_curve.py.

Design (GPT-2 style, pre-norm, as small as it can be)
    token embedding (tied with the output head) -> n_layer x [x + Attn(LN(x)); x + MLP(LN(x))] -> LN -> logits
    Attention is causal, multi-head, with rotary position embeddings (RoPE, Su et al. arXiv 2104.09864):
    no learned position table, so any length runs (extrapolating beyond the training length is
    exactly what the forgetting curve probes). Attention is O(l^2): the sweeps cap its lengths.

Reading order: TransformerConfig -> rope -> Block -> TinyTransformer (forward, save_pretrained,
from_pretrained: the same names as minimamba's, so experiments/train.py checkpoints either model)

Glossary
    b batch, l sequence length, d d_model, h heads, e head size (d / h), V vocabulary
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import atomic_write

ROPE_BASE = 10000.0  # RoPE frequency base (RoFormer / Llama default)
MLP_RATIO = 4  # hidden width of the MLP = MLP_RATIO * d_model (GPT-2)
INIT_STD = 0.02  # normal init of linear and embedding weights (GPT-2)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.pt"


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256  # V (bytes)
    d_model: int = 64  # d
    n_layer: int = 2
    n_head: int = 4  # h; head size e = d_model / n_head

    def __post_init__(self):
        if min(self.vocab_size, self.d_model, self.n_layer, self.n_head) < 1:
            raise ValueError(f"all TransformerConfig fields must be >= 1, got {self}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_head={self.n_head} heads of an "
                             "even size (RoPE rotates pairs of channels)")


def rope(q: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: rotate channel pairs (2i, 2i+1) of q (b, h, l, e) by angle t * base^(-2i/e)."""
    b, h, l, e = q.shape
    inv = ROPE_BASE ** (-torch.arange(0, e, 2, device=q.device, dtype=torch.float32) / e)  # (e/2,)
    ang = torch.arange(l, device=q.device, dtype=torch.float32)[:, None] * inv[None]  # (l, e/2)
    cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
    q1, q2 = q[..., 0::2], q[..., 1::2]  # (b, h, l, e/2)
    return torch.stack([q1 * cos - q2 * sin, q1 * sin + q2 * cos], -1).flatten(-2)  # (b, h, l, e)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.h = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, MLP_RATIO * d), nn.GELU(), nn.Linear(MLP_RATIO * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # 3x (b,h,l,e)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # (b, h, l, e)
        x = x + self.proj(y.transpose(1, 2).reshape(b, l, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """forward(ids (b, l)) -> logits (b, l, V) float32. Stateless: the whole context in one call."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (b, l), got shape {tuple(input_ids.shape)}")
        x = self.embedding(input_ids)  # (b, l, d)
        for blk in self.blocks:
            x = blk(x)
        return (self.ln_f(x) @ self.embedding.weight.T).float()  # (b, l, V), tied head

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model.pt, then config.json, each atomically (a temporary file, then a rename)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / WEIGHTS_FILE, lambda f: torch.save(self.state_dict(), f))
        atomic_write(path / CONFIG_FILE, lambda f: f.write(json.dumps(asdict(self.config)).encode()))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TinyTransformer":
        """Load a save_pretrained folder (tensors only: torch.load(weights_only=True))."""
        path = Path(path)
        model = cls(TransformerConfig(**json.loads((path / CONFIG_FILE).read_text())))
        model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return model.eval()
