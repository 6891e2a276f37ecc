"""Examples as model inputs, and the order batches are drawn in.

    encode_classification(examples, tokenizer, max_seq_len)   [CLS] a [SEP] (b [SEP]), padded arrays
    truncate_pair(len_a, len_b, budget)                       BERT's longest-first truncation
    TrainOrder(count, batch_size, seed)                       which examples make step s's batch
    eval_rows(count, batch_size)                              dev examples in fixed batches
    take(features, rows)                                      a batch of rows; -1 is a padding row

Features are a dict of numpy arrays with one row per sequence. A batch always has the global
batch size, so the steps compile once: the last batch of an epoch, or of a dev split, is filled
with padding rows whose `weights` are 0 (they count in no loss and no metric).
"""

import numpy as np

# Token ids are encoded this many texts at a time (the tokenizers batch in C++).
_CHUNK = 2048


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """The lengths google-research/bert's `_truncate_seq_pair` leaves: one token at a time off the
  end of the longer text (the second on a tie) until both fit in `budget`.

  Args:
    len_a, len_b: the two texts' lengths in tokens.
    budget: the tokens both may take together.
  Returns:
    (len_a, len_b) after truncation; unchanged when they fit.
  """
  excess = len_a + len_b - budget
  if excess <= 0:
    return len_a, len_b
  cut = min(excess, abs(len_a - len_b))  # first the longer one down to the other's length
  if len_a > len_b:
    len_a -= cut
  else:
    len_b -= cut
  excess -= cut
  return len_a - excess // 2, len_b - (excess + 1) // 2  # then alternately, the second first


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  out = []
  for start in range(0, len(texts), _CHUNK):
    out.extend(tokenizer.encode_batch(texts[start : start + _CHUNK]))
  return out


def encode_classification(examples, tokenizer, max_seq_len: int) -> dict[str, np.ndarray]:
  """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` per example (segments 0 then 1), truncated
  longest-first to `max_seq_len` and right-padded; labels as given (class ids or floats).

  Args:
    examples: `texts`, `pairs` (second texts, or None for single-text tasks) and `labels`, one per
      example (`sources.Examples`).
    tokenizer: the run's tokenizer.
    max_seq_len: L.
  Returns:
    int32 `input_ids`, `segment_ids`, `attention_mask` [N, L] and `labels` [N].
  """
  n = len(examples.texts)
  ids_NxL = np.full((n, max_seq_len), tokenizer.pad_id, np.int32)
  segments_NxL = np.zeros((n, max_seq_len), np.int32)
  mask_NxL = np.zeros((n, max_seq_len), np.int32)
  firsts = _encode_all(tokenizer, examples.texts)
  seconds = _encode_all(tokenizer, examples.pairs) if examples.pairs is not None else None
  for i, a in enumerate(firsts):
    if seconds is None:
      row = [tokenizer.cls_id, *a[: max_seq_len - 2], tokenizer.sep_id]
      second_start = len(row)
    else:
      len_a, len_b = truncate_pair(len(a), len(seconds[i]), max_seq_len - 3)
      first = [tokenizer.cls_id, *a[:len_a], tokenizer.sep_id]
      row = [*first, *seconds[i][:len_b], tokenizer.sep_id]
      second_start = len(first)
    ids_NxL[i, : len(row)] = row
    segments_NxL[i, second_start : len(row)] = 1
    mask_NxL[i, : len(row)] = 1
  return {
    "input_ids": ids_NxL,
    "segment_ids": segments_NxL,
    "attention_mask": mask_NxL,
    "labels": np.asarray(examples.labels),
  }


class TrainOrder:
  """Step s's examples: epoch s // steps_per_epoch shuffles all of them with a permutation drawn
  from (seed, epoch), and the step takes its slice. A function of (seed, step) alone, so a
  resumed run, or any process, draws the same batch; the last batch of an epoch is padded."""

  def __init__(self, count: int, batch_size: int, seed: int):
    self.count = count
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = -(-count // batch_size)
    self._epoch, self._order = -1, np.zeros(0, np.int64)  # the last epoch's permutation, kept

  def epoch_of(self, step: int) -> int:
    return step // self.steps_per_epoch

  def rows(self, step: int) -> np.ndarray:
    """Example indices of the step's global batch, -1 for padding rows."""
    epoch, index = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
    chosen = self._order[index * self.batch_size : (index + 1) * self.batch_size]
    return np.concatenate([chosen, np.full(self.batch_size - len(chosen), -1, chosen.dtype)])


def eval_rows(count: int, batch_size: int) -> list[np.ndarray]:
  """Example indices 0..count-1 in batches of `batch_size`, the last one padded with -1."""
  padded = np.concatenate([np.arange(count), np.full(-count % batch_size, -1)])
  return [padded[i : i + batch_size] for i in range(0, len(padded), batch_size)]


def take(features: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  """The rows' features and `weights` (1 for an example, 0 for a padding row, which repeats
  example 0 so that every array keeps valid values)."""
  real = rows >= 0
  index = np.where(real, rows, 0)
  batch = {k: v[index] for k, v in features.items()}
  batch["weights"] = real.astype(np.float32)
  return batch
