"""Shared test setup: import the top-level modules from the repository root, few threads."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def max_rel_err(actual, expected):
    """max |actual - expected| / max |expected|: the figure the closing notes report."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
