"""The window table of a streamed corpus: where each shuffle window sits, and its examples.

A pass over the stream (after the held-out documents) is cut into windows of
`data.streaming_window_documents` documents. Window w of pass e is tokenised, its pairs built
with `pairs.build_pair_index` from a generator keyed by (seed, e, w), shuffled by another keyed by
(seed, e, w) and, with data.pack_pairs, packed into rows. Windows are laid end to end into one
stream of examples; the table maps an example position to its window, reading the stream forward
as far as asked, and rebuilds an evicted window from where it starts in the stream (its locator).
"""

import dataclasses
import logging
import threading

import numpy as np

from bertjax.data import pairs as pairs_lib
from bertjax.data.base import PAIRS_SALT, SHUFFLE_SALT, TRAIN_STREAM, keyed_generator
from bertjax.data.document_stream import DocumentStream
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)
_KEEP_WINDOWS = 3  # built windows kept in memory (a batch straddles at most a few)


@dataclasses.dataclass(frozen=True)
class Window:
  """Where one window sits: in the epochs, in the example stream and in the document stream."""

  epoch: int
  index: int  # within the epoch
  first_example: int  # global position of its first example
  size: int  # examples (pairs, or with packing rows)
  documents: int  # documents read for it
  locator: dict  # {"docs": documents before it in the pass, "stream": state_dict or None}


