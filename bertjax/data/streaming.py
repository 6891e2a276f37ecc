"""Global batches read from a stream of documents (`data.streaming=True`): no tokenised cache.

For corpora too large to cache (a hub dataset such as `hf:wikimedia/wikipedia:20231101.en` is
read with `datasets.load_dataset(..., streaming=True)`); any source works. The stream is cut into

    held out    the first `data.streaming_eval_documents` documents of the stream (evaluation)
    windows     then `data.streaming_window_documents` documents each, to the end of the stream

and a pass over the stream is an epoch. Window w of epoch e is tokenised on the fly; its pairs are
built with `pairs.build_pair_index` (a random B comes from another document of the same window)
from a generator keyed by (seed, e, w) and shuffled by another keyed by (seed, e, w): the window is
the shuffle buffer. `stream_windows.WindowTable` reads, builds and keeps the windows. They are laid
end to end into one stream of examples and step s takes positions [s B, (s + 1) B) of it, as in
`cached.CachedPipeline`; example i is masked with keys from (seed, 0, i). So the batch of step s
is still a function of (seed, corpus, s) alone. With data.pack_pairs, a window's shuffled pairs
are packed into rows (`packing.py`), the rows are the window's examples, and pair i of window w
of pass e is masked with keys from (seed, e, w, i).

Every process reads and tokenises the whole stream (pairs need every document's token lengths)
and lays out and masks only its rows: that is the throughput relaxation. The iterator state is the
consumer's step plus where its window starts in the stream: `IterableDataset.state_dict()` for
`hf:` and `disk:` sources (exact, and cheap: a seek), the document count for `files:` and
`builtin` (exact; the skipped documents are read again but not tokenised). Resuming rebuilds that
one window. A step whose window was never reached is found by reading forward from the stream's
start (O(steps)): `batch(step)` is random access, but only cheap near where the reader is.
"""

import logging

import numpy as np

from bertjax.data import keyed_random, masking, packing
from bertjax.data.base import (
  EVAL_SALT,
  EVAL_STREAM,
  PAIRS_SALT,
  STATE_VERSION,
  BatchIterator,
  check_packing_state,
  check_rows,
  keyed_generator,
  merge_parts,
  packing_state,
)
from bertjax.data.corpus import load_corpus
from bertjax.data.document_stream import DocumentStream, RecordTokeniser
from bertjax.data.stream_windows import WindowTable
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)
STATE_KIND = "streaming"


