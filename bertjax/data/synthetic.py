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


def synthetic_packed_batch(
  batch_size: int, seq_len: int, max_predictions: int, vocab_size: int, max_pairs: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
  """A packed batch (`data.pack_pairs`) from `seed` alone: every row full, split into 1 to
  `max_pairs` pairs at random cuts (each pair at least 5 tokens), each pair `[CLS]`-first with its
  own positions and segments; predictions spread over the row's non-[CLS] tokens, every slot used.

  Returns the arrays of `synthetic_batch` plus position_ids, pair_ids [B, L] and nsp_positions,
  nsp_labels, nsp_weights [B, max_pairs].

  Args:
    batch_size, seq_len, max_predictions, vocab_size: as in `synthetic_batch`.
    max_pairs: K, the pair slots of a row.
    seed: the only source of randomness.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, (batch_size, seq_len)).astype(np.int32)
  pair_ids = np.zeros((batch_size, seq_len), np.int32)
  position_ids = np.zeros_like(pair_ids)
  segment_ids = np.zeros_like(pair_ids)
  nsp_positions = np.zeros((batch_size, max_pairs), np.int32)
  nsp_weights = np.zeros((batch_size, max_pairs), np.float32)
  for r in range(batch_size):
    k = int(rng.integers(1, min(max_pairs, seq_len // 5) + 1))
    cuts = np.sort(rng.choice(np.arange(1, seq_len // 5), k - 1, replace=False)) * 5 if k > 1 else np.zeros(0, int)
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    ends = np.concatenate([cuts, [seq_len]]).astype(np.int64)
    for j, (s, e) in enumerate(zip(starts, ends)):
      pair_ids[r, s:e] = j + 1
      position_ids[r, s:e] = np.arange(e - s)
      segment_ids[r, s + (e - s) // 2 : e] = 1
    nsp_positions[r, :k] = starts
    nsp_weights[r, :k] = 1.0
  is_cls = np.zeros((batch_size, seq_len), bool)
  np.put_along_axis(is_cls, nsp_positions, True, axis=1)
  candidates = [np.flatnonzero(~row) for row in is_cls]
  positions = np.stack([np.sort(rng.choice(c, max_predictions, replace=False)) for c in candidates]).astype(np.int32)
  return {
    "input_ids": ids,
    "segment_ids": segment_ids,
    "attention_mask": np.ones((batch_size, seq_len), np.int32),
    "position_ids": position_ids,
    "pair_ids": pair_ids,
    "masked_positions": positions,
    "masked_ids": np.take_along_axis(ids, positions, 1),
    "masked_weights": np.ones((batch_size, max_predictions), np.float32),
    "nsp_positions": nsp_positions,
    "nsp_labels": np.where(nsp_weights > 0, rng.integers(0, 2, (batch_size, max_pairs)), 0).astype(np.int32),
    "nsp_weights": nsp_weights,
  }
