"""Stream 1M tokens through a small Mamba2LM with each state-collapse mitigation (mitigations.py),
on CPU, and show that memory does not grow with the stream length; also tokens/s.

What it does
    For each method (none, rri, delta, state_norm, sliding_window), in a fresh subprocess (so that the
    peak resident memory of one method does not hide another's):
        1. builds the same small random-init Mamba2LM (the weights do not matter for memory or speed);
        2. streams `--tokens` random token ids through forward() in pieces of `--piece` tokens,
           carrying the state (the context managers of mitigations.py are active the whole time);
        3. every 100K tokens (--mark) records: the process's peak resident memory (VmHWM), its
           current resident memory (VmRSS), the bytes of the carried state, and tokens/s;
        4. decodes `--step_tokens` tokens with step() after the stream (tokens/s of the step path).
    The parent prints a table and writes results.json (atomically, after each method) in --out_dir.

Commands (run from the repository root)
    # the README numbers: 1M tokens x 5 methods, a few minutes on one CPU thread
    python -m experiments.bench_mitigations --out_dir runs/bench_mitigations
    # smoke run (seconds)
    python -m experiments.bench_mitigations --out_dir runs/bench_smoke --tokens 40000 --mark 10000 --piece 5000

Memory is read from /proc/self/status (Linux); elsewhere only ru_maxrss (peak) is available.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import mitigations as mit
from minimamba import Mamba2Config, Mamba2LM

from experiments.common import REPO, ProgressBar, add_flag, atomic_write_json, run_metadata

# ---- all defaults in one place -------------------------------------------------------------------
DEFAULTS = dict(
    out_dir="runs/bench_mitigations",
    tokens=1_000_000,  # stream length
    mark=100_000,  # memory is recorded every `mark` tokens; the table compares the first mark with the end
    piece=10_000,  # tokens per forward() call (the state is carried between calls)
    step_tokens=500,  # tokens decoded with step() after the stream
    threads=1,  # torch threads (the machine is shared)
    seed=0,
    methods=("none", "rri", "delta", "state_norm", "sliding_window"),
    # the small model: 2 layers, d_model 64 -> 8 heads of 16 channels, d_state 16 (N_S = 8,976)
    model=dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=64),
    # method settings: [SC]'s RRI values for Mamba-2 370M; LongMamba's 0.5; the official k = 128;
    # tau calibrated on `calib_tokens` tokens; a 1024-token window
    lambda_a=0.9999, lambda_B=0.75, delta_factor=0.5, norm_every=128, calib_tokens=2048, window=1024,
)


def memory_kib() -> dict[str, int]:
    """Peak (VmHWM) and current (VmRSS) resident memory of this process, in KiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0])
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return out


def state_bytes(state) -> int:
    """Bytes held by a Mamba2State: conv tensors plus each layer's scan state (tensor or object)."""
    total = sum(c.numel() * c.element_size() for c in state.conv)
    for s in state.ssm:
        if isinstance(s, torch.Tensor):
            total += s.numel() * s.element_size()
        elif hasattr(s, "nbytes"):
            total += s.nbytes()
        else:  # NormState
            total += s.h.numel() * s.h.element_size()
    return total


def method_context(name: str, model, cfg: dict, gen: torch.Generator):
    """The context manager that applies method `name` to the model."""
    if name == "none":
        return contextlib.nullcontext()
    if name == "rri":
        return mit.rri(model, lambda_a=cfg["lambda_a"], lambda_B=cfg["lambda_B"])
    if name == "delta":
        return mit.delta_scaling(model, cfg["delta_factor"])
    if name == "state_norm":
        ids = torch.randint(0, cfg["model"]["vocab_size"], (1, cfg["calib_tokens"]), generator=gen)
        taus = mit.calibrate_state_norm(model, ids, every=cfg["norm_every"])
        return mit.state_norm(model, taus, every=cfg["norm_every"])
    if name == "sliding_window":
        return mit.sliding_window(model, cfg["window"])
    raise ValueError(f"unknown method {name!r}; expected one of {DEFAULTS['methods']}")


