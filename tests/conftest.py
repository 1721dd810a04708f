"""Shared test setup: import the top-level modules from the repository root, few threads."""
import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

# HYPOTHESIS_PROFILE=ci (set by .ci/run): the same examples on every run, so a CI verdict is about the code
# and not about the draw; a plain local run draws fresh examples each time and keeps exploring
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def max_rel_err(actual, expected):
    """max |actual - expected| / max |expected|: the figure the closing notes report."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
