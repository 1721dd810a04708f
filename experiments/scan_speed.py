"""Forward tokens/s of one small Mamba2LM with each scan: the oracle, the reference and the fast path.

    python experiments/scan_speed.py                 # l = 4096, 1 thread: about 1 minute on a CPU
    python experiments/scan_speed.py --length 1024 --threads 2

The same weights run with scan = "sequential" (kernels.ssd_sequential, one token at a time), "ssd"
(minimamba.ssd, the readable chunked scan) and "chunked" (kernels.ssd_chunked, the CPU default),
in one process, side by side; each figure is the fastest of --repeats timed calls after a warm-up.
The full benchmark against transformers is experiments/bench.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimamba import Mamba2Config, Mamba2LM  # noqa: E402

# The small config of issues 2 and 7: d_model 256, 4 layers, d_state 64, headdim 32, chunk 64.
CONFIG = dict(d_model=256, n_layer=4, vocab_size=256, d_state=64, headdim=32, chunk_size=64)
SCANS = ("sequential", "ssd", "chunked")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096, help="tokens per forward call (batch 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per scan (the fastest is kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = Mamba2LM(Mamba2Config(**CONFIG)).state_dict()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.length))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"config {CONFIG}, l = {args.length}")
    reference = None
    for scan in SCANS:
        model = Mamba2LM(Mamba2Config(**CONFIG, scan=scan)).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            logits, _ = model(ids[:, :128])  # warm-up
            best = float("inf")
            for _ in range(1 if scan == "sequential" else args.repeats):
                t0 = time.perf_counter()
                logits, _ = model(ids)
                best = min(best, time.perf_counter() - t0)
        if reference is None:
            reference = logits
        err = ((logits - reference).abs().max() / reference.abs().max()).item()
        print(f"  scan={scan:<10} {args.length / best:>10,.0f} tokens/s  ({best * 1000:,.0f} ms; "
              f"max rel diff to scan=sequential {err:.1e})")


if __name__ == "__main__":
    main()