@torch.no_grad()
def worker(name: str, cfg: dict) -> dict:
    """One method: stream cfg['tokens'] tokens, return the measurements (run in a fresh process)."""
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = Mamba2LM(Mamba2Config(**cfg["model"])).eval()
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    vocab = cfg["model"]["vocab_size"]
    result = {"method": name, "start": memory_kib()}
    with method_context(name, model, cfg, gen):
        state, done, marks = None, 0, {}
        bar = ProgressBar(total=cfg["tokens"], desc=f"{name:>14}")
        t0 = time.perf_counter()
        while done < cfg["tokens"]:
            n = min(cfg["piece"], cfg["tokens"] - done)
            ids = torch.randint(0, vocab, (1, n), generator=gen)  # made per piece: flat memory
            logits, state = model(ids, state)
            done += n
            bar.update(n)
            if done % cfg["mark"] == 0 or done == cfg["tokens"]:
                elapsed = time.perf_counter() - t0
                marks[done] = {"tokens": done, "seconds": elapsed, "tokens_per_s": done / elapsed,
                               "state_bytes": state_bytes(state), "finite": bool(torch.isfinite(logits).all()),
                               **memory_kib()}
        bar.close()
        # the step path after the stream (decoding continues the carried state)
        token = logits[:, -1, :vocab].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(cfg["step_tokens"]):
            logits1, state = model.step(token, state)
            token = logits1[:, :vocab].argmax(-1)
        step_s = time.perf_counter() - t1
    result.update(marks=[marks[k] for k in sorted(marks)], step_tokens_per_s=cfg["step_tokens"] / step_s,
                  end=memory_kib())
    return result


FLAG_HELP = dict(
    out_dir="run folder (results.json)", tokens="tokens streamed per method", mark="tokens between memory records",
    piece="tokens per forward() call (the state carried between calls)", step_tokens="tokens decoded with step() "
    "after the stream", threads="torch threads in each method's subprocess", seed="seed of the model and the tokens",
    window="sliding-window length r in tokens", norm_every="state-norm clamp period in tokens",
    methods="methods to measure, each in its own subprocess")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, help in FLAG_HELP.items():
        value = DEFAULTS[key]
        add_flag(p, key, tuple[str, ...] if isinstance(value, tuple) else type(value), value, help)
    add_flag(p, "worker", str, "", "internal: measure this one method in this process and print its JSON "
             "(the parent starts one subprocess per method)")
    add_flag(p, "config_json", str, "", "internal: the parent's resolved settings, for --worker")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.config_json))), flush=True)
        return {}
    cfg = dict(DEFAULTS)
    cfg.update({k: getattr(args, k) for k in FLAG_HELP})
    if not 0 < cfg["mark"] <= cfg["tokens"] or cfg["mark"] % cfg["piece"] or cfg["tokens"] % cfg["piece"]:
        raise SystemExit(f"need 0 < mark <= tokens, both multiples of piece; got mark={cfg['mark']}, "
                         f"tokens={cfg['tokens']}, piece={cfg['piece']}")
    out = Path(cfg["out_dir"])
    report = {"config": cfg, "meta": run_metadata(), "state_size_N_S": mit.state_size(Mamba2Config(**cfg["model"])),
              "results": []}
    for name in cfg["methods"]:
        proc = subprocess.run([sys.executable, "-m", "experiments.bench_mitigations", "--worker", name,
                               "--config_json", json.dumps(cfg)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"method {name} failed (exit code {proc.returncode}); see the error above")
        report["results"].append(json.loads(lines[-1][len("RESULT "):]))
        atomic_write_json(out / "results.json", report)  # a killed run keeps the methods done so far
    # the table
    print(f"\n{cfg['tokens']:,} tokens in pieces of {cfg['piece']:,}, model {cfg['model']}, "
          f"{cfg['threads']} thread(s), {report['meta']['processor']}")
    head = (f"{'method':>15} | {'peak RSS MiB @' + str(cfg['mark'] // 1000) + 'K':>17} | "
            f"{'@' + str(cfg['tokens'] // 1000) + 'K':>8} | {'RSS MiB @end':>12} | {'state KiB':>9} | "
            f"{'tok/s stream':>12} | {'tok/s step':>10} | peak RSS MiB at each mark")
    print(head + "\n" + "-" * len(head))
    for r in report["results"]:
        a, b = r["marks"][0], r["marks"][-1]
        print(f"{r['method']:>15} | {a['VmHWM'] / 1024:>17.1f} | {b['VmHWM'] / 1024:>8.1f} | "
              f"{b.get('VmRSS', 0) / 1024:>12.1f} | {b['state_bytes'] / 1024:>9.1f} | "
              f"{b['tokens_per_s']:>12.0f} | {r['step_tokens_per_s']:>10.0f} | "
              + " ".join(f"{m['VmHWM'] / 1024:.0f}" for m in r["marks"]))
    print(f"\nwrote {out / 'results.json'}")
    return report


if __name__ == "__main__":
    main()
