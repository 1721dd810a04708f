"""Byte-level training data that needs no download: the Python standard library's own source.

What this is
    The corpus for minimamba's experiments. Every Python install ships a few tens of MB of its own
    source code (located with `sysconfig`), so the default corpus exists wherever the code runs.
    Text is read as raw bytes: token = byte, vocabulary 256, no tokenizer to download.
    `--data PATH` swaps in any text file or folder.

Papers
    Stuffed Mamba (arXiv 2410.07145), section "State collapse": per-position loss on long held-out
    text with the state carried, and the newline prompt ("\\n" * L) as a reproducible probe.

Reading order
    1. `Corpus.load`           which files, and the deterministic train / held-out split by document
    2. `Corpus.batch`          the batch for one optimizer step: a pure function of (seed, step)
    3. `copy_batch`, `copymix_batch`   synthetic recall tasks (copy episodes; the forgetting-curve layout)
    4. `Corpus.heldout_windows`, `newline_probe`   evaluation inputs

Glossary
    b  batch rows (global across data-parallel ranks unless said otherwise)
    T  training length: tokens per segment (the paper's T_train)
    N  number of chained segments per row (truncated BPTT; the paper chains 12)
    l  length of an evaluation window

Design notes
    - The split is by document and decided by a hash of the document's path (or index for a single
      file), so it is deterministic, independent of file-system listing order, and stable when files
      are added or removed.
    - Batches are a pure function of (seed, step): resuming a run at step s needs no loader state,
      and the data-parallel ranks each take their slice of the same global batch, so k processes see
      exactly the rows one process with the global batch would see.
    - Documents are joined into one stream with a separator byte DOC_SEP between them; a row of a
      batch is a contiguous stretch of that stream starting at a random offset.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

VOCAB_SIZE = 256  # byte-level tokens
DOC_SEP = 0  # byte placed between documents (NUL never occurs in text files)
NEWLINE = ord("\n")  # the paper's probe token
HELDOUT_FRACTION = 0.05  # share of documents held out (by hash of their name)
SINGLE_FILE_DOC_BYTES = 1 << 16  # a single --data file is cut into pseudo-documents of this many bytes
STDLIB_SUFFIX = ".py"  # which stdlib files form the default corpus
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".html", ".js", ".tex", ".csv")
COPY_STREAM_ID = 1  # keeps the copy task's random stream apart from Corpus.batch's
COPYMIX_STREAM_ID = 3  # keeps the copymix episodes' random stream apart from the other streams
COPY_CURRICULUM_START = 4  # copymix: longest copy span at step 0 (tokens)
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")  # vary between installs


def stdlib_dir() -> Path:
    """The folder holding this Python's standard-library source (e.g. /usr/lib/python3.11)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split_key(name: str) -> float:
    """Map a document name to a fixed number in [0, 1) (first 8 bytes of its SHA-1)."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _read_documents(path: Path) -> list[tuple[str, bytes]]:
    """Return (name, bytes) documents from a folder (one per text file) or a single file (cut up)."""
    if path.is_file():
        raw = path.read_bytes().replace(bytes([DOC_SEP]), b"")
        n = max(1, -(-len(raw) // SINGLE_FILE_DOC_BYTES))
        return [(f"{path.name}#{i}", raw[i * SINGLE_FILE_DOC_BYTES:(i + 1) * SINGLE_FILE_DOC_BYTES])
                for i in range(n)]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: expected a text file or a folder, found neither")
    is_stdlib = path.resolve() == stdlib_dir().resolve()
    suffixes = (STDLIB_SUFFIX,) if is_stdlib else TEXT_SUFFIXES
    docs = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or f.suffix not in suffixes or any(p in EXCLUDED_DIRS for p in rel.parts):
            continue
        raw = f.read_bytes().replace(bytes([DOC_SEP]), b"")
        if raw:
            docs.append((rel.as_posix(), raw))
    if not docs:
        raise ValueError(f"--data {path}: no non-empty files with suffix in {suffixes}")
    return docs


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Train and held-out byte streams, each a 1-D uint8 array of documents joined by DOC_SEP."""

    train: np.ndarray  # (n_train_bytes,) uint8
    heldout: np.ndarray  # (n_heldout_bytes,) uint8
    train_docs: list[str]  # document names, in stream order
    heldout_docs: list[str]
    source: str  # the folder or file it came from

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             heldout_fraction: float = HELDOUT_FRACTION) -> "Corpus":
        """Read a corpus and split it by document.

        Args:
            path: a text file or folder; None = this Python's standard library.
            heldout_fraction: share of documents held out, chosen by a hash of each name.
        """
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        root = Path(path) if path is not None else stdlib_dir()
        docs = _read_documents(root)
        # 1. split by a hash of the name: deterministic, order-free
        train = [(n, d) for n, d in docs if _split_key(n) >= heldout_fraction]
        held = [(n, d) for n, d in docs if _split_key(n) < heldout_fraction]
        if not train or not held:  # tiny corpora: force at least one document on each side
            if len(docs) < 2:
                raise ValueError(f"--data {root}: need at least 2 documents to split, found {len(docs)}")
            ranked = sorted(docs, key=lambda nd: _split_key(nd[0]))
            held, train = ranked[:1], ranked[1:]

        # 2. join each side into one stream, documents separated by DOC_SEP
        def join(side: list[tuple[str, bytes]]) -> np.ndarray:
            sep = bytes([DOC_SEP])
            return np.frombuffer(sep.join(d for _, d in side) + sep, dtype=np.uint8).copy()

        return cls(train=join(train), heldout=join(held), train_docs=[n for n, _ in train],
                   heldout_docs=[n for n, _ in held], source=str(root))

    # ------------------------------------------------------------------------------------------
    def batch(self, step: int, *, seed: int, batch_size: int, seq_len: int, n_segments: int = 1,
              rows: slice | None = None) -> torch.Tensor:
        """Tokens for one optimizer step: rows of N*T+1 contiguous bytes of the train stream.

        Segment i of a row is inputs row[i*T:(i+1)*T], targets row[i*T+1:(i+1)*T+1], so the N
        segments chain: the state at the end of segment i is the right start for segment i+1.

        Args:
            step: optimizer step; the batch is a pure function of (seed, step).
            seed: run seed.
            batch_size: global rows b.
            seq_len: T, tokens per segment.
            n_segments: N, chained segments per row.
            rows: which of the global rows to return (a data-parallel rank's slice); None = all.
        Returns:
            LongTensor (b_rows, N*T + 1)
        """
        span = n_segments * seq_len + 1
        if span > len(self.train):
            raise ValueError(f"rows of {span} tokens do not fit the {len(self.train)}-byte train stream")
        g = np.random.default_rng([seed, step])  # independent stream per (seed, step)
        starts = g.integers(0, len(self.train) - span + 1, size=batch_size)  # (b,)
        if rows is not None:
            starts = starts[rows]
        idx = starts[:, None] + np.arange(span)[None, :]  # (b_rows, N*T+1)
        return torch.from_numpy(self.train[idx].astype(np.int64))

    def heldout_windows(self, n: int, length: int) -> torch.Tensor:
        """n held-out windows of `length + 1` tokens at evenly spaced offsets (deterministic).

        Returns:
            LongTensor (n, length + 1): inputs are [:, :-1], targets [:, 1:].
        """
        span = length + 1
        if span > len(self.heldout):
            raise ValueError(f"held-out stream has {len(self.heldout)} bytes, fewer than {span}; "
                             f"use a shorter length or a larger --data")
        starts = np.linspace(0, len(self.heldout) - span, num=n).astype(np.int64)  # (n,)
        idx = starts[:, None] + np.arange(span)[None, :]
        return torch.from_numpy(self.heldout[idx].astype(np.int64))