class StreamingPipeline:
  """`base.Pipeline`'s interface over a document stream (see the module docstring)."""

  def __init__(self, config, tokenizer, workdir=None):
    del workdir  # nothing is cached
    d = config.data
    self.config = config
    self.tokenizer = tokenizer
    self.seed = int(config.train.seed)
    self.batch_size = int(config.train.batch_size)
    self.window_documents = int(d.streaming_window_documents)
    self.eval_documents = int(d.streaming_eval_documents)
    self.corpus = load_corpus(config)
    self.masking = masking.MaskingSpec.from_config(d, tokenizer)
    self.layout = packing.RowLayout.from_config(d, tokenizer, self.masking)
    self._tokeniser = RecordTokeniser(self.corpus, tokenizer, int(d.num_proc))
    self.windows = WindowTable(config, self.corpus, self._tokeniser, self.layout)
    self._eval = None

  @property
  def stats(self) -> dict:
    return {
      "source": self.corpus.source,
      "corpus": self.corpus.fingerprint,
      "tokenizer": self.tokenizer.fingerprint,
      "streaming": True,
      "window_documents": self.window_documents,
      "eval_documents": self.eval_documents,
      "documents_read": self.windows.read["documents"],
      "tokens_read": self.windows.read["tokens"],
      "windows_read": self.windows.read["windows"],
      "windows_per_epoch": self.windows.windows_per_epoch,
      "warnings": dict(self.corpus.warnings),
    }

  def epoch_of(self, step: int) -> float:
    """The pass over the stream that step `step`'s first example belongs to; fractional once
    the number of windows in a pass is known (after the first pass)."""
    pos = np.array([int(step) * self.batch_size])
    win = self.windows.entries[int(self.windows.find(pos)[0])]
    per_epoch = self.windows.windows_per_epoch
    if not per_epoch:
      return float(win.epoch)
    within = (pos[0] - win.first_example) / max(win.size, 1)
    return float(win.epoch + (win.index + within) / per_epoch)

  def batch(self, step: int, rows=None) -> dict[str, np.ndarray]:
    """The global batch of step `step`, or its rows `rows`; cheap for steps near the reader.

    Args:
      step, rows: as in `cached.CachedPipeline.batch`.
    Returns:
      As `cached.CachedPipeline.batch`.
    Raises:
      ValueError: a row outside [0, B).
      BertjaxError: the stream has fewer than two documents after the held-out ones, gives no pairs,
        or changed while being read.
    """
    rows = check_rows(rows, self.batch_size)
    positions = int(step) * self.batch_size + rows
    which = self.windows.find(positions)
    made = []
    for w in np.unique(which):
      sel = which == w
      win = self.windows.entries[int(w)]
      if self.layout.max_pairs is None:  # example i of the stream: keys from (seed, 0, i)
        keys_of = lambda i, first=win.first_example: keyed_random.row_keys(self.seed, 0, first + i)
      else:  # pair i of window w of pass e: keys from (seed, e, w, i)
        keys_of = lambda i, win=win: keyed_random.window_keys(self.seed, win.epoch, win.index, i)
      made.append((sel, self.layout.examples(*self.windows.built(int(w)), positions[sel] - win.first_example, keys_of)))
    self.windows.read_ahead(int(which.max()))
    return merge_parts(made, len(rows))

  def eval_batches(self, rows=None) -> list[dict[str, np.ndarray]]:
    """train.eval_batches batches of the held-out first documents; pairs and masks fixed.

    Args:
      rows: as in `batch`.
    Returns:
      As `cached.CachedPipeline.eval_batches`; [] when `data.streaming_eval_documents` is 0.
    Raises:
      BertjaxError: fewer than two held-out documents hold text.
    """
    if self.eval_documents == 0:
      return []
    if self._eval is None:
      docs = DocumentStream(self.corpus, {"docs": 0, "stream": None}).take(self.eval_documents)
      tokens, sent_start, doc_start = self._tokeniser.tokenise(docs)
      if len(doc_start) < 3:
        raise BertjaxError(
          f"corpus {self.corpus.source}: the held-out documents hold fewer than "
          "two with text; raise data.streaming_eval_documents"
        )
      index = self.windows.pairs(sent_start, doc_start, keyed_generator(self.seed, 0, EVAL_STREAM, PAIRS_SALT))
      self._eval = (tokens, index, self.layout.pack(index))
    rows = check_rows(rows, self.batch_size)
    out = []
    for k in range(int(self.config.train.eval_batches)):
      pos = (k * self.batch_size + rows) % self.layout.count(*self._eval[1:])  # wraps when the split is small
      keys_of = lambda i: keyed_random.row_keys(self.seed ^ EVAL_SALT, 0, i)
      out.append(self.layout.examples(*self._eval, pos, keys_of))
    return out

  def iterator(self, start_step: int = 0, rows=None) -> BatchIterator:
    """Yields (step, batch) from `start_step` on, prepared `data.prefetch` steps ahead.

    Args:
      start_step, rows: as in `cached.CachedPipeline.iterator`.
    Returns:
      A BatchIterator, as `cached.CachedPipeline.iterator`.
    """
    return BatchIterator(
      self, int(start_step), None if rows is None else check_rows(rows, self.batch_size), int(self.config.data.prefetch)
    )

  def state_for(self, step: int) -> dict:
    """The state to checkpoint at `step` (the next step to consume) and where its window starts.

    Args:
      step: the number of steps done.
    Returns:
      A JSON-serialisable dict: the step, what fixes the data order, and the window (pass, index,
      first example, stream locator) that holds the step's first example.
    """
    pos = np.array([int(step) * self.batch_size])
    win = self.windows.entries[int(self.windows.find(pos)[0])]  # the prefetcher has read it: no wait
    return {
      "version": STATE_VERSION,
      "kind": STATE_KIND,
      "step": int(step),
      "seed": self.seed,
      "corpus": self.corpus.fingerprint,
      "tokenizer": self.tokenizer.fingerprint,
      "batch_size": self.batch_size,
      "window_documents": self.window_documents,
      "eval_documents": self.eval_documents,
      "epoch": win.epoch,
      "window": win.index,
      "first_example": win.first_example,
      "locator": win.locator,
      "windows_per_epoch": self.windows.windows_per_epoch,
      **packing_state(self.layout.max_pairs),
    }

  def restore(self, state: dict) -> int:
    """Checks a saved state and moves the reader to its window; returns the step to start from.

    A changed corpus fingerprint is only warned about: the run resumes in a different data order.

    Args:
      state: a `state_for` dict from a checkpoint.
    Raises:
      BertjaxError: the state is the cached pipeline's, or its tokenizer, batch size, seed, window or
        held-out document counts, or packing differ from this run's.
    """
    if state.get("kind") != STATE_KIND:
      raise BertjaxError(
        "the checkpoint's data position is the cached pipeline's "
        "(data.streaming=False): resume with --config.data.streaming=false"
      )
    if state.get("tokenizer") != self.tokenizer.fingerprint:
      raise BertjaxError(
        f"the checkpoint's tokenizer {state.get('tokenizer')} is not this run's "
        f"{self.tokenizer.fingerprint}: resume with the same data.tokenizer"
      )
    for key, mine in (
      ("batch_size", self.batch_size),
      ("seed", self.seed),
      ("window_documents", self.window_documents),
      ("eval_documents", self.eval_documents),
    ):
      if state.get(key) != mine:
        name = {"batch_size": "train.batch_size", "seed": "train.seed"}.get(key, f"data.streaming_{key}")
        raise BertjaxError(
          f"the checkpoint's data order used {name}={state.get(key)}, this run {mine}: resume with the same value"
        )
    check_packing_state(state, self.layout.max_pairs)
    if state.get("corpus") != self.corpus.fingerprint:
      log.warning(
        "corpus fingerprint changed (%s -> %s): resumed data order differs",
        state.get("corpus"),
        self.corpus.fingerprint,
      )
    self.windows.restore(
      int(state["epoch"]),
      int(state["window"]),
      int(state["first_example"]),
      state["locator"],
      state.get("windows_per_epoch"),
    )
    return int(state["step"])

  def iterator_from_state(self, state: dict, rows=None) -> BatchIterator:
    """`iterator` from a checkpointed `state`, after `restore` checked it."""
    return self.iterator(self.restore(state), rows)
