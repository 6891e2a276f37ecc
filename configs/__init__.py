"""Experiment configs: `common.py` holds every default, the other files are deltas."""
