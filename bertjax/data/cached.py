"""Global batches from the tokenised, memory-mapped corpus: deterministic, per process, resumable.

Data order is global. All pairs of epoch e are drawn from (seed, e) and shuffled; the epochs are
laid end to end into one stream of examples, and step s takes positions [s B, (s + 1) B) of it.
Example (e, i) is masked with keys from (seed, e, i). So the batch of step s depends only on the
seed, the corpus and s; any subset of its rows can be built alone (a process builds just the rows
its devices hold), and the iterator's state is just the consumer's next step.

Held-out documents (data.eval_fraction of them, chosen from the seed) never reach training; their
pairs and masks are drawn once (epoch 0) so every evaluation sees the same batches.

With data.pack_pairs, each epoch's shuffled pairs are packed into rows (`packing.py`) and the rows
take the place of the pairs in that stream; pair i of epoch e is still masked with keys from
(seed, e, i).

Epochs are built ahead (`epochs.py`): when a batch first needs epoch e, epoch e + 1 starts
building in a background thread, so the batch that crosses the boundary does not wait for it.

`pipeline.make_pipeline(config, tokenizer)` chooses between this `CachedPipeline` and, with
data.streaming, `streaming.StreamingPipeline` (same interface, no tokenised cache).
"""

import logging

import numpy as np

from bertjax.data import keyed_random, masking, packing
from bertjax.data import pairs as pairs_lib
from bertjax.data.base import (
  EVAL_SALT,
  EVAL_STREAM,
  STATE_VERSION,
  BatchIterator,
  check_packing_state,
  check_rows,
  keyed_generator,
  merge_parts,
  packing_state,
)
from bertjax.data.corpus import load_corpus
from bertjax.data.epochs import EpochRecipe, EpochTable
from bertjax.data.token_store import cache_root, open_token_store
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)


