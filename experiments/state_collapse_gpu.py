"""The state-collapse question at a size where the papers' precondition is likely: one H200, <= 10 minutes.

Commands (run from the repository root; never run in CI, it needs CUDA)
    # one seed: 60 s throughput calibration, then train the recipe for what fits, then every measurement
    python -m experiments.state_collapse_gpu --seeds 0
    # what the calibration would choose, without training (seconds)
    python -m experiments.state_collapse_gpu --dry_run

Why this size
    At CPU size (d_model 64, 2 layers) the models barely copy from the far half of their window (the
    gate of experiments/state_collapse.py), so state collapse can only just be asked. Here: d_model 256,
    6 layers, d_state 128, headdim 64 (N_S about 1.6M elements with the conv state), T_train 256 on the
    same repeat-span process, a few hundred M bytes per run.

Steps
    1. calibrate: time the real training step (the model, batch and optimizer of the run) for
       CALIBRATION_S seconds after a warmup; tokens/s -> steps that fit TRAIN_BUDGET_S
    2. run experiments/state_collapse.py's protocol (PREREGISTRATION.md) with those steps: the base model,
       its gate, horizon, E(k), bucketed criterion, mechanism and training-free fixes; --variants adds
       the training-side variants (each one more run of the same budget: several H200 sessions)
Outputs: runs/state_collapse_gpu/ (calibration.json beside the run folder of state_collapse.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from experiments import recipe as R
from experiments import state_collapse as SC
from experiments.common import add_flag, atomic_write_json
from experiments.data import Corpus
from experiments.sweep import run_sweep
from experiments.train import TrainConfig, build_model, make_optimizer, token_losses

CALIBRATION_S = 60.0  # seconds of timed training steps before the run
WARMUP_STEPS = 5  # untimed steps first (CUDA kernels, allocator)
TRAIN_BUDGET_S = 360.0  # seconds of training the run may take (the rest of 10 minutes: calibration, evaluation)
MAX_BYTES = 400_000_000  # never more than this many training bytes per run
GPU = dict(out_dir="runs/state_collapse_gpu", d_model=256, n_layer=6, headdim=64, train_lens=(256,),
           d_states=(128,), fix_cell=(), seeds=(0,), tokens_per_step=65536, lr=1e-3, eval_prompts=32,
           val_prompts=8, chunk_len=1024, device="cuda", workers=1)


def calibrate(cfg: SC.DemoConfig, seconds: float = CALIBRATION_S) -> float:
    """Training tokens per second of the run's own step (forward, backward, AdamW) on cfg.device."""
    t = cfg.train_lens[0]
    tcfg = TrainConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_states[0], headdim=cfg.headdim,
                       seq_len=t, batch_size=cfg.tokens_per_step // t, chunk_size=min(64, t), lr=cfg.lr,
                       task="custom", device=cfg.device)
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    model = build_model(tcfg).to(device)
    opt = make_optimizer(model, tcfg)
    batches = R.RecipeBatches(Corpus.load(), SC.process(cfg, t), seed=10**6, batch_size=tcfg.batch_size,
                              row_len=t + 1)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731
    done, t0, step = 0, None, 0
    while t0 is None or time.perf_counter() - t0 < seconds:
        if step == WARMUP_STEPS:
            sync()
            t0, done = time.perf_counter(), 0
        rows = batches(step).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):  # as train.py
            logits, _ = model(rows[:, :-1], None, return_state=False)
        loss = token_losses(logits, rows[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += rows.shape[0] * t
        step += 1
    sync()
    return done / (time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = SC.config_parser(SC.DemoConfig, __doc__.split("\n")[0], GPU)
    add_flag(p, "dry_run", bool, False, "calibrate and print the chosen steps, train nothing")
    add_flag(p, "variants", bool, False, "also train the training-side variants (one more budget each)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = SC.config_from_args(SC.DemoConfig, args, GPU)
    if not torch.cuda.is_available():
        sys.exit("experiments.state_collapse_gpu needs CUDA (use experiments.state_collapse on a CPU)")
    tok_s = calibrate(cfg)
    steps = int(min(TRAIN_BUDGET_S * tok_s, MAX_BYTES) // cfg.tokens_per_step)
    cfg = dataclasses.replace(cfg, steps=steps, fix_cell=(cfg.train_lens[0], cfg.d_states[0]) if args.variants else ())
    facts = {"tokens_per_s": round(tok_s), "steps": steps, "bytes_per_run": steps * cfg.tokens_per_step,
             "device": torch.cuda.get_device_name(0), "calibration_s": CALIBRATION_S}
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.out_dir) / "calibration.json", facts)
    print(json.dumps(facts), file=sys.stderr)
    if args.dry_run:
        return
    results = run_sweep(cfg, SC.demo_points(cfg), SC.run_point, "collapse-gpu", prereg_commit=SC.prereg_commit(),
                        calibration=facts)
    SC.report(cfg, results, Path(cfg.out_dir), SC.run_record(Path(cfg.out_dir)))


if __name__ == "__main__":
    main()
