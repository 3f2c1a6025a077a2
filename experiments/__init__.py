"""Experiment scripts that turn cbir sweeps into the study's findings (see README, Experiments)."""
