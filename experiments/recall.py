"""Multi-query associative recall (MQAR) on bytes: a recall task whose load k can exceed a state's capacity.

What this is
    Support code (no experiment of its own) for asking how many associations a state can hold. A row
    shows k key-value pairs, then filler, then asks for all k keys again in a random order; the model
    is scored only on the value it predicts after each queried key. A single passkey (about 17 bits)
    never strains a state of thousands of floats; k pairs of 7-bit keys and values do, for k large
    enough, so the largest k recalled is a capacity readout.

Papers
    Zoology (Arora et al., arXiv 2312.04927): MQAR, the associative-recall task that separates
    attention from gated convolutions / SSMs. Stuffed Mamba (arXiv 2410.07145): state capacity
    and the length T_forget past which a Mamba-2 model forgets; rows here are as long as the
    training length T, so the filler can put the queries at or beyond a model's T_forget.

Layout of a row of T + 1 bytes (inputs row[:-1], targets row[1:])
    [k1 v1 k2 v2 ... kk vk] [f f ... f] [q1 a1 q2 a2 ... qk ak]
     2k bytes: the pairs     T+1-4k filler  2k bytes: q = a permutation of the keys, a = its value
    Keys are distinct, drawn from KEY_BYTES; values from VALUE_BYTES; filler from FILLER_BYTES; the
    three ranges are disjoint, so a byte's role is readable from its value. Only the targets a_j
    (predicted at the input position of q_j) are in the loss and in the accuracy.
    Deviation from Zoology: queries sit in one block after the filler instead of at random positions
    (every query is then at least the filler's length from its pair: a controlled distance).

Reading order
    1. `MQARConfig`            k, T and the derived filler length
    2. `mqar_batch`            one batch: a pure function of (seed, step), like data.py's batches
    3. `mqar_loss`             cross-entropy on the value targets only
    4. `accuracy_by_k`, `largest_k_recalled`   the k-sweep readout

Glossary
    b  batch rows;  T  row length in inputs (training length);  k  key-value pairs per row
    F  filler bytes = T + 1 - 4k;  V  vocabulary (256 bytes)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import forgetting_curve as fc

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

VOCAB_SIZE = 256  # byte-level tokens (as data.py)
KEY_BYTES = (1, 96)  # keys are bytes in [1, 96): 95 distinct keys, so k <= 95 (0 = DOC_SEP is never used)
VALUE_BYTES = (96, 192)  # values are bytes in [96, 192) (need not be distinct across keys)
FILLER_BYTES = (192, 256)  # filler bytes in [192, 256): noise between the pairs and the queries
MAX_PAIRS = KEY_BYTES[1] - KEY_BYTES[0]  # k can be at most the number of distinct keys
MQAR_STREAM_ID = 4  # keeps MQAR's random stream apart from data.py (1, 3) and passkey.py (2)
EVAL_SEED = 10_007  # the evaluation rows' seed: a stream no training run (seed < 10_000) draws
RECALL_THRESHOLD = 0.95  # accuracy on the values that counts as "k recalled" (issue 22's 95%)


# ----------------------------------------------------------------------------------------------
# 1-2. the task
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MQARConfig:
    """One MQAR row shape. The filler fills what the pairs and queries leave of the row."""

    n_pairs: int  # k, key-value pairs per row (1..MAX_PAIRS)
    seq_len: int  # T, input tokens per row (the row holds T + 1 tokens)

    def __post_init__(self):
        if not 1 <= self.n_pairs <= MAX_PAIRS:
            raise ValueError(f"n_pairs (k) must be in 1..{MAX_PAIRS} (distinct keys in {KEY_BYTES}), "
                             f"got {self.n_pairs}")
        if self.n_filler < 0:
            raise ValueError(f"a row of seq_len={self.seq_len} (+1) tokens cannot hold k={self.n_pairs} pairs and "
                             f"their queries (4k = {4 * self.n_pairs} tokens): use seq_len >= {4 * self.n_pairs - 1}")

    @property
    def n_filler(self) -> int:
        """F = T + 1 - 4k filler bytes between the pairs and the queries."""
        return self.seq_len + 1 - 4 * self.n_pairs

    @property
    def query_start(self) -> int:
        """Row index of the first query key q1 (= 2k + F)."""
        return 2 * self.n_pairs + self.n_filler


def mqar_batch(step: int, *, seed: int, batch_size: int, cfg: MQARConfig,
               rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and loss mask for one optimizer step: a pure function of (seed, step, cfg).

    Args:
        step: optimizer step.  seed: run seed.  batch_size: global rows b.
        cfg: k and T.  rows: a data-parallel rank's slice of the global rows; None = all.
    Returns:
        tokens LongTensor (b_rows, T + 1): inputs [:, :-1], targets [:, 1:]
        mask   BoolTensor (b_rows, T): True at the targets that are values a_j (k per row)
    """
    k, Fl = cfg.n_pairs, cfg.n_filler
    rng = np.random.default_rng([seed, step, MQAR_STREAM_ID, k, cfg.seq_len])
    # 1. distinct keys per row: the first k of a random permutation of the key range
    keys = np.argsort(rng.random((batch_size, MAX_PAIRS)), axis=1)[:, :k] + KEY_BYTES[0]  # (b, k)
    values = rng.integers(VALUE_BYTES[0], VALUE_BYTES[1], size=(batch_size, k))  # (b, k)
    filler = rng.integers(FILLER_BYTES[0], FILLER_BYTES[1], size=(batch_size, Fl))  # (b, F)
    # 2. queries: the same keys in a random order per row, each followed by its value
    order = np.argsort(rng.random((batch_size, k)), axis=1)  # (b, k)
    q_keys = np.take_along_axis(keys, order, axis=1)
    q_values = np.take_along_axis(values, order, axis=1)
    pairs = np.stack([keys, values], axis=2).reshape(batch_size, 2 * k)  # (b, 2k): k1 v1 k2 v2 ...
    queries = np.stack([q_keys, q_values], axis=2).reshape(batch_size, 2 * k)  # (b, 2k): q1 a1 ...
    tokens = np.concatenate([pairs, filler, queries], axis=1)  # (b, T + 1)
    # 3. the loss mask: target index t predicts row[t + 1]; a_j sits at row query_start + 2j + 1
    mask = np.zeros((batch_size, cfg.seq_len), dtype=bool)  # (b, T)
    mask[:, cfg.query_start + 2 * np.arange(k)] = True
    if rows is not None:
        tokens, mask = tokens[rows], mask[rows]
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask)


