"""What the cached and the streaming pipelines share: the interface, examples, rows, the iterator.

Both pipelines give the same interface (`Pipeline`): `batch(step, rows)` is the global batch of
a training step, or just the rows a process holds; `eval_batches(rows)` the fixed held-out
batches; `iterator(start, rows)` a prefetching iterator; `state_for(step)` / `restore(state)` the
data position a checkpoint records. `make_examples` lays out and masks pairs the same way for
both (`packing.RowLayout` packs them into rows with data.pack_pairs), `packing_state` is what a
data position records of packing, and `BatchIterator` runs either one ahead in a background thread.
"""

import queue
import threading
from typing import Protocol

import numpy as np

from bertjax.data import masking
from bertjax.data import pairs as pairs_lib
from bertjax.errors import BertjaxError

STATE_VERSION = 1
TRAIN_STREAM, EVAL_STREAM = 0, 1  # pair-index streams of the keyed generators
# Salts of the keyed draws, named once: they are part of the data order that a resumed run must
# see again bit for bit, so changing one changes every run's batches.
PAIRS_SALT = 0x9A1  # an epoch's (or window's) NSP pairs
SHUFFLE_SALT = 0x5F1  # the order of an epoch's (or window's) pairs
EVAL_SALT = 0xE7A1  # the held-out documents, and the eval rows' masking keys


class Pipeline(Protocol):
  """The interface of `cached.CachedPipeline` and `streaming.StreamingPipeline`."""

  tokenizer: object
  batch_size: int

  def batch(self, step: int, rows=None) -> dict[str, np.ndarray]: ...
  def eval_batches(self, rows=None) -> list[dict[str, np.ndarray]]: ...
  def iterator(self, start_step: int = 0, rows=None) -> "BatchIterator": ...
  def iterator_from_state(self, state: dict, rows=None) -> "BatchIterator": ...
  def state_for(self, step: int) -> dict: ...
  def restore(self, state: dict) -> int: ...
  def epoch_of(self, step: int) -> float: ...


def keyed_generator(*key: int) -> np.random.Generator:
  """A generator seeded from a tuple of integers (seed, epoch, purpose, ...); never global."""
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(list(key))))


def check_rows(rows, batch_size: int) -> np.ndarray:
  """`rows` (global batch rows, None = all) as an int64 array, checked against the batch size."""
  if rows is None:
    return np.arange(batch_size)
  rows = np.asarray(rows, np.int64).reshape(-1)
  if len(rows) and (rows.min() < 0 or rows.max() >= batch_size):
    raise ValueError(f"rows must lie in [0, {batch_size}), got {rows.min()}..{rows.max()}")
  return rows


def make_examples(
  tokens, pair_index: pairs_lib.PairIndex, keys: np.ndarray, seq_len: int, tokenizer, spec: masking.MaskingSpec
) -> dict[str, np.ndarray]:
  """Laid-out, masked examples of `pair_index` (spans into `tokens`), masked with `keys`.

  Args:
    tokens: the flat token array that `pair_index`'s spans point into.
    pair_index: N pairs, already truncated to fit `seq_len`.
    keys: uint64 [N], one masking key per pair (`keyed_random.row_keys` or `window_keys`).
    seq_len: L, the row length.
    tokenizer: the run's tokenizer (its [CLS], [SEP] and [PAD] ids).
    spec: the masking settings.
  Returns:
    `masking.mask_batch`'s arrays plus int32 `segment_ids` and `attention_mask` [N, L] and
    `nsp_labels` [N].
  """
  t = tokenizer
  ids, segment_ids, attention_mask = pairs_lib.assemble(tokens, pair_index, seq_len, t.cls_id, t.sep_id, t.pad_id)
  out = masking.mask_batch(ids, attention_mask, keys, spec)
  out["segment_ids"] = segment_ids
  out["attention_mask"] = attention_mask
  out["nsp_labels"] = pair_index.label.astype(np.int32)
  return out


def packing_state(max_pairs: int | None) -> dict:
  """What a data position records of packing: nothing without it (positions count pairs), else
  the row size (positions count packed rows)."""
  return {} if max_pairs is None else {"max_pairs_per_row": max_pairs}


def check_packing_state(state: dict, max_pairs: int | None) -> None:
  """Refuses a saved position whose examples were packed differently (its step means other rows)."""
  saved = state.get("max_pairs_per_row")
  if saved != max_pairs:

    def describe(k):
      return "data.pack_pairs=false" if k is None else f"data.pack_pairs=true, data.max_pairs_per_row={k}"

    raise BertjaxError(
      f"the checkpoint's data order used {describe(saved)}, this run {describe(max_pairs)}: resume with the same values"
    )


def merge_parts(made, n_rows: int) -> dict[str, np.ndarray]:
  """One batch from parts [(row selector, batch of those rows)] (a batch straddling epochs or
  stream windows)."""
  if len(made) == 1:
    return made[0][1]
  out = {}
  for name, first in made[0][1].items():
    arr = np.empty((n_rows,) + first.shape[1:], first.dtype)
    for sel, b in made:
      arr[sel] = b[name]
    out[name] = arr
  return out


class BatchIterator:
  """A background thread computes batches ahead; `state()` is the consumer's position."""

  def __init__(self, pipeline, start_step: int, rows, prefetch: int):
    self._pipeline = pipeline
    self._next = start_step
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(start_step, rows), daemon=True, name="bertjax-data")
    self._thread.start()

  def _produce(self, step, rows):
    while not self._stop.is_set():
      try:
        item = (step, self._pipeline.batch(step, rows))
      except BaseException as e:  # hand it to the consumer, who re-raises it
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return
      step += 1

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    self._next = item[0] + 1
    return item

  def state(self) -> dict:
    """The pipeline's `state_for` the next step to consume: what a checkpoint records."""
    return self._pipeline.state_for(self._next)

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
