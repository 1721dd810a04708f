"""Measure a forgetting curve as an experiment: resume after a kill, a progress bar, out-of-memory
handling, and the command line for a minimamba checkpoint.

forgetting_curve.py is the protocol and its reading rules (Liu et al., arXiv 2410.04727); this file runs
it over long sweeps:
    measure_curve(model, out=..., resume=True, **the arguments of forgetting_curve) -> ForgettingCurve
        the same measurement as forgetting_curve.forgetting_curve, plus:
        - resume: the lengths already in `out` are reused, only the others are measured (each length has
          its own seed, so the result equals a fresh run); refused unless `out` was measured with the same
          settings, the same caller meta and the same model and data (`fingerprint`);
        - an out-of-memory error at one length stops the sweep and keeps every length measured;
        - a progress bar on stderr (experiments.common.ProgressBar), weighted by tokens.

Commands (run from the repository root; DIR is a Mamba2LM.from_pretrained folder, e.g. one that
`python -m experiments.train` wrote; byte tokens from the stdlib's *.py files unless --text is given)
    # CPU-sized: four lengths, about a minute for a small model
    python -m experiments.measure_curve --checkpoint DIR --lengths 16,64,256,1024 --out_dir runs/fc
    # extend the grid later, or rerun after a kill: the lengths in runs/fc/curve.json are reused
    python -m experiments.measure_curve --checkpoint DIR --lengths 16,64,256,1024,4096 --out_dir runs/fc --resume
    # redraw the figure of a curve file (ours or an official draw.py result), no model
    python -m experiments.measure_curve --from_json runs/fc/curve.json --out_dir runs/fc

Outputs: OUT_DIR/curve.json (per-sample accuracies, the resolved settings, versions, the fingerprint,
the memory-length summary) and OUT_DIR/curve.png; the table of verdicts and the summary on stdout.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import forgetting_curve as fc
from experiments.common import ProgressBar, command_line, config_from_args, config_parser, flag, resolve_device

# What a resumed file must share with the run that continues it. Left out on purpose: batch_size (rows
# are independent: batch 1 == batch 8 bit for bit, so an out-of-memory sweep may resume with smaller
# batches) and device. chunk_size is in: chunking changes the order of the float operations.
RESUME_SETTINGS = ("n_samples", "seed", "bos_id", "eos_id", "vocab_size", "data", "argmax_over",
                   "random_ids", "lm_prefix", "chunk_size")
PROBE_LEN = 256                   # tokens of the fixed fingerprint probe (at most: a sweep whose shortest
                                  # sequence 2 L_min + 3 is shorter uses that, a length the model accepts)
PROBE_DIM = 16                    # random directions the probe's logits are projected onto
PROBE_SEED = 2410_04727           # seed of the probe ids and directions (the paper's arXiv id)
PROBE_RTOL = 1e-3                 # relative difference of two probe sketches still read as one model
                                  # (fp32 on other hardware/threads: ~1e-6; another model: ~1)


# ----------------------------------------------------------------------------------------------
# 1. The robust sweep
# ----------------------------------------------------------------------------------------------

def measure_curve(model: Callable, *, out: str | Path, resume: bool = False, progress: bool = True,
                  **kwargs: Any) -> fc.ForgettingCurve:
    """forgetting_curve.forgetting_curve(model, out=out, **kwargs), resumable and out-of-memory safe.

    Args:
        out: the JSON file, rewritten atomically after every length (required here).
        resume: reuse the lengths already in `out` (a killed sweep, or a grid extended later) and measure
            only the others. Refused (ValueError, before any length is measured) unless the file's
            RESUME_SETTINGS, its caller `meta` and its fingerprint (model class, model config, logits on
            a fixed probe, token stream) match this run; a file without a full fingerprint (older
            versions) is refused too. The file's recorded errors are dropped (those lengths are tried
            again), and its lengths not in `lengths` are left out. resume=False overwrites `out`.
        progress: draw a progress bar on stderr.
        kwargs: the other arguments of forgetting_curve (lengths, tokens, vocab_size, n_samples, ...).
            meta= describes what the arguments do not, e.g. {"mitigation": "sliding window r=64"}: it is
            compared on resume, because a setting that acts beyond the probe (a window longer than it)
            leaves the probe's logits unchanged.
    Returns:
        The ForgettingCurve. An out-of-memory error at some length stops the sweep: the lengths measured
        are returned (and saved) and the error is in `errors`. Other exceptions propagate after saving.
    """
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if out is None:
        raise ValueError("resume=True needs out= (the file whose lengths are reused)" if resume else
                         "measure_curve needs out= (the file it writes after every length)")
    out = fc.check_out(out)
    args = inspect.signature(fc.forgetting_curve).bind(model, out=out, **kwargs)   # its defaults, one copy
    args.apply_defaults()
    settings = {k: v for k, v in args.arguments.items() if k not in ("model", "out")}
    cfg, tokens, device, run_meta = fc.resolve_sweep(model, **settings)
    with fc.eval_mode(model):
        prev = load_for_resume(out) if resume and out.exists() else None
        probe_len = (prev.meta["fingerprint"]["probe_len"] if prev is not None
                     else min(PROBE_LEN, 2 * cfg.lengths[0] + 3))
        run_meta["fingerprint"] = fingerprint(model, cfg=cfg, tokens=tokens, device=device, probe_len=probe_len,
                                              meta=settings["meta"])
        done: dict[int, tuple] = {}                  # L -> (L, copy (n,), lm (n,), seconds) from `out`
        if prev is not None:
            check_resume(out, prev, run_meta)
            done = {int(L): (int(L), c, m, t) for L, c, m, t in zip(prev.lengths, prev.copy_acc, prev.lm_acc,
                                                                    prev.seconds)}
        total = sum(2 * cfg.n_samples * (2 * L + 3) for L in cfg.lengths if L not in done)
        bar = ProgressBar(total, desc="forgetting curve", enabled=progress)
        rows, errors = [], {}
        try:
            for L in cfg.lengths:
                if L in done:                            # measured by an earlier (killed) run
                    rows.append(done[L])
                    continue
                bar.update(0, L=L)
                t0 = time.time()
                try:
                    copy, lm = fc.measure_length(model, L, cfg, tokens, device, on_tokens=bar.update)
                except Exception as err:                                       # noqa: BLE001
                    if not is_out_of_memory(err):
                        raise
                    errors[L] = f"{type(err).__name__}: {err}"
                    del err
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()         # give the failed attempt's memory back
                    break
                rows.append((L, copy, lm, time.time() - t0))
                fc.ForgettingCurve.from_rows(rows, meta=run_meta).save(out)   # nothing measured is lost
        finally:
            bar.close()
    curve = fc.ForgettingCurve.from_rows(rows, errors, meta=run_meta)
    curve.save(out)
    return curve


def is_out_of_memory(err: BaseException) -> bool:
    """Out-of-memory errors (CUDA, CPU allocator, Python) that end a sweep without losing it."""
    oom_types = tuple(t for t in (MemoryError, getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(err, oom_types):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


# ----------------------------------------------------------------------------------------------
# 2. The fingerprint: what `resume` checks beyond the settings
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def fingerprint(model: Callable, *, cfg: fc.SweepConfig, tokens: torch.Tensor | None,
                device: torch.device | str, probe_len: int, meta: dict | None) -> dict[str, Any]:
    """What identifies a measurement beyond its settings (stored in meta["fingerprint"]):
        model_class   : module.qualname of the model's type
        model_config  : the model's `.config` as JSON (a dataclass, or an object with to_dict(); keys
                        starting with "_" and the library version left out), None without one; it holds
                        settings a short probe cannot see (an SSD chunk size, a configured window)
        probe_sketch  : (PROBE_DIM,) sum over the probe's positions of its centred logits (the rows the
                        argmax reads), projected on PROBE_DIM fixed Gaussian directions: a linear sketch
                        in which any change of any logit shows
        probe_len     : the probe's length (min(PROBE_LEN, 2 L_min + 3); a resumed sweep reuses the file's)
        tokens_sha256 : sha256 of the token stream as little-endian int64 (None for random tokens)
        meta          : the caller's meta (e.g. the mitigation and its window), compared as it is
    The probe: probe_len ids from range(vocab_size) drawn by default_rng(PROBE_SEED), or the stream's first
    tokens when the vocabulary is unknown; a stateful model runs in chunks of chunk_size, as in the sweep.
    A sketch compared with a tolerance (PROBE_RTOL), not a hash of the logits: the same model on another
    thread count or device differs in the last float bits.
    """
    if cfg.vocab_size is not None:
        probe = torch.from_numpy(np.random.default_rng(PROBE_SEED).integers(0, cfg.vocab_size, PROBE_LEN))
    else:
        probe = tokens[:PROBE_LEN]
    ids = probe[:probe_len].long().reshape(1, -1).to(device)                   # (1, probe_len)
    if cfg.chunk_size is None:
        logits = fc.logits_of(model(ids), ids)[0]                              # (probe_len, V)
    else:                                                # the same chunked call as the sweep's
        state, pieces = None, []
        for s in range(0, ids.shape[1], cfg.chunk_size):
            logits, state = fc.call_with_state(model, ids[:, s:s + cfg.chunk_size], state)
            pieces.append(logits[0])
        logits = torch.cat(pieces, dim=0)                                      # (probe_len, V)
    logits = logits[:, :cfg.argmax_vocab].double().cpu()
    if not bool(torch.isfinite(logits).all()):
        raise fc.NonFiniteLogitsError(f"the model returns non-finite (NaN or inf) logits on the fixed "
                                      f"fingerprint probe ({ids.shape[1]} ids): it is broken before any length")
    centred = logits - logits.mean(dim=-1, keepdim=True)                       # softmax-invariant
    directions = torch.from_numpy(np.random.default_rng([PROBE_SEED, 1]).standard_normal(
        (logits.shape[-1], PROBE_DIM)))                                        # (V, PROBE_DIM)
    sketch = (centred @ directions).sum(dim=0)                                 # (PROBE_DIM,)
    stream_hash = None if tokens is None else hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_config": model_config(model),
            "probe_sketch": [float(f"{v:.9g}") for v in sketch.tolist()], "probe_len": int(ids.shape[1]),
            "tokens_sha256": stream_hash, "meta": _as_json(meta or {})}


def model_config(model: Callable) -> dict | None:
    """The model's `.config` as JSON (minimamba: a dataclass; Hugging Face: to_dict()), or None."""
    config = getattr(model, "config", None)
    if is_dataclass(config) and not isinstance(config, type):
        values = asdict(config)
    elif callable(getattr(config, "to_dict", None)):
        values = config.to_dict()
    else:
        return None
    return _as_json({k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"})


def _as_json(value: Any) -> Any:
    """`value` as it reads back from the JSON file (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(value, default=str))


def load_for_resume(out: Path) -> fc.ForgettingCurve:
    """The curve already in `out`; refused when its fingerprint cannot say what it measured."""
    prev = fc.ForgettingCurve.load(out)                     # a corrupt file: ValueError naming it
    missing = [k for k in ("model_config", "meta", "probe_len") if k not in prev.meta.get("fingerprint", {})]
    if missing:
        raise ValueError(f"cannot resume from {out}: its fingerprint lacks {missing} (written by "
                         "forgetting_curve(out=...) or an older version), so nothing says it measured this "
                         "model, with these settings, on this data. Re-plot it with --from_json; to measure "
                         "afresh, move it away or choose another out=")
    return prev


def check_resume(out: Path, prev: fc.ForgettingCurve, meta: dict[str, Any]) -> None:
    """Refuse to resume unless `prev` was measured with the same settings, caller meta, model and data."""
    diff = {k: (prev.meta.get(k), meta[k]) for k in RESUME_SETTINGS if _as_json(prev.meta.get(k)) != _as_json(meta[k])}
    if diff:
        raise ValueError(f"cannot resume from {out}: settings differ (file, now): {diff}")
    why = fingerprint_mismatch(prev.meta["fingerprint"], meta["fingerprint"])
    if why is not None:
        raise ValueError(f"cannot resume from {out}: it was measured on {why}. Choose another out= "
                         "(or delete the file to measure afresh)")


def fingerprint_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why two fingerprints are not the same measurement, or None when they match."""
    if old.get("model_class") != new["model_class"]:
        return f"another model class ({old.get('model_class')} in the file, {new['model_class']} now)"
    if old.get("model_config") != new["model_config"]:
        keys = sorted(k for k in set(old["model_config"] or {}) | set(new["model_config"] or {})
                      if (old["model_config"] or {}).get(k) != (new["model_config"] or {}).get(k))
        return f"another model configuration (differs in {keys or 'presence'})"
    if old.get("tokens_sha256") != new["tokens_sha256"]:
        return (f"other text (token stream sha256 {str(old.get('tokens_sha256'))[:12]}... in the file, "
                f"{str(new['tokens_sha256'])[:12]}... now)")
    if old.get("meta") != new["meta"]:
        keys = sorted(k for k in set(old["meta"]) | set(new["meta"]) if old["meta"].get(k) != new["meta"].get(k))
        return (f"another description in meta= (differs in {keys}: file {[old['meta'].get(k) for k in keys]}, "
                f"now {[new['meta'].get(k) for k in keys]}; e.g. another mitigation or window)")
    a, b = np.asarray(old.get("probe_sketch", []), float), np.asarray(new["probe_sketch"], float)
    if a.shape != b.shape:
        return "another model (the probe sketch has another size)"
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30))
    if rel > PROBE_RTOL:
        return (f"another model: its logits on the fixed probe differ (relative difference {rel:.3g} > "
                f"PROBE_RTOL = {PROBE_RTOL:g}; other weights, mitigation or precision)")
    return None


