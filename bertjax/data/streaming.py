"""Global batches read from a stream of documents (`data.streaming=True`): no tokenised cache.

For corpora too large to cache (a hub dataset such as `hf:wikimedia/wikipedia:20231101.en` is
read with `datasets.load_dataset(..., streaming=True)`); any source works. The stream is cut into

    held out    the first `data.streaming_eval_documents` documents of the stream (evaluation)
    windows     then `data.streaming_window_documents` documents each, to the end of the stream

and a pass over the stream is an epoch. Window w of epoch e is tokenised on the fly; its pairs are
built with `pairs.build_pair_index` (a random B comes from another document of the same window)
from a generator keyed by (seed, e, w) and shuffled by another keyed by (seed, e, w): the window is
the shuffle buffer. Windows are laid end to end into one stream of examples and step s takes
positions [s B, (s + 1) B) of it, as in `cached.CachedPipeline`; example i is masked with keys from
(seed, 0, i). So the batch of step s is still a function of (seed, corpus, s) alone. With
data.pack_pairs, a window's shuffled pairs are packed into rows (`packing.py`), the rows are the
window's examples, and pair i of window w of pass e is masked with keys from (seed, e, w, i).

Every process reads and tokenises the whole stream (pairs need every document's token lengths)
and lays out and masks only its rows: that is the throughput relaxation. The iterator state is the
consumer's step plus where its window starts in the stream: `IterableDataset.state_dict()` for
`hf:` and `disk:` sources (exact, and cheap: a seek), the document count for `files:` and
`builtin` (exact; the skipped documents are read again but not tokenised). Resuming rebuilds that
one window. A step whose window was never reached is found by reading forward from the stream's
start (O(steps)): `batch(step)` is random access, but only cheap near where the reader is.
"""

import dataclasses
import logging
import threading

import numpy as np

from bertjax.data import keyed_random, masking, packing
from bertjax.data import pairs as pairs_lib
from bertjax.data.base import (
  EVAL_STREAM,
  STATE_VERSION,
  TRAIN_STREAM,
  BatchIterator,
  check_packing_state,
  check_rows,
  keyed_generator,
  merge_parts,
  packing_state,
)
from bertjax.data.corpus import load_corpus
from bertjax.data.document_stream import DocumentStream, RecordTokeniser
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)
STATE_KIND = "streaming"
_KEEP_WINDOWS = 3  # built windows kept in memory (a batch straddles at most a few)


@dataclasses.dataclass(frozen=True)
class _Window:
  """Where one window sits: in the epochs, in the example stream and in the document stream."""

  epoch: int
  index: int  # within the epoch
  first_example: int  # global position of its first example
  size: int  # examples (pairs, or with packing rows)
  documents: int  # documents read for it
  locator: dict  # {"docs": documents before it in the pass, "stream": state_dict or None}


