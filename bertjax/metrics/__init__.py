"""What a run measures: the FLOP model and MFU, the metrics writers, the progress line, plots."""
