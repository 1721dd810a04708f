"""The forgetting curve of a small byte-level Mamba2LM, end to end on a CPU (README figure).

What it does
    1. Trains a small Mamba2LM with experiments/train.py on the Python standard library's source
       (byte tokens), unless --checkpoint names a trained model (a from_pretrained directory).
       With --task copy it instead trains on the copy layout [SEP] x [SEP] x itself with random bytes
       (a small loop in this file), then measures the curve on random bytes.
    2. Measures its forgetting curve (forgetting_curve.py, arXiv 2410.04727) on the HELD-OUT
       documents of the same corpus (experiments/data.py splits by a hash of each file name, so no
       span of x or u was trained on), with the state carried across chunks so L reaches 64K.
    3. Writes curve.json and curve.png in --out and, with --figure NAME, copies them to
       figures/NAME.png and figures/NAME.json.

Commands (run from the repository root)
    # the README figure (about 6 min of training + 10 min of evaluation on one CPU thread)
    python -m experiments.forgetting_curve_demo --out runs/fc_demo --figure forgetting_curve_demo
    # quick smoke run (under a minute)
    python -m experiments.forgetting_curve_demo --out runs/fc_smoke --train_steps 20 --lengths 8 64 --n_samples 5
    # a model trained on the copy layout itself (so that it has memory to measure), curve on random bytes
    python -m experiments.forgetting_curve_demo --task copy --out runs/fc_copy --train_steps 1500 --figure forgetting_curve_copy
    # peak memory at L = 65536 (2 sequences of 131K tokens): chunked vs one call, same answer
    python -m experiments.forgetting_curve_demo --out runs/fc_demo --memory_probe 65536 --chunk_size 4096
    python -m experiments.forgetting_curve_demo --out runs/fc_demo --memory_probe 65536 --chunk_size 0
    # any trained checkpoint instead of training one
    python -m experiments.forgetting_curve_demo --checkpoint runs/x/checkpoints/step_00001000/model --train_length 256 --out runs/fc_x

Special ids
    The corpus joins documents with byte DOC_SEP = 0 (experiments/data.py), which the model saw as the
    start of every document during training, so it is used as BOS (and EOS): it is the model's own
    "beginning of sequence", exactly the role the paper's layout gives BOS.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python experiments/forgetting_curve_demo.py` works too
    sys.path.insert(0, str(REPO))

import forgetting_curve as fc  # noqa: E402
from experiments.data import DOC_SEP, VOCAB_SIZE, Corpus  # noqa: E402

CURRICULUM_START = 4  # --task copy: longest span at step 0 (tokens)

# ---- all defaults in one block ----
DEFAULTS = dict(
    out="runs/fc_demo",
    checkpoint=None,       # a from_pretrained directory; None = train one here
    train_length=None,     # T_train of --checkpoint (plot marker); None = read from training or unknown
    # training (experiments/train.py flags): a 2-layer d=64 model, T_train = 256 bytes, ~5 min CPU
    train_steps=600, seq_len=256, batch_size=16, d_model=64, n_layer=2, d_state=64, headdim=16, lr=3e-3,
    # forgetting curve
    lengths=[8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536],
    n_samples=10,          # paper / official code: 10 samples per length
    eval_batch_size=20,    # all 2n rows of a length in one batch
    chunk_size=4096,       # tokens per forward call, state carried between chunks
    seed=0,
    threads=1,             # torch.set_num_threads: the project's CPUs are shared
    figure=None,           # copy curve.{png,json} to figures/<figure>.{png,json}
    task="lm",             # "lm": train a language model on stdlib text (experiments/train.py);
                           # "copy": train on the copy layout itself (a model that has memory to measure)
    copy_max_len=64,       # --task copy: longest span L in training (the training-length marker)
    memory_probe=0,        # > 0: only measure peak memory of one length L (n_samples=1, batch 2) with
                           # --chunk_size (0 = the whole sequence in one call), then exit
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        if isinstance(value, list):
            p.add_argument(f"--{name}", type=int, nargs="+", default=value)
        else:
            kind = float if isinstance(value, float) else int if isinstance(value, int) else str
            p.add_argument(f"--{name}", type=kind, default=value)
    return p.parse_args(argv)


def train_model(args) -> tuple[Path, int]:
    """Step 1: train with experiments/train.py (resumes a killed run); returns (model dir, T_train)."""
    from experiments.train import latest_checkpoint, parse_config, train

    out = Path(args.out) / "train"
    cfg = parse_config(["--out_dir", str(out), "--steps", str(args.train_steps), "--seq_len", str(args.seq_len),
                        "--batch_size", str(args.batch_size), "--d_model", str(args.d_model),
                        "--n_layer", str(args.n_layer), "--d_state", str(args.d_state),
                        "--headdim", str(args.headdim), "--lr", str(args.lr), "--seed", str(args.seed),
                        "--threads", str(args.threads), "--resume", "true", "--device", "cpu",
                        "--eval_every", str(max(1, args.train_steps // 3)), "--ckpt_every", "100"])
    ckpt = latest_checkpoint(out)
    if ckpt is None or int(ckpt.name.split("_")[1]) < args.train_steps:
        train(cfg)
        ckpt = latest_checkpoint(out)
    return ckpt / "model", cfg.seq_len * cfg.n_segments


def train_copy_model(args) -> tuple[Path, int]:
    """Step 1 of --task copy: a tiny honest training loop on the synthetic copy layout itself.

    Each step draws one span length L_s ~ U{1..L_max(step)} (a curriculum: L_max grows linearly
    from CURRICULUM_START to copy_max_len over the first half of training) and a batch of random bytes x from
    1..255, builds [SEP] x [SEP] x [SEP] (SEP = DOC_SEP = 0, the curve's BOS) and minimizes the
    next-byte cross-entropy on the second x only (what the forgetting curve scores). AdamW, linear
    warmup then cosine decay (the same schedule as experiments/train.py), grad clip 1.0. The longest
    dependency seen in training is copy_max_len + 1 tokens: that is the training-length marker.
    """
    import math
    import numpy as np
    import torch.nn.functional as F
    from minimamba import Mamba2Config, Mamba2LM

    model_dir = Path(args.out) / "copy_model"
    if (model_dir / "config.json").exists():
        return model_dir, args.copy_max_len
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = Mamba2LM(Mamba2Config(d_model=args.d_model, n_layer=args.n_layer, vocab_size=VOCAB_SIZE,
                                  d_state=args.d_state, headdim=args.headdim, chunk_size=64))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.train_steps // 20)
    log = open(Path(args.out) / "copy_train.csv", "w")
    log.write("step,span_len,loss,copy_acc\n")
    model.train()
    for step in range(args.train_steps):
        lr = args.lr * min((step + 1) / warmup, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.train_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        # curriculum: the longest span grows linearly from CURRICULUM_START to copy_max_len over the
        # first half of training (uniform spans up to 64 from the start stay at chance for 500+ steps)
        grown = CURRICULUM_START + (args.copy_max_len - CURRICULUM_START) * min(1.0, 2 * step / args.train_steps)
        L = int(rng.integers(1, int(grown) + 1))
        x = torch.from_numpy(rng.integers(1, VOCAB_SIZE, (args.batch_size, L)))       # (b, L)
        sep = torch.full((args.batch_size, 1), DOC_SEP, dtype=torch.long)
        ids = torch.cat([sep, x, sep, x, sep], dim=1)                                 # (b, 2L+3)
        logits, _ = model(ids[:, :-1])                                                # (b, 2L+2, V)
        pred = logits[:, L + 1:2 * L + 1, :VOCAB_SIZE]                                # predicts the second x
        loss = F.cross_entropy(pred.reshape(-1, VOCAB_SIZE), x.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = (pred.argmax(-1) == x).float().mean().item()
        log.write(f"{step + 1},{L},{loss.item():.4f},{acc:.4f}\n")
        log.flush()
        if (step + 1) % 50 == 0:
            print(f"copy training step {step + 1}/{args.train_steps} L={L} loss={loss.item():.3f} acc={acc:.3f}",
                  file=sys.stderr, flush=True)
    log.close()
    from checkpoints import save_pretrained
    save_pretrained(model, model_dir)
    return model_dir, args.copy_max_len


def memory_probe(args, model) -> fc.ForgettingCurve:
    """Peak resident memory (ru_maxrss, a process-wide high-water mark: run once per setting) of one
    held-out length with chunking (--chunk_size c) or in one call (--chunk_size 0)."""
    import resource
    import time
    tokens = torch.from_numpy(Corpus.load().heldout.astype("int64"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # MB (Linux: KB)
    t0 = time.perf_counter()
    curve = fc.forgetting_curve(model, lengths=[args.memory_probe], tokens=tokens, vocab_size=VOCAB_SIZE,
                                n_samples=1, bos_id=DOC_SEP, seed=args.seed, batch_size=2,
                                chunk_size=args.chunk_size or None, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"L={args.memory_probe} chunk_size={args.chunk_size or None}: peak RSS {peak:.0f} MB (before the "
          f"sweep {before:.0f} MB), {time.perf_counter() - t0:.1f} s, copy {curve.copy_acc.ravel()}, "
          f"LM {curve.lm_acc.ravel()}")
    return curve


def main(argv=None) -> fc.ForgettingCurve:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None:
        model_dir, train_length = Path(args.checkpoint), args.train_length
    elif args.task == "copy":
        model_dir, train_length = train_copy_model(args)
    else:
        model_dir, train_length = train_model(args)

    # step 2: the curve (held-out documents; random bytes for --task copy)
    from minimamba import Mamba2LM
    model = Mamba2LM.from_pretrained(model_dir).eval()
    if args.memory_probe:
        return memory_probe(args, model)
    command = "python -m experiments.forgetting_curve_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"checkpoint": str(model_dir), "train_length": train_length, "command": command,
            "torch_threads": torch.get_num_threads(), "task": args.task}
    if args.task == "copy":
        tokens = None
        meta["text"] = "random bytes 1..255 (the copy task's distribution)"
    else:
        corpus = Corpus.load()
        tokens = torch.from_numpy(corpus.heldout.astype("int64"))             # (N,) held-out bytes
        meta["text"] = f"held-out documents of {corpus.source} ({len(corpus.heldout_docs)} files)"
    curve = fc.forgetting_curve(model, lengths=args.lengths, tokens=tokens, vocab_size=VOCAB_SIZE,
                                n_samples=args.n_samples, bos_id=DOC_SEP, eos_id=DOC_SEP, seed=args.seed,
                                batch_size=args.eval_batch_size, chunk_size=args.chunk_size,
                                out=out / "curve.json", resume=True, meta=meta)   # rerun = resume
    # step 3: figure and summary
    if curve.lengths.size:
        curve.plot(out / "curve.png", train_length=train_length,
                   title=f"byte-level Mamba2LM, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K params, "
                         + (f"trained on the copy layout with L <= {train_length}\nrandom bytes"
                            if args.task == "copy" else f"T_train={train_length}\nheld-out Python stdlib source")
                         + f", n={args.n_samples} per L")
    print(curve.table())
    print(json.dumps(curve.summary()))
    if args.figure and curve.lengths.size:
        figs = REPO / "figures"
        figs.mkdir(exist_ok=True)
        shutil.copyfile(out / "curve.png", figs / f"{args.figure}.png")
        shutil.copyfile(out / "curve.json", figs / f"{args.figure}.json")
    return curve


if __name__ == "__main__":
    main()
