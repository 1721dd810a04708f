"""The forgetting curve of a small byte-level Mamba2LM, end to end on a CPU (README figure).

What it does
    1. Trains a small Mamba2LM with experiments/train.py on the Python standard library's source
       (byte tokens), unless --checkpoint names a trained model (a from_pretrained directory).
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


def main(argv=None) -> fc.ForgettingCurve:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.checkpoint is None:
        model_dir, train_length = train_model(args)
    else:
        model_dir, train_length = Path(args.checkpoint), args.train_length

    # step 2: the curve on held-out documents
    from minimamba import Mamba2LM
    model = Mamba2LM.from_pretrained(model_dir).eval()
    corpus = Corpus.load()
    tokens = torch.from_numpy(corpus.heldout.astype("int64"))                 # (N,) held-out bytes
    meta = {"checkpoint": str(model_dir), "train_length": train_length,
            "text": f"held-out documents of {corpus.source} ({len(corpus.heldout_docs)} files)",
            "command": "python -m experiments.forgetting_curve_demo " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch_threads": torch.get_num_threads()}
    curve = fc.forgetting_curve(model, lengths=args.lengths, tokens=tokens, vocab_size=VOCAB_SIZE,
                                n_samples=args.n_samples, bos_id=DOC_SEP, eos_id=DOC_SEP, seed=args.seed,
                                batch_size=args.eval_batch_size, chunk_size=args.chunk_size,
                                out=out / "curve.json", meta=meta)
    # step 3: figure and summary
    if curve.lengths.size:
        curve.plot(out / "curve.png", train_length=train_length,
                   title=f"byte-level Mamba2LM, {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K params, "
                         f"T_train={train_length}\nheld-out Python stdlib source, n={args.n_samples} per L")
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