def copy_batch(step: int, *, seed: int, batch_size: int, seq_len: int, n_segments: int = 1,
               copy_len: int = 8, rows: slice | None = None) -> torch.Tensor:
    """A synthetic recall task: rows of copy episodes [r, r], r = copy_len random bytes.

    The second half of an episode is predictable only by remembering the first half, so a model
    is rewarded for keeping the current episode in its state. Episodes are laid end to end to fill
    N*T+1 tokens, so a row longer than one episode also teaches the model to drop finished episodes
    (to forget), and a row of at most one episode never does. Bytes are drawn from 1..255 (never
    DOC_SEP). A pure function of (seed, step), like Corpus.batch.

    Returns:
        LongTensor (b_rows, N*T + 1)
    """
    if copy_len < 1:
        raise ValueError(f"copy_len must be >= 1, got {copy_len}")
    span = n_segments * seq_len + 1
    g = np.random.default_rng([seed, step, COPY_STREAM_ID])
    n_episodes = -(-span // (2 * copy_len))
    r = g.integers(1, VOCAB_SIZE, size=(batch_size, n_episodes, 1, copy_len))  # (b, E, 1, copy_len)
    ep = np.concatenate([r, r], axis=2).reshape(batch_size, -1)[:, :span]  # (b, N*T+1)
    if rows is not None:
        ep = ep[rows]
    return torch.from_numpy(ep.astype(np.int64))


def copymix_batch(corpus: Corpus, step: int, *, steps: int, seed: int, batch_size: int, seq_len: int,
                  n_segments: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The forgetting-curve training task: (rows (b, N*T+1), loss mask (b, N*T) bool).

    Even rows are corpus text (every target in the loss); odd rows are back-to-back copy episodes
    in the forgetting-curve layout [SEP] x [SEP] x (SEP = DOC_SEP, the curves' BOS), of which only
    the second x's targets are in the loss (the random first x and the separators cannot be
    predicted; the forgetting curve scores only the second x). Span lengths L ~ U{1..L_max(step)}
    with a curriculum: L_max = COPY_CURRICULUM_START + (T/2 - 1 - start) * min(1, 2 step / steps),
    capped at T/2 - 1, so both copies of an episode fit in one segment of T tokens. Bytes of x are
    uniform in 1..255 (never SEP). A pure function of (seed, step).
    Why: a toy model trained for minutes on text learns no copying at all (copy = LM = ~0 for every
    model, the Transformer included), which would make "zero fine-grained memory" say nothing;
    variable-length copy episodes give every model the skill inside T_train.
    """
    span = n_segments * seq_len + 1
    rows = corpus.batch(step, seed=seed, batch_size=batch_size, seq_len=seq_len, n_segments=n_segments)
    top = max(1, seq_len // 2 - 1)
    l_max = min(top, int(COPY_CURRICULUM_START + (top - COPY_CURRICULUM_START) * min(1.0, 2 * step / steps)))
    rng = np.random.default_rng([seed, step, COPYMIX_STREAM_ID])
    mask = torch.ones(batch_size, span - 1, dtype=torch.bool)  # (b, N*T): target t+1 counted?
    for i in range(1, batch_size, 2):
        row: list[int] = []
        scored: list[bool] = []  # per token of the row: is it predictable (in a second x)?
        while len(row) < span:
            L = int(rng.integers(1, max(1, l_max) + 1))
            x = rng.integers(1, VOCAB_SIZE, L).tolist()
            row += [DOC_SEP] + x + [DOC_SEP] + x
            scored += [False] * (L + 2) + [True] * L
        rows[i] = torch.tensor(row[:span], dtype=torch.long)
        mask[i] = torch.tensor(scored[1:span])
    return rows, mask


def corpus_sha256(corpus: Corpus) -> str:
    """sha256 of the bytes a corpus holds: the train stream, then the held-out stream (so the files'
    contents, their order and the split). A run records it; --resume compares it (0.1 s for the 30 MB
    standard library)."""
    h = hashlib.sha256()
    for stream in (corpus.train, corpus.heldout):
        data = np.ascontiguousarray(stream, dtype=np.uint8)
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    return h.hexdigest()


def newline_probe(length: int, n: int = 1) -> torch.Tensor:
    """The paper's reproducible probe: a prompt of only newlines. LongTensor (n, length + 1)."""
    return torch.full((n, length + 1), NEWLINE, dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    """Bytes back to text (for eyeballing samples); invalid UTF-8 is replaced."""
    return bytes(int(t) for t in tokens.flatten().tolist()).decode("utf-8", errors="replace")
