"""Experiment scripts for minimamba: data, training, and the state-collapse demo (run as python -m experiments.X)."""
