"""State collapse at toy scale (work in progress: analysis functions first, the demo follows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

COLLAPSE_FACTOR = 2.0  # [SC] "fails to forget" if loss anywhere beyond T_train > 2x the max within it


@dataclass(frozen=True)
class CollapseResult:
    collapsed: bool
    first_position: int | None  # first position >= T_train whose loss exceeds the threshold
    threshold: float  # factor * max_within
    max_within: float  # max loss over positions [0, T_train)
    max_beyond: float  # max loss over positions [T_train, l)


def collapse_criterion(loss: torch.Tensor, t_train: int, factor: float = COLLAPSE_FACTOR) -> CollapseResult:
    """The paper's failure criterion on a per-position loss curve (averaged over prompts).

    [SC] section "State capacity": a model fails to forget if
        max_{t >= T_train} loss_t  >  factor * max_{t < T_train} loss_t      (factor = 2)

    Args:
        loss: (l,) mean loss at each position, l > t_train.
        t_train: the training length T_train.
        factor: multiple of the in-window maximum that counts as collapse.
    """
    loss = torch.as_tensor(loss, dtype=torch.float64).flatten()
    if loss.numel() <= t_train:
        raise ValueError(f"the loss curve ({loss.numel()} positions) must be longer than t_train={t_train}")
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    max_within = loss[:t_train].max().item()
    beyond = loss[t_train:]
    threshold = factor * max_within
    over = torch.nonzero(beyond > threshold)
    first = int(over[0]) + t_train if over.numel() else None
    return CollapseResult(first is not None, first, threshold, max_within, beyond.max().item())
