"""GPU readiness in one command: the gpu-marked tests, then bench.py's GPU rows; one JSON and one table.

    python -m experiments.gpu_check --out_dir runs/gpu_check          # one CUDA GPU, under 8 minutes

What it runs
    1. `pytest -m gpu tests/test_gpu.py`: kernels.ssd_chunked_compiled against the float64 oracle in fp32 and
       bf16, one compiled graph for the lengths of a bucket, the accelerated model equal to the plain one on
       CUDA (logits and gradients), bf16-autocast training steps that stay finite.
    2. bench.py's GPU section at --lengths (tokens/s of the compiled scan in bf16 and fp32, its error against
       float64, compiled graphs so far), beside flash-linear-attention's chunk_simple_gla (Mamba-2's SSD with
       a scalar decay per head, pure Triton) and mamba_ssm's mamba_chunk_scan_combined when they import.
Outputs in --out_dir: gpu_check.json (test outcomes, bench rows, hardware, versions, wall time) and
gpu_check.md (the table). Without CUDA it says so and exits 2.

A machine without a package index (the lent GPU machines here) gets flash-linear-attention as a wheel: on a
machine with one, `pip download --no-deps --only-binary=:all: -d .whl flash-linear-attention` (it is pure
Python; it needs triton, which CUDA builds of torch bring), then on the GPU machine
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import bench  # noqa: E402
from experiments.common import atomic_write_json, atomic_write_text, run_metadata  # noqa: E402

GPU_LENGTHS = (8192, 65536)  # two buckets of chunk counts: two compiles per dtype keep the run under 8 minutes
TEST_TIMEOUT_S = 300  # the gpu tests compile a few graphs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", type=Path, default=ROOT / "runs" / "gpu_check",
                    help="run folder for gpu_check.json and gpu_check.md (default: %(default)s)")
    ap.add_argument("--lengths", default=",".join(map(str, GPU_LENGTHS)),
                    help="comma-separated sequence lengths (tokens) of the GPU bench rows (default: %(default)s)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False: nothing to check on this machine", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, capture_output=True, text=True,
                           timeout=TEST_TIMEOUT_S)
    cfg = dataclasses.replace(bench.BenchConfig(), gpu_lengths=tuple(int(v) for v in args.lengths.split(",")))
    rows = bench.run_worker(bench.gpu_plan(cfg), threads=None)
    result = {"tests": {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:],
                        "output": tests.stdout[-4000:]},
              "bench_rows": rows, "gpu": torch.cuda.get_device_name(0), "meta": run_metadata(),
              "wall_s": time.perf_counter() - t0}
    atomic_write_json(args.out_dir / "gpu_check.json", result)
    table = (f"# GPU check: {result['gpu']}, torch {torch.__version__}, {result['wall_s']:.0f} s\n\n"
             f"tests (pytest -m gpu): {' '.join(result['tests']['summary'])}\n\n```\n{bench.format_table(rows)}\n```\n")
    atomic_write_text(args.out_dir / "gpu_check.md", table)
    print(table)
    print(json.dumps({"tests_returncode": tests.returncode, "rows": len(rows)}), file=sys.stderr)
    return 0 if tests.returncode == 0 and all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
