"""Issue 22's capacity experiments at GPU size: T_forget and MQAR capacity past the CPU grid, one H200.

Commands (run from the repository root; never run in CI, it needs CUDA)
    # calibrate (about a minute) and print the estimated wall time of both runs, train nothing
    python -m experiments.capacity_gpu --dry_run
    # both runs, if the estimate fits the budget (refused otherwise: pass smaller --seeds / grids)
    python -m experiments.capacity_gpu
    # one of them
    python -m experiments.capacity_gpu --only t_forget

Why these sizes
    The CPU grid (experiments/t_forget.py --quick) reaches T_train 256 and d_state 64 (N_S 17,920), whose
    T_forget it left right-censored in the pre-registered reading. Here: d_state 16, 64, 128 (N_S 35,072:
    the paper's proportional T_forget is 181 tokens) and T_train 32-256, the same recipe: what the GPU adds
    is a larger state in minutes. The recall stream cannot go past T 380 (191 one-byte keys; a longer T
    needs multi-byte keys, a new process).
    The CPU MQAR run (experiments/mqar_capacity.py --quick) sweeps k up to 32 at T 128; here k up to 64
    (recall.py has 95 one-byte keys) at T 512 and d_state up to 256.
    Same recipes, thresholds and readouts (PREREGISTRATION.md); only the grids grow.

Steps
    1. calibrate: time CALIBRATION_STEPS real training steps (model, batch, optimizer) at each T of
       both grids, after a warmup; seconds per step x steps x models / workers -> estimated wall time
    2. refuse if the estimate exceeds BUDGET_S (say what it was), else run the two sweeps with
       `workers` processes sharing the GPU (the models are small: one process leaves it mostly idle)
Outputs: runs/t_forget_gpu/ and runs/mqar_capacity_gpu/ (each with calibration.json)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from experiments import mqar_capacity as MC
from experiments import recall_stream as RS
from experiments import t_forget as TF
from experiments.common import add_flag, atomic_write_json
from experiments.sweep import run_sweep
from experiments.train import TrainConfig, build_model, lm_loss, make_optimizer

CALIBRATION_STEPS = 20  # timed steps per T (after WARMUP_STEPS)
WARMUP_STEPS = 5  # untimed steps first (CUDA kernels, allocator)
BUDGET_S = 540.0  # both runs must fit this (10 minutes less the calibration)
T_FORGET_GPU = dict(out_dir="runs/t_forget_gpu", d_states=(16, 64, 128), train_lens=(32, 64, 128, 256),
                    seeds=(0, 1, 2), device="cuda", workers=6)  # T <= 380: the recall stream's 191 keys
MQAR_GPU = dict(out_dir="runs/mqar_capacity_gpu", d_states=(16, 64, 256), seq_len=512,
                train_ks=(1, 2, 4, 8, 16, 32, 64), eval_ks=(1, 2, 4, 8, 16, 32, 64),  # k <= 95 distinct keys
                tokens_per_step=8192, seeds=(0, 1, 2), device="cuda", workers=6)


def seconds_per_step(d_state: int, seq_len: int, rows: int, batch_fn, d_model: int, n_layer: int,
                     headdim: int, device: str = "cuda") -> float:
    """Wall seconds of one training step (forward, backward, AdamW) on `device`, as train.py takes it
    (bf16 autocast on CUDA)."""
    dev = torch.device(device)
    tcfg = TrainConfig(d_model=d_model, n_layer=n_layer, d_state=d_state, headdim=headdim, seq_len=seq_len,
                       batch_size=rows, chunk_size=min(64, seq_len), task="custom", device=device)
    torch.manual_seed(0)
    model = build_model(tcfg).to(dev)
    opt = make_optimizer(model, tcfg)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)  # noqa: E731
    for step in range(WARMUP_STEPS + CALIBRATION_STEPS):
        if step == WARMUP_STEPS:
            sync()
            t0 = time.perf_counter()
        batch = batch_fn(step)
        rows_t, mask = batch if isinstance(batch, tuple) else (batch, None)
        rows_t = rows_t.to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits, _ = model(rows_t[:, :-1], None, return_state=False)
        loss = lm_loss(logits, rows_t[:, 1:], None if mask is None else mask.to(dev).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / CALIBRATION_STEPS


def estimate_t_forget(cfg: TF.TForgetConfig) -> dict:
    """Seconds per step at each T (largest d_state), and the run's estimated wall time."""
    per_t = {}
    for t in cfg.train_lens:
        rows = cfg.tokens_per_step // t
        batches = RS.StreamBatches(TF.process(cfg, t), seed=10**6, batch_size=rows, row_len=t + 1)
        per_t[t] = seconds_per_step(max(cfg.d_states), t, rows, batches, cfg.d_model, cfg.n_layer, cfg.headdim)
    total = sum(per_t[t] * cfg.steps for t in cfg.train_lens) * len(cfg.d_states) * len(cfg.seeds)
    return {"s_per_step": per_t, "estimated_s": total / cfg.workers}


def estimate_mqar(cfg: MC.CapacityConfig) -> dict:
    s = seconds_per_step(max(cfg.d_states), cfg.seq_len, cfg.tokens_per_step // cfg.seq_len,
                         MC.MixedKBatches(cfg, seed=10**6), cfg.d_model, cfg.n_layer, cfg.headdim)
    return {"s_per_step": s, "estimated_s": s * cfg.steps * len(cfg.d_states) * len(cfg.seeds) / cfg.workers}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flag(p, "dry_run", bool, False, "calibrate and print the estimates, train nothing")
    add_flag(p, "only", str, "", "t_forget | mqar: run one of the two (default both)")
    add_flag(p, "seeds", str, "0,1,2", "seeds of both runs (comma-separated)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.only not in ("", "t_forget", "mqar"):
        sys.exit(f"--only must be t_forget or mqar, got {args.only!r}")
    if not torch.cuda.is_available():
        sys.exit("experiments.capacity_gpu needs CUDA (use experiments.t_forget / mqar_capacity --quick on a CPU)")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    runs = []
    if args.only in ("", "t_forget"):
        runs.append(("t_forget", TF.TForgetConfig(**{**T_FORGET_GPU, "seeds": seeds}), TF, estimate_t_forget))
    if args.only in ("", "mqar"):
        runs.append(("mqar_capacity", MC.CapacityConfig(**{**MQAR_GPU, "seeds": seeds}), MC, estimate_mqar))
    estimates = {name: est(cfg) for name, cfg, _, est in runs}
    total = sum(e["estimated_s"] for e in estimates.values())
    facts = {"device": torch.cuda.get_device_name(0), "estimates": estimates, "estimated_total_s": total,
             "budget_s": BUDGET_S}
    print(json.dumps(facts, indent=1), file=sys.stderr)
    if args.dry_run:
        return
    if total > BUDGET_S:
        sys.exit(f"estimated {total:.0f} s > budget {BUDGET_S:.0f} s: pass fewer --seeds or run --only one")
    for name, cfg, module, _ in runs:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.out_dir) / "calibration.json", facts)
        results = run_sweep(cfg, module.grid(cfg), module.run_point, name, prereg_commit=module.prereg_commit(),
                            calibration=facts)
        module.report(cfg, results, Path(cfg.out_dir), module.run_record(Path(cfg.out_dir)))


if __name__ == "__main__":
    main()
