"""The cached pipeline's training epochs: each one's shuffled pairs and packing, built ahead.

Epoch e's pair index is drawn from (seed, e) over the training documents (`pairs.py`, a Python
step per pair: minutes at Wikipedia's 40 M pairs), shuffled from (seed, e) and, with
data.pack_pairs, packed. `EpochTable` keeps the epochs laid end to end:

- when a batch first needs epoch e, epoch e + 1 starts building in a daemon thread, so the batch
  that crosses the boundary finds it built (or waits only for what is left of it) and the
  training loop, `data.prefetch` steps behind, does not stall there;
- an error in that thread is raised to the first request that needs the epoch (and logged when
  it happens); the request after retries;
- at most the current epoch, the next and the last one sized without a batch are kept, plus any
  a caller is still waiting on; a build no longer wanted stops, and so do the builds of a table
  that is gone (the threads never reference it);
- epoch sizes are kept (integers) and found only as far as a position needs.

What an epoch holds does not depend on when or where it was built: the draws are those of
`pairs.build_pair_index` and `rng.permutation`, in the same order, so the data order is unchanged.
"""

import contextlib
import dataclasses
import logging
import threading
import weakref

import numpy as np

from bertjax.data import packing
from bertjax.data import pairs as pairs_lib
from bertjax.data.base import PAIRS_SALT, SHUFFLE_SALT, TRAIN_STREAM, keyed_generator

log = logging.getLogger(__name__)

EpochData = tuple[pairs_lib.PairIndex, packing.Packing | None]


@dataclasses.dataclass(frozen=True)
class EpochRecipe:
  """What building an epoch needs, and no reference to the pipeline (a build may outlive it)."""

  sent_start: np.ndarray
  doc_start: np.ndarray
  seq_len: int
  short_seq_prob: float
  random_next_prob: float
  seed: int
  layout: packing.RowLayout
  train_docs: np.ndarray

  def pairs(self, docs, epoch: int, split: int, should_stop=None) -> pairs_lib.PairIndex:
    """The pairs of documents `docs` (in document order), drawn from (seed, epoch, split)."""
    return pairs_lib.build_pair_index(
      self.sent_start,
      self.doc_start,
      docs,
      self.seq_len,
      self.short_seq_prob,
      self.random_next_prob,
      keyed_generator(self.seed, epoch, split, PAIRS_SALT),
      should_stop,
    )

  def epoch(self, epoch: int, should_stop=None) -> EpochData:
    """Training epoch `epoch`: its pairs shuffled in place (the peak is the index, the order and
    one array), and their packing."""
    index = self.pairs(self.train_docs, epoch, TRAIN_STREAM, should_stop)
    index.permute(pairs_lib.shuffle_order(keyed_generator(self.seed, epoch, SHUFFLE_SALT), len(index)))
    return index, self.layout.pack(index, should_stop)


class EpochBuild:
  """One training epoch built in a daemon thread (it never keeps the process alive); `get` waits.

  The build is Python holding the GIL, so while a batch is made (`idle` is clear) a build that no
  caller waits for pauses at its next check (every few documents): the batch gets the GIL, and
  the build runs while the prefetch queue is full. A build a caller waits for never pauses.
  """

  def __init__(self, epoch: int, recipe: EpochRecipe, idle: threading.Event):
    self.epoch = epoch
    self.waiters = 0  # callers in `get`, counted under the table's lock: never stopped under them
    self._idle = idle
    self._stop = threading.Event()
    self._done = threading.Event()
    self._result: EpochData | None = None
    self._error: BaseException | None = None
    self.thread = threading.Thread(target=self._run, args=(recipe,), daemon=True, name=f"bertjax-epoch-{epoch}")
    self.thread.start()

  def _should_stop(self) -> bool:
    """The build's check: pauses while batches are made and nobody waits for it; True stops it."""
    while not self._idle.is_set() and self.waiters == 0 and not self._stop.is_set():
      self._idle.wait(0.01)
    return self._stop.is_set()

  def _run(self, recipe: EpochRecipe):
    try:
      self._result = recipe.epoch(self.epoch, self._should_stop)
    except BaseException as e:  # raised to whoever needs this epoch
      self._error = e
      if not isinstance(e, pairs_lib.Cancelled):
        log.warning("building epoch %d's pairs failed (raised when a batch needs it): %r", self.epoch, e)
    finally:
      self._done.set()

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self):
    self._stop.set()

  def get(self) -> EpochData:
    self._done.wait()
    if self._error is not None:
      raise self._error
    return self._result