# ----------------------------------------------------------------------------------------------
# 3. The command line (the only place that imports minimamba)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasureConfig:
    """All defaults in one block. Each field is a flag: --name value."""

    checkpoint: str = flag("", "a Mamba2LM.from_pretrained folder (required unless --from_json)")
    lengths: tuple[int, ...] = flag((), "dependency lengths L in tokens (required unless --from_json)")
    out_dir: str = flag("runs/forgetting_curve", "output folder: curve.json and curve.png")
    resume: bool = flag(False, "reuse the lengths already in OUT_DIR/curve.json (refused unless it measured the "
                        "same model on the same data with the same settings)")
    from_json: str = flag("", "only redraw OUT_DIR/curve.png from this curve.json or an official draw.py result "
                          "file; no model is run (--train_length, --title and --significance apply)")
    text: tuple[str, ...] = flag((), "text files read as bytes (empty: the stdlib's top-level *.py files)")
    random_tokens: bool = flag(False, "random tokens instead of text")
    max_text_bytes: int = flag(0, "truncate the text stream to this many bytes (0: all)")
    n_samples: int = flag(fc.DEFAULT_N_SAMPLES, "samples per length (the paper's: 10)")
    seed: int = flag(0, "seed of the sampled spans")
    batch_size: int = flag(fc.DEFAULT_BATCH_SIZE, "sequences per forward call")
    chunk_size: int = flag(fc.DEFAULT_CHUNK_SIZE, "tokens per forward call, the state carried between chunks "
                           "(0: one call)")
    bos_id: int = flag(-1, "BOS token id (-1: the smallest id absent from the data)")
    eos_id: int = flag(-1, "EOS token id (-1: the BOS id)")
    significance: str = flag(fc.DEFAULT_SIGNIFICANCE, "paired test of the coarse rule: sign-flip | t-test "
                             "(t-test: the official code's)")
    argmax_over: str = flag("vocab", "vocab: the first vocab_size logits | all: every row, as the official code")
    random_ids: tuple[int, ...] = flag((), "random tokens from range(LO, HI), given as LO,HI; official: 10,32000 "
                                       "(empty: range(vocab_size))")
    lm_prefix: str = flag("fresh", "LM prefix u: fresh (a window per sample) | tail (the text's last L "
                          "tokens, as the official code)")
    train_length: int = flag(0, "training length in tokens, a marker on the plot (0: none)")
    title: str = flag("", "plot title (empty: the checkpoint's path)")
    device: str = flag("cpu", "torch device: cpu | cuda | auto")
    threads: int = flag(0, "torch.set_num_threads (0: torch's default)")

    def __post_init__(self):
        for name, allowed in (("significance", fc.SIGNIFICANCE_TESTS), ("argmax_over", fc.ARGMAX_OVER),
                              ("lm_prefix", fc.LM_PREFIXES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.random_ids and len(self.random_ids) != 2:
            raise ValueError(f"--random_ids takes two ids LO,HI, got {self.random_ids}")


def build_parser():
    return config_parser(MeasureConfig, "Forgetting curve of a minimamba.Mamba2LM checkpoint (byte tokens "
                         "from text files, or random tokens).")


def default_text_files() -> list[Path]:
    """The default text: the Python standard library's top-level *.py files, sorted by name (always
    installed, so every machine can reproduce the run)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_byte_tokens(paths: Sequence[str | Path], max_tokens: int | None = None) -> torch.Tensor:
    """Files concatenated (in the given order) and read as bytes: (N,) long ids in range(256)."""
    data = bytearray()
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} is not a file (give text files; a folder's *.py files: "
                                    f"sorted(Path(folder).glob('*.py')))")
        data += Path(p).read_bytes()
        if max_tokens is not None and len(data) >= max_tokens:
            break
    data = bytes(data[:max_tokens] if max_tokens is not None else data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def main(argv: Sequence[str] | None = None) -> fc.ForgettingCurve:
    parser = build_parser()
    try:
        cfg = config_from_args(MeasureConfig, parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"--out_dir {out} is a file; it names a folder (curve.json and curve.png go inside)")
    train_length = cfg.train_length or None
    if cfg.from_json:
        curve = fc.ForgettingCurve.load(cfg.from_json)
        curve.plot(out / "curve.png", train_length=train_length or curve.meta.get("train_length"),
                   title=cfg.title or None, significance=cfg.significance)
        print(curve.table(cfg.significance))
        print(json.dumps(curve.summary(significance=cfg.significance)))
        return curve
    if not cfg.checkpoint or not cfg.lengths:
        parser.error("--checkpoint and --lengths are required (unless --from_json)")
    fc.check_out(out / "curve.json")                  # before the checkpoint is loaded

    import minimamba  # the command line is the only place that needs it
    device = resolve_device(cfg.device)
    model = minimamba.Mamba2LM.from_pretrained(cfg.checkpoint).to(device).eval()
    vocab_size = model.config.vocab_size
    if cfg.random_tokens:
        tokens, text = None, "random"
    else:
        files = [Path(p) for p in cfg.text] if cfg.text else default_text_files()
        tokens = read_byte_tokens(files, cfg.max_text_bytes or None)
        text = [str(p) for p in files] if cfg.text else "stdlib top-level *.py, sorted"
        if vocab_size < 256:
            raise SystemExit(f"byte tokens need vocab_size >= 256; the checkpoint has {vocab_size}")
    curve = measure_curve(model, out=out / "curve.json", resume=cfg.resume, lengths=cfg.lengths, tokens=tokens,
                          vocab_size=vocab_size, n_samples=cfg.n_samples, seed=cfg.seed,
                          bos_id=None if cfg.bos_id < 0 else cfg.bos_id, eos_id=None if cfg.eos_id < 0 else cfg.eos_id,
                          batch_size=cfg.batch_size, chunk_size=cfg.chunk_size or None, device=device,
                          meta={"checkpoint": str(Path(cfg.checkpoint).resolve()), "text": text},
                          argmax_over=cfg.argmax_over, lm_prefix=cfg.lm_prefix,
                          random_ids=tuple(cfg.random_ids) or None)
    curve.meta.update({"command": command_line(), **({"train_length": train_length} if train_length else {})})
    curve.save(out / "curve.json")                    # with the informational meta
    if curve.lengths.size:
        curve.plot(out / "curve.png", train_length=train_length,
                   title=cfg.title or f"Forgetting curve: {cfg.checkpoint}", significance=cfg.significance)
        print(curve.table(cfg.significance))
        print(json.dumps(curve.summary(significance=cfg.significance)))
    for L, e in curve.errors.items():
        print(f"stopped at L={L}: {e}", file=sys.stderr)
    return curve


if __name__ == "__main__":
    main()