class WindowTable:
  """The windows read so far, in stream order, and the last few built ones.

  Thread-safe: a read-ahead thread builds the next window while batches are taken from this one.
  """

  def __init__(self, config, corpus, tokeniser, layout):
    d = config.data
    self.seed = int(config.train.seed)
    self.seq_len = int(d.seq_len)
    self.short_seq_prob = float(d.short_seq_prob)
    self.random_next_prob = float(d.pair_random_next_prob)
    self.window_documents = int(d.streaming_window_documents)
    self.eval_documents = int(d.streaming_eval_documents)
    self.corpus, self.tokeniser, self.layout = corpus, tokeniser, layout
    self.lock = threading.RLock()  # the reader, the table and the built windows
    self.windows_per_epoch: int | None = None  # known after the first pass
    self.read = {"documents": 0, "tokens": 0, "windows": 0}  # by the first pass
    self._built: dict[tuple[int, int], tuple] = {}
    self._ahead: threading.Thread | None = None
    self._generation = 0
    self.seek(0, 0, 0, None)

  def seek(self, epoch: int, index: int, first_example: int, locator: dict | None):
    """Forgets the table; the next window built is (epoch, index) at `locator` (None: the
    start of a pass)."""
    self._ends = np.zeros(0, np.int64)  # first: `find` reads `_ends` before `entries`
    self.entries: list[Window] = []
    self._next = (epoch, index, first_example, locator)
    self._pass_first = first_example if index == 0 else None  # where the current pass began
    self._reader = None
    self._failed: BaseException | None = None  # a read-ahead's error, raised to the next reader
    self._generation += 1

  def restore(self, epoch: int, index: int, first_example: int, locator: dict, windows_per_epoch: int | None):
    """Moves the reader to a checkpointed window, unless the table already holds it there."""
    with self.lock:
      known = [w for w in self.entries if (w.epoch, w.index) == (epoch, index)]
      if not (known and known[0].first_example == first_example):
        self.seek(epoch, index, first_example, locator)
      if windows_per_epoch:
        self.windows_per_epoch = int(windows_per_epoch)

  def find(self, positions: np.ndarray) -> np.ndarray:
    """Indices into `entries` of the windows holding example `positions`, reading up to them."""
    ends, entries = self._ends, self.entries  # entries are appended before `_ends` grows
    if (
      len(positions) and len(ends) and entries[0].first_example <= positions.min() and (positions.max() < ends[-1])
    ):  # already known: no lock, so no wait on a window build
      return np.searchsorted(ends, positions, side="right")
    with self.lock:
      if len(positions):
        self._cover(int(positions.max()), int(positions.min()))
      return np.searchsorted(self._ends, positions, side="right")

  def built(self, w: int):
    """The tokens, shuffled pairs and packing of entry w, rebuilt from its locator if evicted."""
    win = self.entries[w]
    built = self._built.get((win.epoch, win.index))
    if built is not None:  # no lock: a read-ahead may be building the next window
      return built
    with self.lock:
      win = self.entries[w]
      key = (win.epoch, win.index)
      if key not in self._built:
        docs = DocumentStream(self.corpus, win.locator).take(win.documents)
        built = self._build(win.epoch, win.index, docs)
        if len(docs) != win.documents or self.layout.count(*built[1:]) != win.size:
          raise BertjaxError(
            f"corpus {self.corpus.source} changed while reading it (window "
            f"{win.index} of pass {win.epoch} differs): restart the run"
          )
        self._keep(key, built)
      return self._built[key]

  def read_ahead(self, w: int):
    """When entry w is the newest, reads the next window in a background thread, so that
    tokenising it overlaps with the batches of this one (and with training)."""
    if w != len(self.entries) - 1 or (self._ahead is not None and self._ahead.is_alive()):
      return
    generation, known = self._generation, len(self.entries)

    def work():
      with self.lock:
        if (self._generation, len(self.entries)) == (generation, known) and not self._failed:
          try:
            self._advance()
          except BaseException as e:
            self._failed = e

    self._ahead = threading.Thread(target=work, daemon=True, name="bertjax-stream-ahead")
    self._ahead.start()

  def _cover(self, last: int, first: int | None = None):
    """Extends (or restarts) the table until it holds example positions first..last."""
    if self.entries and first is not None and first < self.entries[0].first_example:
      log.warning("data position %d lies before the resumed window: reading the stream again from its start", first)
      self.seek(0, 0, 0, None)
    while not len(self._ends) or self._ends[-1] <= last:
      if self._failed is not None:
        raise self._failed
      self._advance()

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
    built = self._build(epoch, index, docs)
    window = Window(epoch, index, first, self.layout.count(*built[1:]), len(docs), where)
    self._keep((epoch, index), built)
    self.entries.append(window)
    self._ends = np.append(self._ends, first + window.size)
    self._next = (epoch, index + 1, first + window.size, None)
    if epoch == 0:
      self.read["documents"] += len(docs)
      self.read["tokens"] += len(built[0])
      self.read["windows"] += 1
    if self._reader.exhausted:
      self._end_pass(epoch, index + 1, first + window.size)

  def _end_pass(self, epoch: int, windows: int, first: int):
    if first == self._pass_first:  # passes without a single pair would never end
      raise BertjaxError(
        f"corpus {self.corpus.source} gives no sentence pairs: its documents "
        "hold no text the tokenizer encodes; check data.text_column"
      )
    self._pass_first = first
    self.windows_per_epoch = windows
    self._next = (epoch + 1, 0, first, None)
    self._reader = None

  def _keep(self, key, built):
    self._built[key] = built
    while len(self._built) > _KEEP_WINDOWS:
      self._built.pop(next(iter(self._built)))

  def pairs(self, sent_start, doc_start, rng) -> pairs_lib.PairIndex:
    """The NSP pairs of tokenised documents (a random B from another of them), drawn from `rng`."""
    return pairs_lib.build_pair_index(
      sent_start,
      doc_start,
      np.arange(len(doc_start) - 1),
      self.seq_len,
      self.short_seq_prob,
      self.random_next_prob,
      rng,
    )

  def _build(self, epoch: int, index: int, docs):
    """(tokens, shuffled pairs, their packing or None) of window `index` of pass `epoch`."""
    tokens, sent_start, doc_start = self.tokeniser.tokenise(docs)
    n_docs = len(doc_start) - 1
    if n_docs < 2:  # every document tokenised to nothing: a window without examples
      return tokens, _NO_PAIRS, self.layout.pack(_NO_PAIRS)
    pair_index = self.pairs(sent_start, doc_start, keyed_generator(self.seed, epoch, index, TRAIN_STREAM, PAIRS_SALT))
    shuffled = pair_index.permute(
      pairs_lib.shuffle_order(keyed_generator(self.seed, epoch, index, SHUFFLE_SALT), len(pair_index))
    )
    return tokens, shuffled, self.layout.pack(shuffled)


_NO_PAIRS = pairs_lib.PairIndex(*(np.zeros(0, dtype) for dtype in (np.int64, np.int16, np.int64, np.int16, np.int8)))
