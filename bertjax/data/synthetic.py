"""Synthetic batches in the pipeline's array names: the shape of real data, no corpus needed.

`bertjax bench` times the train step on them (full rows, as BERT's pair construction mostly
gives), and tests use the padded form (rows of random length, a padded prediction slot in every
other row) to exercise the masks and weights.
"""

import numpy as np

FIRST_ORDINARY_ID = 5  # ids below are the special tokens of a tokenizer bertjax trains


def synthetic_batch(
  batch_size: int, seq_len: int, max_predictions: int, vocab_size: int, *, seed: int = 0, padded: bool = False
) -> dict[str, np.ndarray]:
  """A batch as the input pipeline lays it out, from `seed` alone.

  Args:
    batch_size, seq_len, max_predictions, vocab_size: the shapes and the id range.
    seed: the only source of randomness.
    padded: rows of random length in [seq_len / 2, seq_len] (the first full), right-padded, and
      the last prediction slot of odd rows unused (weight 0); else every row is full and every
      prediction slot used.
  Returns:
    input_ids, segment_ids, attention_mask [B, L]; masked_positions, masked_ids, masked_weights
    [B, P] (distinct real positions after [CLS]); nsp_labels [B].
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, (batch_size, seq_len)).astype(np.int32)
  if padded:
    lengths = rng.integers(seq_len // 2, seq_len + 1, batch_size)
    lengths[0] = seq_len
  else:
    lengths = np.full(batch_size, seq_len)
  attention_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(attention_mask == 1, ids, 0)
  segment_ids = ((np.arange(seq_len)[None] >= (lengths // 2)[:, None]) & (attention_mask == 1)).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, n), max_predictions, replace=False)) for n in lengths])
  weights = np.ones((batch_size, max_predictions), np.float32)
  if padded:
    weights[1::2, -1] = 0.0
  positions = np.where(weights > 0, positions, 0).astype(np.int32)
  masked_ids = np.where(weights > 0, np.take_along_axis(ids, positions, 1), 0).astype(np.int32)
  return {
    "input_ids": ids,
    "segment_ids": segment_ids,
    "attention_mask": attention_mask,
    "masked_positions": positions,
    "masked_ids": masked_ids,
    "masked_weights": weights,
    "nsp_labels": rng.integers(0, 2, batch_size).astype(np.int32),
  }