class StreamingPipeline:
  """`base.Pipeline`'s interface over a document stream (see the module docstring)."""

  def __init__(self, config, tokenizer, workdir=None):
    del workdir  # nothing is cached
    d = config.data
    self.config = config
    self.tokenizer = tokenizer
    self.seed = int(config.train.seed)
    self.batch_size = int(config.train.batch_size)
    self.seq_len = int(d.seq_len)
    self.window_documents = int(d.streaming_window_documents)
    self.eval_documents = int(d.streaming_eval_documents)
    self.corpus = load_corpus(config)
    self.masking = masking.MaskingSpec.from_config(d, tokenizer)
    self.layout = packing.RowLayout.from_config(d, tokenizer, self.masking)
    self._lock = threading.RLock()  # the reader, the window table and the built windows
    self._built: dict[tuple[int, int], tuple] = {}
    self._windows_per_epoch: int | None = None
    self._read = {"documents": 0, "tokens": 0, "windows": 0}
    self._eval = None
    self._tokeniser = RecordTokeniser(self.corpus, tokenizer, int(d.num_proc))
    self._ahead: threading.Thread | None = None
    self._generation = 0
    self._seek(0, 0, 0, None)

  # -- the window table ---------------------------------------------------------------------
  def _seek(self, epoch: int, index: int, first_example: int, locator: dict | None):
    """Forgets the table; the next window built is (epoch, index) at `locator` (None: the
    start of a pass)."""
    self._ends = np.zeros(0, np.int64)  # first: `_find` reads `_ends` before `_windows`
    self._windows: list[_Window] = []
    self._next = (epoch, index, first_example, locator)
    self._pass_first = first_example if index == 0 else None  # where the current pass began
    self._reader = None
    self._failed: BaseException | None = None  # a read-ahead's error, raised to the next reader
    self._generation += 1

  def _advance(self):
    """Reads, tokenises and pairs the next window of the sequence and appends it to the table."""
    while True:
      epoch, index, first, locator = self._next
      if self._reader is None:
        self._reader = DocumentStream(self.corpus, locator or {"docs": self.eval_documents, "stream": None})
      where = self._reader.position()
      docs = self._reader.take(self.window_documents)
      if len(docs) >= 2:
        break
      if index == 0:  # nothing left for training after the held-out documents
        raise BertjaxError(
          f"corpus {self.corpus.source} has {self._reader.docs} document(s): streaming NSP "
          f"needs at least two after the {self.eval_documents} held out for evaluation; lower "
          "data.streaming_eval_documents or add text"
        )
      if docs:
        self.corpus.warnings["documents left alone at the end of a pass (skipped)"] += 1
      self._end_pass(epoch, index, first)
    built = self._build_window(epoch, index, docs)
    tokens = built[0]
    window = _Window(epoch, index, first, self.layout.count(*built[1:]), len(docs), where)
    self._keep((epoch, index), built)
    self._windows.append(window)
    self._ends = np.append(self._ends, first + window.size)
    self._next = (epoch, index + 1, first + window.size, None)
    if epoch == 0:
      self._read["documents"] += len(docs)
      self._read["tokens"] += len(tokens)
      self._read["windows"] += 1
    if self._reader.exhausted:
      self._end_pass(epoch, index + 1, first + window.size)

  def _end_pass(self, epoch: int, windows: int, first: int):
    if first == self._pass_first:  # passes without a single pair would never end
      raise BertjaxError(
        f"corpus {self.corpus.source} gives no sentence pairs: its documents "
        "hold no text the tokenizer encodes; check data.text_column"
      )
    self._pass_first = first
    self._windows_per_epoch = windows
    self._next = (epoch + 1, 0, first, None)
    self._reader = None

  def _keep(self, key, built):
    self._built[key] = built
    while len(self._built) > _KEEP_WINDOWS:
      self._built.pop(next(iter(self._built)))

  def _build_window(self, epoch: int, index: int, docs):
    tokens, sent_start, doc_start = self._tokeniser.tokenise(docs)
    d = self.config.data
    n_docs = len(doc_start) - 1
    if n_docs < 2:  # every document tokenised to nothing: a window without examples
      return self._with_packing(tokens, _empty_pairs())
    index_ = pairs_lib.build_pair_index(
      sent_start,
      doc_start,
      np.arange(n_docs),
      self.seq_len,
      float(d.short_seq_prob),
      float(d.pair_random_next_prob),
      keyed_generator(self.seed, epoch, index, TRAIN_STREAM, 0x9A1),
    )
    return self._with_packing(
      tokens, index_.take(keyed_generator(self.seed, epoch, index, 0x5F1).permutation(len(index_)))
    )

  def _with_packing(self, tokens, pair_index: pairs_lib.PairIndex):
    """(tokens, pairs, their packing or None): what a built window holds."""
    return tokens, pair_index, self.layout.pack(pair_index)

  def _cover(self, last: int, first: int | None = None):
    """Extends (or restarts) the table until it holds example positions first..last."""
    if self._windows and first is not None and first < self._windows[0].first_example:
      log.warning("data position %d lies before the resumed window: reading the stream again from its start", first)
      self._seek(0, 0, 0, None)
    while not len(self._ends) or self._ends[-1] <= last:
      if self._failed is not None:
        raise self._failed
      self._advance()

  def _read_ahead(self, w: int):
    """When table entry w is the newest, reads the next window in a background thread, so that
    tokenising it overlaps with the batches of this one (and with training)."""
    if w != len(self._windows) - 1 or (self._ahead is not None and self._ahead.is_alive()):
      return
    generation, known = self._generation, len(self._windows)

    def work():
      with self._lock:
        if (self._generation, len(self._windows)) == (generation, known) and not self._failed:
          try:
            self._advance()
          except BaseException as e:
            self._failed = e

    self._ahead = threading.Thread(target=work, daemon=True, name="bertjax-stream-ahead")
    self._ahead.start()

  def _find(self, positions: np.ndarray) -> np.ndarray:
    """Indices into the table of the windows holding example `positions`."""
    ends, windows = self._ends, self._windows  # entries are appended before `_ends` grows
    if (
      len(positions) and len(ends) and windows[0].first_example <= positions.min() and (positions.max() < ends[-1])
    ):  # already known: no lock, so no wait on a window build
      return np.searchsorted(ends, positions, side="right")
    with self._lock:
      if len(positions):
        self._cover(int(positions.max()), int(positions.min()))
      return np.searchsorted(self._ends, positions, side="right")

  def _window(self, w: int):
    """The tokens, shuffled pairs and packing of table entry w, rebuilt from its locator if evicted."""
    win = self._windows[w]
    built = self._built.get((win.epoch, win.index))
    if built is not None:  # no lock: a read-ahead may be building the next window
      return built
    with self._lock:
      win = self._windows[w]
      key = (win.epoch, win.index)
      if key not in self._built:
        docs = DocumentStream(self.corpus, win.locator).take(win.documents)
        built = self._build_window(win.epoch, win.index, docs)
        if len(docs) != win.documents or self.layout.count(*built[1:]) != win.size:
          raise BertjaxError(
            f"corpus {self.corpus.source} changed while reading it (window "
            f"{win.index} of pass {win.epoch} differs): restart the run"
          )
        self._keep(key, built)
      return self._built[key]

  # -- the Pipeline interface ---------------------------------------------------------------
  @property
  def stats(self) -> dict:
    return {
      "source": self.corpus.source,
      "corpus": self.corpus.fingerprint,
      "tokenizer": self.tokenizer.fingerprint,
      "streaming": True,
      "window_documents": self.window_documents,
      "eval_documents": self.eval_documents,
      "documents_read": self._read["documents"],
      "tokens_read": self._read["tokens"],
      "windows_read": self._read["windows"],
      "windows_per_epoch": self._windows_per_epoch,
      "warnings": dict(self.corpus.warnings),
    }

  def epoch_of(self, step: int) -> float:
    """The pass over the stream that step `step`'s first example belongs to; fractional once
    the number of windows in a pass is known (after the first pass)."""
    pos = np.array([int(step) * self.batch_size])
    win = self._windows[int(self._find(pos)[0])]
    if not self._windows_per_epoch:
      return float(win.epoch)
    within = (pos[0] - win.first_example) / max(win.size, 1)
    return float(win.epoch + (win.index + within) / self._windows_per_epoch)

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
    which = self._find(positions)
    made = []
    for w in np.unique(which):
      sel = which == w
      win = self._windows[int(w)]
      if self.layout.max_pairs is None:  # example i of the stream: keys from (seed, 0, i)
        keys_of = lambda i, first=win.first_example: keyed_random.row_keys(self.seed, 0, first + i)
      else:  # pair i of window w of pass e: keys from (seed, e, w, i)
        keys_of = lambda i, win=win: keyed_random.window_keys(self.seed, win.epoch, win.index, i)
      made.append((sel, self.layout.examples(*self._window(int(w)), positions[sel] - win.first_example, keys_of)))
    self._read_ahead(int(which.max()))
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
      d = self.config.data
      index = pairs_lib.build_pair_index(
        sent_start,
        doc_start,
        np.arange(len(doc_start) - 1),
        self.seq_len,
        float(d.short_seq_prob),
        float(d.pair_random_next_prob),
        keyed_generator(self.seed, 0, EVAL_STREAM, 0x9A1),
      )
      self._eval = self._with_packing(tokens, index)
    rows = check_rows(rows, self.batch_size)
    out = []
    for k in range(int(self.config.train.eval_batches)):
      pos = (k * self.batch_size + rows) % self.layout.count(*self._eval[1:])  # wraps when the split is small
      keys_of = lambda i: keyed_random.row_keys(self.seed ^ 0xE7A1, 0, i)
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
    win = self._windows[int(self._find(pos)[0])]  # the prefetcher has read it: no wait
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
      "windows_per_epoch": self._windows_per_epoch,
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
    with self._lock:
      known = [w for w in self._windows if (w.epoch, w.index) == (state["epoch"], state["window"])]
      if not (known and known[0].first_example == state["first_example"]):
        self._seek(int(state["epoch"]), int(state["window"]), int(state["first_example"]), state["locator"])
      if state.get("windows_per_epoch"):
        self._windows_per_epoch = int(state["windows_per_epoch"])
    return int(state["step"])

  def iterator_from_state(self, state: dict, rows=None) -> BatchIterator:
    """`iterator` from a checkpointed `state`, after `restore` checked it."""
    return self.iterator(self.restore(state), rows)


def _empty_pairs() -> pairs_lib.PairIndex:
  z64, z32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
  return pairs_lib.PairIndex(z64, z32, z64, z32, z32)