class EpochTable:
  """Training epochs laid end to end: their data (built ahead), sizes and positions. Thread-safe:
  the prefetching iterator asks for batches while the training loop asks `epoch_of`."""

  def __init__(self, recipe: EpochRecipe):
    self.recipe = recipe
    self._lock = threading.Lock()  # guards the four below; never held while an epoch builds
    self._builds: dict[int, EpochBuild] = {}  # built or being built
    self._current: int | None = None  # the epoch a batch asked for last: it and the next are kept
    self._sized: int | None = None  # the epoch last asked for without a batch (sizes, stats): kept
    self._ends: list[int] = []  # examples in epochs 0..k together, as far as known
    self._making = 0  # batches being made (`making_batch`)
    self._idle = threading.Event()  # set while no batch is made: builds run
    self._idle.set()
    weakref.finalize(self, _cancel_all, self._builds)  # a discarded table's builds stop

  @contextlib.contextmanager
  def making_batch(self):
    """Marks a batch being made: builds nobody waits for pause meanwhile (`EpochBuild`)."""
    with self._lock:
      self._making += 1
      self._idle.clear()
    try:
      yield
    finally:
      with self._lock:
        self._making -= 1
        if not self._making:
          self._idle.set()

  def data(self, epoch: int, ahead: bool = True) -> EpochData:
    """The shuffled pairs of one training epoch and their packing, waiting for its build if needed.

    Args:
      epoch: the epoch.
      ahead: a batch's request: `epoch` becomes the current epoch and the next one starts building
        in the background. False (sizes, stats) builds only `epoch` and moves nothing.
    Returns:
      (pair index, packing or None).
    Raises:
      Whatever building the epoch raised (in the background or not); the next request retries.
    """
    with self._lock:
      build = self._builds.get(epoch)
      if build is None:
        build = self._builds[epoch] = EpochBuild(epoch, self.recipe, self._idle)
      if ahead:
        self._current = epoch
        if epoch + 1 not in self._builds:
          self._builds[epoch + 1] = EpochBuild(epoch + 1, self.recipe, self._idle)
      else:
        self._sized = epoch
      build.waiters += 1
      self._drop_unwanted()
    try:
      return build.get()
    except BaseException:
      with self._lock:
        if self._builds.get(epoch) is build:  # a failed build is raised to its waiters, then forgotten
          del self._builds[epoch]
      raise
    finally:
      with self._lock:
        build.waiters -= 1

  def _drop_unwanted(self):
    """Forgets (and stops) builds other than the current epoch's, the next one's and the last
    sized one's, unless a caller waits on them. Holds the lock."""
    keep = {self._sized} | (set() if self._current is None else {self._current, self._current + 1})
    for epoch in [e for e, b in self._builds.items() if e not in keep and b.waiters == 0]:
      self._builds.pop(epoch).cancel()

  def builds(self) -> dict[int, EpochBuild]:
    """The epochs kept now, built or being built (a copy)."""
    with self._lock:
      return dict(self._builds)

  def _ends_through(self, epoch: int | None = None, position: int | None = None) -> list[int]:
    """Examples in epochs 0..k together, for k up to `epoch` or the epoch of example `position`.
    Known sizes are kept; an unknown one is built (not ahead: the current epoch stays)."""
    while True:
      with self._lock:
        ends = list(self._ends)
      if (epoch is not None and len(ends) > epoch) or (position is not None and ends and ends[-1] > position):
        return ends
      e = len(ends)
      size = self.recipe.layout.count(*self.data(e, ahead=False))
      with self._lock:
        if len(self._ends) == e:
          self._ends.append((ends[-1] if ends else 0) + size)

  def size(self, epoch: int) -> int:
    """Examples of one epoch: its pairs, or with packing its rows."""
    ends = self._ends_through(epoch=epoch)
    return ends[epoch] - (ends[epoch - 1] if epoch else 0)

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, index within the epoch) of global example positions."""
    ends = np.asarray(self._ends_through(position=int(positions.max()) if len(positions) else 0))
    epochs = np.searchsorted(ends, positions, side="right")
    return epochs, positions - np.concatenate([[0], ends])[epochs]


def _cancel_all(builds: dict[int, EpochBuild]):
  for build in list(builds.values()):
    build.cancel()
