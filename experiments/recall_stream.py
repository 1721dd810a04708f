"""The recall stream: a stationary byte stream of key-value bindings that must be forgotten after T bytes.

Why this exists
    State collapse (Stuffed Mamba, arXiv 2410.07145) is a model that never learned to forget: trained on
    sequences its state can hold whole, it keeps everything, and far beyond its training length stale
    contents get in the way. To ask when a model learns to forget, the training task must (a) make the
    model use its whole window, (b) make stale contents harmful, and (c) be learned by a tiny model in
    minutes on a CPU. The repeat-span process (experiments/recipe.py) fails (c) at this size: over
    text the models barely copy from the far half of the window (issue 21), and over random bytes they
    do not leave the ln 256 plateau in 1500 steps (experiments/LOG.md, 2026-12-06 tuning). Recall of
    key-value pairs is learned in minutes (multi-query associative recall, Zoology, arXiv 2312.04927),
    so this process is a stream of it:

The process (one row; a slot is 2 bytes [key, value])
    A key is "live" if it was mentioned in the last max_lag bytes (its last mention's value byte lies
    at most max_lag bytes before the slot's value byte). For each slot s:
        with probability p_query, if any key is live:  a QUERY: a live key drawn uniformly, then the
            value of its last mention (the only predictable byte of the stream)
        otherwise:  a FRESH binding: a key drawn uniformly among the keys that are NOT live, then a
            new uniform value
    A fresh binding may reuse a key whose last mention is more than max_lag bytes old, with a new value:
    beyond max_lag a model that keeps old bindings holds two values for one key, and only the newer is
    right. An exact sliding window of max_lag bytes holds every binding the process ever asks for, so a
    model that keeps more than that can only lose by it (as in the repeat-span process), and every
    query's answer lies in the window: the task uses all of it. Stationary once the live set fills.

Gate (the model uses its whole window), as recipe.copy_margin but on query values
    far-query accuracy: argmax accuracy on query values whose binding lies in the far half of the window
    (lag in [max_lag / 2, max_lag]), inside the first T bytes from the zero state, minus the same model's
    accuracy on the same bytes reading only the last T / 8 bytes (none of their bindings is in it).

Reading order: StreamConfig -> stream_rows (the generator) -> StreamBatches (training batches, a pure
function of (seed, step)) -> probe_rows -> query_accuracy (the gate's accuracy)

Glossary
    T  max_lag, set to the model's training length      K  keys (KEY_BYTES)      b  rows   l  row length
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KEY_BYTES = (1, 192)  # keys are bytes in [1, 192): 191 keys (0 is the corpus's document separator)
VALUE_BYTES = (192, 256)  # values are bytes in [192, 256): 64 values, ln 64 = 4.16 nats when unknown
N_KEYS = KEY_BYTES[1] - KEY_BYTES[0]
STREAM_ID = 5  # keeps this process's random stream apart from data.py (1, 3), passkey (2), recall.py (4)
PROBE_SEED = 7_100_000  # the held-out probe's rows (training rows use seeds < 10_000)


@dataclass(frozen=True)
class StreamConfig:
    """The process. max_lag is the T of T_train: models are trained on rows of max_lag bytes."""

    max_lag: int  # T: a key stays live for this many bytes after its last mention
    p_query: float = 0.5  # probability that a slot asks for a live key's value

    def __post_init__(self):
        if self.max_lag < 2 or self.max_lag % 2:
            raise ValueError(f"max_lag must be an even number of bytes >= 2 (slots are 2 bytes), got {self.max_lag}")
        if self.max_lag // 2 >= N_KEYS:
            raise ValueError(f"max_lag {self.max_lag} keeps up to {self.max_lag // 2} keys live, but there are only "
                             f"{N_KEYS} keys: a fresh binding would find no free key (use max_lag < {2 * N_KEYS})")
        if not 0.0 <= self.p_query < 1.0:
            raise ValueError(f"p_query must be in [0, 1), got {self.p_query}")


@dataclass(frozen=True)
class StreamRows:
    """Rows of the process with what each byte is. All (b, l)."""

    ids: torch.Tensor  # long bytes
    query_value: torch.Tensor  # bool: the byte is a query's value (predictable from the window)
    lag: torch.Tensor  # long: for a query value, bytes back to its binding's value byte (0 elsewhere)


def stream_rows(cfg: StreamConfig, n_rows: int, length: int, rng: np.random.Generator) -> StreamRows:
    """n_rows rows of `length` bytes of the process (steps in the module docstring)."""
    n_slots = -(-length // 2)
    live_slots = cfg.max_lag // 2  # a mention at slot j is live at slot s iff s - j <= max_lag / 2
    ids = np.zeros((n_rows, 2 * n_slots), dtype=np.int64)
    is_query = np.zeros((n_rows, 2 * n_slots), dtype=bool)
    lag = np.zeros((n_rows, 2 * n_slots), dtype=np.int64)
    last = np.full((n_rows, N_KEYS), -10 * n_slots - cfg.max_lag, dtype=np.int64)  # slot of each key's last mention
    value = np.zeros((n_rows, N_KEYS), dtype=np.int64)
    rows = np.arange(n_rows)
    for s in range(n_slots):
        live = last >= s - live_slots  # (b, K)
        query = (rng.random(n_rows) < cfg.p_query) & live.any(axis=1)  # (b,)
        scores = rng.random((n_rows, N_KEYS))  # a uniform draw among the allowed keys: the argmax of scores
        key = np.where(query, np.where(live, scores, -1.0).argmax(1), np.where(live, -1.0, scores).argmax(1))
        fresh_value = rng.integers(VALUE_BYTES[0], VALUE_BYTES[1], size=n_rows)
        val = np.where(query, value[rows, key], fresh_value)
        ids[:, 2 * s], ids[:, 2 * s + 1] = key + KEY_BYTES[0], val
        is_query[:, 2 * s + 1] = query
        lag[:, 2 * s + 1] = np.where(query, 2 * (s - last[rows, key]), 0)
        last[rows, key], value[rows, key] = s, val
    cut = slice(0, length)
    return StreamRows(torch.from_numpy(ids[:, cut]), torch.from_numpy(is_query[:, cut]),
                      torch.from_numpy(lag[:, cut]))


class StreamBatches:
    """Training batches for experiments/train.py (task "custom"): batch(step) is a pure function of
    (seed, step), rows of row_len bytes (every byte is a target: the loss is the stream's own)."""

    def __init__(self, cfg: StreamConfig, *, seed: int, batch_size: int, row_len: int):
        self.cfg, self.seed, self.batch_size, self.row_len = cfg, seed, batch_size, row_len

    def __call__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, STREAM_ID])
        return stream_rows(self.cfg, self.batch_size, self.row_len, rng).ids  # (b, row_len)


def probe_rows(cfg: StreamConfig, n_rows: int, length: int, seed: int = PROBE_SEED) -> StreamRows:
    """Held-out prompts of `length + 1` bytes (inputs [:, :-1], targets [:, 1:])."""
    return stream_rows(cfg, n_rows, length + 1, np.random.default_rng([seed, STREAM_ID]))


@torch.no_grad()
def query_accuracy(logits: torch.Tensor, rows: StreamRows, cfg: StreamConfig, stop: int | None = None) -> float:
    """Argmax accuracy on far query values (lag in [max_lag/2, max_lag]) among the targets
    rows.ids[:, 1:stop+1]. logits: (b, l, V) for inputs rows.ids[:, :l]. nan if there are none."""
    l = logits.shape[1] if stop is None else min(stop, logits.shape[1])
    pred = logits[:, :l, :256].argmax(-1)  # (b, l)
    tgt = rows.ids[:, 1:l + 1].to(pred.device)
    lag, q = rows.lag[:, 1:l + 1].to(pred.device), rows.query_value[:, 1:l + 1].to(pred.device)
    keep = q & (lag >= cfg.max_lag // 2)
    if not bool(keep.any()):
        return float("nan")
    return (pred == tgt)[keep].float().mean().item()