class CachedPipeline:
  """Global batches of training step s (or chosen rows of them), eval batches, and an iterator."""

  def __init__(self, config, tokenizer, workdir=None):
    del workdir  # the tokenised cache is shared between runs: data.cache_dir or the user cache
    d = config.data
    self.config = config
    self.tokenizer = tokenizer
    self.seed = int(config.train.seed)
    self.batch_size = int(config.train.batch_size)
    self.seq_len = int(d.seq_len)
    self.corpus = load_corpus(config)
    self.store = open_token_store(self.corpus, tokenizer, cache_root(d), int(d.num_proc))
    if self.store.meta["tokenizer"] != tokenizer.fingerprint:
      raise BertjaxError("tokenised cache does not match the tokenizer: clear data.cache_dir")
    self.masking = masking.MaskingSpec.from_config(d, tokenizer)
    self.layout = packing.RowLayout.from_config(d, tokenizer, self.masking)
    self.train_docs, self.eval_docs = _split_documents(
      self.store.num_documents, float(d.eval_fraction), self.seed, self.corpus.source
    )
    self._recipe = EpochRecipe(
      self.store.sent_start,
      self.store.doc_start,
      self.seq_len,
      float(d.short_seq_prob),
      float(d.pair_random_next_prob),
      self.seed,
      self.layout,
      self.train_docs,
    )
    self._epochs = EpochTable(self._recipe)
    self._eval: tuple[pairs_lib.PairIndex, packing.Packing | None] | None = None

  # -- sizes and positions ------------------------------------------------------------------
  @property
  def stats(self) -> dict:
    m = self.store.meta
    index, packed = self._epochs.data(0, ahead=False)
    return {
      "source": m["source"],
      "corpus": m["corpus"],
      "tokenizer": m["tokenizer"],
      "documents": m["documents"],
      "sentences": m["sentences"],
      "tokens": m["tokens"],
      "train_documents": len(self.train_docs),
      "eval_documents": len(self.eval_docs),
      "pairs_per_epoch": len(index),
      "rows_per_epoch": self.layout.count(index, packed),
      "padding_fraction": packing.padding_fraction(index, self.seq_len, packed),
      "warnings": m["warnings"],
    }

  def _epoch_data(self, epoch: int) -> tuple[pairs_lib.PairIndex, packing.Packing | None]:
    """The shuffled pairs of one training epoch and their packing; the next epoch starts building."""
    return self._epochs.data(epoch)

  def _epoch(self, epoch: int) -> pairs_lib.PairIndex:
    """The shuffled pairs of one training epoch."""
    return self._epoch_data(epoch)[0]

  def _epoch_size(self, epoch: int) -> int:
    """Examples of one epoch: its pairs, or with packing its rows."""
    return self._epochs.size(epoch)

  def _locate(self, positions: np.ndarray):
    """(epoch, index within the epoch) of global example positions."""
    return self._epochs.locate(positions)

  def epoch_of(self, step: int) -> float:
    """The epoch (fractional) that step `step`'s first example belongs to, for logging."""
    epoch, index = self._locate(np.array([step * self.batch_size]))
    return float(epoch[0] + index[0] / self._epoch_size(int(epoch[0])))

  # -- batches ------------------------------------------------------------------------------
  def _rows(self, rows) -> np.ndarray:
    return check_rows(rows, self.batch_size)

  def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
    """The global batch of training step `step`, or just its rows `rows` (global indices).

    Args:
      step: the training step; its examples are stream positions [step B, (step + 1) B).
      rows: global row indices in [0, B), in the order wanted; None is all B rows.
    Returns:
      numpy arrays with a leading axis of len(rows): `base.make_examples`' names, and with
      packing `packing.pack_examples`'.
    Raises:
      ValueError: a row outside [0, B).
    """
    rows = self._rows(rows)
    with self._epochs.making_batch():  # a build ahead pauses meanwhile
      epochs, index = self._locate(int(step) * self.batch_size + rows)
      made = []
      for e in np.unique(epochs):  # a batch straddles at most two epochs
        sel = epochs == e
        keys_of = lambda i, e=int(e): keyed_random.row_keys(self.seed, e, i)
        made.append((sel, self.layout.examples(self.store.tokens, *self._epoch_data(int(e)), index[sel], keys_of)))
      return merge_parts(made, len(rows))

  def eval_batches(self, rows=None) -> list[dict[str, np.ndarray]]:
    """train.eval_batches batches of held-out documents; pairs and masks fixed once.

    Args:
      rows: as in `batch`.
    Returns:
      The batches, the same on every call; they wrap around when the held-out pairs are fewer
      than the batches need. [] when no documents are held out.
    """
    if len(self.eval_docs) == 0:
      return []
    if self._eval is None:  # pairs drawn once; masks are keyed, so they repeat exactly
      index = self._recipe.pairs(self.eval_docs, 0, EVAL_STREAM)
      self._eval = (index, self.layout.pack(index))
    rows = self._rows(rows)
    out = []
    with self._epochs.making_batch():  # a build ahead pauses meanwhile
      for k in range(int(self.config.train.eval_batches)):
        pos = (k * self.batch_size + rows) % self.layout.count(*self._eval)  # wraps when the split is small
        keys_of = lambda i: keyed_random.row_keys(self.seed ^ EVAL_SALT, 0, i)
        out.append(self.layout.examples(self.store.tokens, *self._eval, pos, keys_of))
    return out

  # -- iteration and state ------------------------------------------------------------------
  def iterator(self, start_step: int = 0, rows=None) -> BatchIterator:
    """Yields (step, batch) from `start_step` on, prepared `data.prefetch` steps ahead.

    Args:
      start_step: the first step yielded.
      rows: as in `batch`.
    Returns:
      A BatchIterator (a context manager: closing stops its thread); its `state()` is the position
      after the last batch consumed. An error building a batch is raised by `next`.
    """
    return BatchIterator(
      self, int(start_step), None if rows is None else self._rows(rows), int(self.config.data.prefetch)
    )

  def state_for(self, step: int) -> dict:
    """The iterator state to checkpoint with the train state at `step`: the next step to consume.

    Args:
      step: the number of steps done.
    Returns:
      A JSON-serialisable dict: the step and what fixes the data order (seed, batch size, corpus and
      tokenizer fingerprints, packing).
    """
    return {
      "version": STATE_VERSION,
      "kind": "cached",
      "step": int(step),
      "seed": self.seed,
      "corpus": self.corpus.fingerprint,
      "tokenizer": self.tokenizer.fingerprint,
      "batch_size": self.batch_size,
      **packing_state(self.layout.max_pairs),
    }

  def restore(self, state: dict) -> int:
    """Checks a saved state against this pipeline; returns the step to start from.

    A changed corpus fingerprint is only warned about: the run resumes in a different data order.

    Args:
      state: a `state_for` dict from a checkpoint.
    Raises:
      BertjaxError: the state is a streaming pipeline's, or its tokenizer, batch size, seed or
        packing differ from this run's.
    """
    if state.get("kind", "cached") != "cached":
      raise BertjaxError(
        "the checkpoint's data position is a stream's (data.streaming=True): resume with --config.data.streaming=true"
      )
    if state.get("tokenizer") != self.tokenizer.fingerprint:
      raise BertjaxError(
        f"the checkpoint's tokenizer {state.get('tokenizer')} is not this run's "
        f"{self.tokenizer.fingerprint}: resume with the same data.tokenizer"
      )
    if state.get("batch_size") != self.batch_size or state.get("seed") != self.seed:
      raise BertjaxError(
        f"the checkpoint's data order used train.batch_size={state.get('batch_size')} and "
        f"train.seed={state.get('seed')}: resume with the same values"
      )
    check_packing_state(state, self.layout.max_pairs)
    if state.get("corpus") != self.corpus.fingerprint:
      log.warning(
        "corpus fingerprint changed (%s -> %s): resumed data order differs",
        state.get("corpus"),
        self.corpus.fingerprint,
      )
    return int(state["step"])

  def iterator_from_state(self, state: dict, rows=None) -> BatchIterator:
    """`iterator` from a checkpointed `state`, after `restore` checked it."""
    return self.iterator(self.restore(state), rows)


def _split_documents(n_docs: int, fraction: float, seed: int, source: str):
  """Train and eval document ids: whole documents held out, chosen from the seed alone."""
  if n_docs < 2:
    raise BertjaxError(
      f"corpus {source} has {n_docs} document(s): NSP needs at least two (separate documents with a blank line)"
    )
  n_eval = int(round(n_docs * fraction))
  if fraction > 0:
    n_eval = max(n_eval, 2)
    if n_docs - n_eval < 2:
      log.warning("corpus %s: %d documents are too few to hold out an eval split", source, n_docs)
      n_eval = 0
  perm = keyed_generator(seed, EVAL_SALT).permutation(n_docs)
  return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
