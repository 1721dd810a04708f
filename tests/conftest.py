"""Shared test setup: import the top-level modules from the repository root, few threads."""
import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))

# HYPOTHESIS_PROFILE=ci (set by .ci/run): the same examples on every run, so a CI verdict is about the code
# and not about the draw; a plain local run draws fresh examples each time and keeps exploring
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `transformers` (compatibility with Hugging Face's Mamba2) skip where it is not installed."""
    try:
        present = importlib.util.find_spec("transformers") is not None
    except ValueError:  # sys.modules["transformers"] is None: imports of it are blocked
        present = False
    if not present:
        skip = pytest.mark.skip(reason="needs transformers (pip install -e '.[test]')")
        for item in items:
            if "transformers" in item.keywords:
                item.add_marker(skip)


def max_rel_err(actual, expected):
    """max |actual - expected| / max |expected|: the figure the closing notes report."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
