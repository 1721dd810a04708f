"""GPU readiness in one command: the gpu-marked tests, then bench.py's GPU rows; one JSON and one table.

    python -m experiments.gpu_check --out_dir runs/gpu_check          # one CUDA GPU, under 8 minutes

What it runs
    1. `pytest -m gpu tests/test_gpu.py`: kernels.ssd_chunked_compiled against the float64 oracle in fp32 and
       bf16, one compiled graph for the lengths of a bucket, the accelerated model equal to the plain one on
       CUDA (logits and gradients), bf16-autocast training steps that stay finite.
    2. bench.py's GPU section at --lengths (tokens/s of the compiled scan in bf16 and fp32, its error against
       float64, compiled graphs so far), beside each peer that imports: flash-linear-attention's
       chunk_simple_gla (Mamba-2's SSD with a scalar decay per head, pure Triton) and mamba_ssm's
       mamba_chunk_scan_combined. A peer that does not import is listed with the reason.
Outputs in --out_dir: gpu_check.json (test outcomes, peers, bench rows, hardware, versions, wall time, and any
step that failed or timed out) and gpu_check.md (the table). The JSON is written whatever fails, after each
step. Without CUDA it says so and exits 2.

The peers travel as wheels to a GPU machine without a package index (torch and triton are there already):
flash-linear-attention's kernels are in the `fla-core` wheel since the package split (the
`flash-linear-attention` wheel no longer contains `fla.ops`); fla-core needs `einops`. On a machine with an
index: `pip download --no-deps --only-binary=:all: -d .whl fla-core einops`, then on the GPU machine
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def run_gpu_tests(timeout_s: float) -> dict:
    """pytest -m gpu in a subprocess; a timeout is an outcome (with the output so far), not a crash."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_gpu.py")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": None, "summary": [f"timed out after {timeout_s:.0f} s"], "output": out[-4000:]}
    return {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:],
            "output": (done.stdout + done.stderr)[-4000:]}


def write_outputs(out_dir: Path, result: dict) -> str:
    """gpu_check.json and gpu_check.md from what has run so far; returns the table."""
    atomic_write_json(out_dir / "gpu_check.json", result)
    peers = "\n".join(f"- {p['impl']} ({p['wheel']}): {p['status']}" for p in result.get("peers", []))
    rows = result.get("bench_rows") or []
    table = (f"# GPU check: {result['gpu']}, torch {result['torch']}, {result['wall_s']:.0f} s\n\n"
             f"tests (pytest -m gpu): {' '.join(result.get('tests', {}).get('summary', ['not run']))}\n\n"
             f"peers:\n{peers or '- not looked for'}\n\n"
             + (f"```\n{bench.format_table(rows)}\n```\n" if rows else "bench rows: none\n")
             + "".join(f"\nfailed step {k}: {v}\n" for k, v in result.get("errors", {}).items()))
    atomic_write_text(out_dir / "gpu_check.md", table)
    return table


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False: nothing to check on this machine", file=sys.stderr)
        return 2
    lengths = tuple(int(v) for v in args.lengths.split(","))
    t0 = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "meta": run_metadata(),
              "errors": {}, "wall_s": 0.0}
    steps = (("tests", lambda: run_gpu_tests(TEST_TIMEOUT_S)),
             ("peers", bench.gpu_peers),
             ("bench_rows", lambda: bench.run_worker(
                 bench.gpu_plan(dataclasses.replace(bench.BenchConfig(), gpu_lengths=lengths),
                                result.get("peers", [])), threads=None)))
    for name, step in steps:
        try:
            result[name] = step()
        except Exception as e:  # record it and go on: the JSON must say what ran and what did not
            result["errors"][name] = f"{type(e).__name__}: {e}"[:1000]
        result["wall_s"] = time.perf_counter() - t0
        table = write_outputs(args.out_dir, result)
    print(table)
    tests_ok = result.get("tests", {}).get("returncode") == 0
    rows_ok = bool(result.get("bench_rows")) and all(r.get("ok") for r in result["bench_rows"])
    return 0 if tests_ok and rows_ok and not result["errors"] else 1

if __name__ == "__main__":
    sys.exit(main())