# ----------------------------------------------------------------------------------------------
# 3. the loss
# ----------------------------------------------------------------------------------------------

def mqar_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over the value targets only.

    Args:
        logits (b, T, V'), V' >= 256 (a padded vocabulary is cut to the bytes); targets (b, T); mask (b, T) bool.
    """
    if logits.shape[:2] != targets.shape or mask.shape != targets.shape:
        raise ValueError(f"logits (b, T, V), targets (b, T) and mask (b, T) must agree, got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
    return F.cross_entropy(logits[..., :VOCAB_SIZE][mask].float(), targets[mask])


# ----------------------------------------------------------------------------------------------
# 4. the k-sweep
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy_by_k(model: nn.Module, ks: Sequence[int], *, seq_len: int, n_rows: int = 64,
                  eval_batch: int = 16, seed: int = EVAL_SEED) -> dict[int, float]:
    """Share of value targets predicted exactly (argmax over the 256 bytes), per k.

    The rows come from `mqar_batch` at step 0 of `seed` (a stream no training run draws), so every
    model is scored on the same rows. The model is called as model(inputs (b, T)) and may return
    logits, a tuple starting with them, or an object with .logits (forgetting_curve.logits_of).

    Args:
        model: a causal LM over bytes.  ks: the k values to sweep.  seq_len: T of the rows.
        n_rows: rows per k.  eval_batch: rows per model call.  seed: the rows' seed.
    Returns:
        {k: accuracy in [0, 1]}
    """
    if not ks or any(int(k) != k for k in ks):
        raise ValueError(f"ks must be a non-empty list of integers, got {ks}")
    if n_rows < 1 or eval_batch < 1:
        raise ValueError(f"n_rows and eval_batch must be >= 1, got {n_rows}, {eval_batch}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = {}
    for k in ks:
        cfg = MQARConfig(n_pairs=int(k), seq_len=seq_len)
        tokens, mask = mqar_batch(0, seed=seed, batch_size=n_rows, cfg=cfg)
        correct = 0
        for i in range(0, n_rows, eval_batch):
            ids = tokens[i:i + eval_batch, :-1].to(device)  # (b, T)
            logits = fc.logits_of(model(ids), ids)  # (b, T, V')
            pred = logits[..., :VOCAB_SIZE].argmax(-1).cpu()  # (b, T)
            m = mask[i:i + eval_batch]
            correct += int((pred[m] == tokens[i:i + eval_batch, 1:][m]).sum())
        out[int(k)] = correct / int(mask.sum())
    return out


def largest_k_recalled(acc_by_k: Mapping[int, float], threshold: float = RECALL_THRESHOLD) -> int:
    """The largest swept k such that it and every smaller swept k reach `threshold`; 0 if k_min fails.

    Requiring every smaller k to pass keeps a lucky large k (or a noisy sweep) from counting as
    capacity: recall is expected to fall with k, and a k past the first failure is not "recalled".
    """
    if not acc_by_k:
        raise ValueError("acc_by_k is empty: sweep at least one k")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    best = 0
    for k in sorted(acc_by_k):
        if acc_by_k[k] < threshold:
            break
        best = k
    return best
