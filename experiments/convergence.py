"""A convergence check on a training loss curve: refuse a run that is still learning, or never learned.

What this is
    Support code (no experiment of its own) for the baselines of the forgetting-curve comparison.
    A model compared at a loss it has not reached yet measures its training budget, not its
    architecture: the toy Transformer baseline (experiments/tiny_transformer.py) once finished at
    a loss of 1.52-2.65 nats/byte against Mamba-2's 1.0-1.14, and was averaged in all the same.
    `check_converged` makes such a run fail loudly instead, naming the run and the numbers.

Papers
    Forgetting Curve (arXiv 2410.04727): compares models that are each trained well; Stuffed Mamba
    (arXiv 2410.07145): the recipe the Mamba-2 runs follow.

The rule (two tests on the logged loss curve, one entry per logged step)
    1. plateau:  (mean(previous window) - mean(last window)) / mean(previous window) <= rel_tol
                 (the loss no longer falls by more than rel_tol per window: more steps would not help much)
    2. level:    mean(last window) <= loss_ceiling
                 (a plateau above the ceiling is a run that never learned, e.g. one that never copies)
    A run failing either raises NotConverged. A rising loss passes test 1 (it is not "still falling");
    a diverging run is caught earlier by experiments/train.py's TrainingDiverged or by test 2.

Glossary
    W  window: entries of the loss curve averaged together (logged steps)
    loss  mean next-token cross-entropy, nats per token (= per byte for byte-level models)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# ----------------------------------------------------------------------------------------------
# Defaults (one block; units and sources)
# ----------------------------------------------------------------------------------------------

WINDOW = 50  # W, loss-curve entries (logged steps) per window
REL_TOL = 0.01  # largest relative fall of the window mean (fraction) a converged run may still show
LOSS_CEILING = 1.5  # nats per byte: the highest last-window mean loss accepted. Default for the stdlib
#                     byte corpus, where the Mamba-2 toys end at 1.0-1.14 and the undertrained
#                     Transformer at 1.52-2.65 (issue 22); set it per corpus and task


class NotConverged(RuntimeError):
    """A run that the convergence check refuses; the message names the run and the numbers."""


@dataclass(frozen=True)
class ConvergenceConfig:
    """The thresholds of `check_converged`."""

    window: int = WINDOW  # W, entries (logged steps) per window; the curve needs >= 2 W entries
    rel_tol: float = REL_TOL  # fraction: largest accepted (prev - last) / prev of the window means
    loss_ceiling: float = LOSS_CEILING  # nats/token: largest accepted last-window mean (math.inf: no ceiling)

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1 loss-curve entries, got {self.window}")
        if not (math.isfinite(self.rel_tol) and self.rel_tol >= 0):
            raise ValueError(f"rel_tol must be a finite fraction >= 0, got {self.rel_tol}")
        if math.isnan(self.loss_ceiling) or self.loss_ceiling <= 0:
            raise ValueError(f"loss_ceiling must be > 0 nats/token (math.inf for none), got {self.loss_ceiling}")


@dataclass(frozen=True)
class ConvergenceReport:
    """What `check_converged` measured on an accepted run."""

    run: str  # the run's name, as passed
    last_mean: float  # mean loss of the last window (nats/token)
    prev_mean: float  # mean loss of the window before it (nats/token)
    rel_drop: float  # (prev_mean - last_mean) / prev_mean: the relative fall per window (negative: rising)
    config: ConvergenceConfig  # the thresholds applied


def check_converged(losses: Sequence[float], *, run: str,
                    cfg: ConvergenceConfig = ConvergenceConfig()) -> ConvergenceReport:
    """Accept a loss curve that has plateaued below the ceiling; raise NotConverged otherwise.

    Args:
        losses: the training loss per logged step, oldest first (nats/token), at least 2 W entries.
        run: a name for the run (its folder, arch and seed), used in the messages.
        cfg: the thresholds.
    Returns:
        ConvergenceReport of the accepted run.
    Raises:
        ValueError: too short a curve, or non-finite entries (a diverged run).
        NotConverged: the loss still falls by more than rel_tol per window, or ends above the ceiling.
    """
    values = [float(v) for v in losses]
    W = cfg.window
    if len(values) < 2 * W:
        raise ValueError(f"run {run}: the loss curve has {len(values)} entries, the check needs at least "
                         f"2 windows of {W}: train longer, log more often, or pass a smaller window")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"run {run}: the loss curve holds non-finite values (first at entry {bad[0]} of "
                         f"{len(values)}): the run diverged; it cannot be checked for convergence")
    # 1. plateau: the relative fall of the window mean
    last = sum(values[-W:]) / W
    prev = sum(values[-2 * W:-W]) / W
    rel_drop = (prev - last) / prev if prev > 0 else 0.0
    if rel_drop > cfg.rel_tol:
        raise NotConverged(f"run {run} has not converged: its mean loss fell from {prev:.4f} to {last:.4f} "
                           f"nats over the last two windows of {W} entries, a relative fall of {rel_drop:.4f} > "
                           f"rel_tol {cfg.rel_tol}: train it longer (or at a better learning rate)")
    # 2. level: a plateau above the ceiling never learned the task
    if last > cfg.loss_ceiling:
        raise NotConverged(f"run {run} plateaued above the loss ceiling: last-window mean loss {last:.4f} > "
                           f"{cfg.loss_ceiling} nats (windows of {W} entries; previous window {prev:.4f}): "
                           "it has not learned the task; retune its learning rate or its size")
    return ConvergenceReport(run=run, last_mean=last, prev_mean=prev, rel_drop=rel_drop, config=cfg)
