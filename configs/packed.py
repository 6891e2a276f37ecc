"""BERT-base's recipe and phases (`configs/base.py`) with sequence packing: several NSP pairs a row.

`configs/packed.py:phase=2` packs the seq-512 phase, where short documents pad most. Each row
holds up to `data.max_pairs_per_row` pairs, each with its own `[CLS]`, positions from 0, masks
(BERT's count per pair) and NSP label, attending only within itself (docs/data.md, "Packing").
`train.batch_size` still counts rows: a step computes as many positions as BERT's and trains on
more pairs, because fewer of those positions are padding (docs/performance.md).
"""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.data.pack_pairs = True
  # Enough slots that padding stays near 2% on the builtin corpus: at seq 128 no row took more
  # than 3 pairs; at 512, 4 slots left 3.4% padding and 8 left 0.6% (docs/performance.md).
  c.data.max_pairs_per_row = 4 if c.data.seq_len <= 128 else 8
  return c
