"""Training epochs built ahead (`data/epochs.py`): ready before the boundary, errors raised where
they are needed, bounded and compact, stopped with their pipeline, and the data order unchanged."""

import gc
import hashlib
import threading
import time
import weakref

import numpy as np
import pytest

from bertjax.data import epochs, keyed_random, masking, packing, pairs
from bertjax.data.base import keyed_generator

PACKED = dict(seq_len=128, short_seq_prob=1.0, max_predictions=20, pack_pairs=True, max_pairs_per_row=4)


@pytest.fixture
def builds(monkeypatch):
  """The epochs built (in whichever thread), in the order their builds began; `fail[e]` makes
  epoch e's build raise it."""
  began, fail = [], {}
  real = epochs.EpochRecipe.epoch

  def epoch(recipe, e, should_stop=None):
    began.append(e)
    if e in fail:
      raise fail[e]
    return real(recipe, e, should_stop)

  monkeypatch.setattr(epochs.EpochRecipe, "epoch", epoch)
  return began, fail


def boundary_step(p):
  """The step whose batch straddles the end of epoch 0."""
  step = p._epoch_size(0) // p.batch_size
  assert p._epoch_size(0) % p.batch_size, "the micro corpus's epoch 0 should not end on a step"
  return step


def test_the_next_epoch_is_built_before_the_batch_that_crosses_into_it(make_pipeline, builds):
  began, _ = builds
  p = make_pipeline()
  p.batch(0)
  ahead = p._epochs.builds()
  assert sorted(ahead) == [0, 1]  # epoch 1 is under way: no batch asked for it
  ahead[1].thread.join(30)
  assert ahead[1].done and ahead[1].thread.daemon
  step = boundary_step(p)
  p.batch(step)
  now = p._epochs.builds()
  assert now[1] is ahead[1]  # the boundary took the build begun ahead, already done: no wait
  assert sorted(now) == [1, 2]  # epoch 0 is dropped, epoch 2 is under way
  assert began.count(0) == began.count(1) == 1


def test_an_iterator_over_epochs_builds_each_once_and_keeps_two_compact_ones(make_pipeline, builds):
  began, _ = builds
  p = make_pipeline(train_batch_size=64)
  steps = int(3.5 * p._epoch_size(0) / p.batch_size)
  kept = []
  with p.iterator(0) as it:
    for _ in range(steps):
      next(it)
      kept.append(p._epochs.builds())
  assert max(map(len, kept)) <= 3  # the current epoch, the next, and the last sized (one of them)
  assert sorted(set(began)) == began == list(range(len(began))) and len(began) >= 4  # in order, once each
  for table in kept[-3:]:
    for build in table.values():
      if build.done:
        index, _ = build.get()
        assert index.nbytes / len(index) <= 24


def test_a_failed_background_build_is_raised_by_the_batch_that_needs_it(make_pipeline, builds):
  _, fail = builds
  fail[1] = RuntimeError("epoch 1's disk is gone")
  p = make_pipeline()
  step = boundary_step(p)
  with p.iterator(0) as it:
    for _ in range(step):  # epoch 0's batches come
      next(it)
    with pytest.raises(RuntimeError, match="disk is gone"):
      next(it)
  del fail[1]  # the next request builds it again
  np.testing.assert_array_equal(p.batch(step)["input_ids"], make_pipeline().batch(step)["input_ids"])


def wait_for(condition, seconds=30):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.005)


def test_a_build_ahead_pauses_while_a_batch_is_made_unless_the_batch_waits_for_it(make_pipeline, monkeypatch):
  """Building is Python holding the GIL: a build nobody waits for yields it to the batches."""
  checks = []
  real = epochs.EpochRecipe.epoch

  def epoch(recipe, e, should_stop=None):
    if e == 1:
      checks.append("asked")
      should_stop()  # pauses while a batch is made and nobody waits for epoch 1
      checks.append("went on")
    return real(recipe, e, should_stop)

  monkeypatch.setattr(epochs.EpochRecipe, "epoch", epoch)
  p = make_pipeline()
  step = boundary_step(p)
  with p._epochs.making_batch():  # as the prefetch thread does while it makes a batch
    p.batch(0)  # epoch 1 begins ahead
    wait_for(lambda: checks)
    time.sleep(0.05)
    assert checks == ["asked"]
  wait_for(lambda: checks == ["asked", "went on"])  # no batch made: it goes on

  checks.clear()
  q = make_pipeline()
  with q._epochs.making_batch():
    q.batch(0)
    boundary = q.batch(step)  # waits for epoch 1, whose build must not pause under it
  assert checks == ["asked", "went on"]
  np.testing.assert_array_equal(boundary["input_ids"], p.batch(step)["input_ids"])


def test_a_discarded_pipeline_stops_its_builds(make_pipeline, monkeypatch):
  started = threading.Event()
  real = epochs.EpochRecipe.epoch

  def epoch(recipe, e, should_stop=None):
    if e == 0:
      return real(recipe, e, should_stop)
    started.set()
    deadline = time.monotonic() + 60
    while not should_stop() and time.monotonic() < deadline:  # a long build, asking to stop
      time.sleep(0.005)
    raise pairs.Cancelled("stopped")

  monkeypatch.setattr(epochs.EpochRecipe, "epoch", epoch)
  p = make_pipeline()
  p.batch(0)
  assert started.wait(30)
  thread = p._epochs.builds()[1].thread
  alive = weakref.ref(p)
  del p
  gc.collect()
  assert alive() is None  # the build thread holds no reference to its pipeline
  thread.join(30)
  assert not thread.is_alive()


def test_packing_stops_when_asked():
  lengths = np.full(1000, 20)
  with pytest.raises(pairs.Cancelled):
    packing.pack(lengths, np.full(1000, 3), 128, 4, 20, should_stop=lambda: True)
  went_on = packing.pack(lengths, np.full(1000, 3), 128, 4, 20, should_stop=lambda: False)
  np.testing.assert_array_equal(went_on.pairs, packing.pack(lengths, np.full(1000, 3), 128, 4, 20).pairs)


@pytest.mark.parametrize("data", [{}, PACKED], ids=["unpacked", "packed"])
def test_epochs_built_ahead_are_the_straightforward_ones(make_pipeline, data):
  """Epoch e built in the background equals the previous synchronous recipe: the pairs drawn from
  (seed, e), `rng.permutation` applied with `take`, then packed."""
  p = make_pipeline(**data)
  d = p.config.data
  for e in (0, 1, 2):
    index, packed = p._epoch_data(e)  # 1 and 2 were begun ahead
    rng = keyed_generator(p.seed, e, 0, 0x9A1)
    ref = pairs.build_pair_index(
      p.store.sent_start, p.store.doc_start, p.train_docs, p.seq_len, d.short_seq_prob, d.pair_random_next_prob, rng
    )
    ref = ref.take(keyed_generator(p.seed, e, 0x5F1).permutation(len(ref)))
    for name in ("a_start", "a_len", "b_start", "b_len", "label"):
      np.testing.assert_array_equal(getattr(index, name), getattr(ref, name), err_msg=name)
    if data:
      ref_packed = p.layout.pack(ref)
      np.testing.assert_array_equal(packed.row_start, ref_packed.row_start)
      np.testing.assert_array_equal(packed.pairs, ref_packed.pairs)
      assert packed.pairs.dtype == packed.row_start.dtype == np.int32  # 4 bytes a pair and a row
    else:
      assert packed is None
    step = p._epochs.locate(np.array([sum(p._epoch_size(k) for k in range(e))]))[0][0]
    assert step == e
  # A batch straddling two epochs is each side's examples, masked with that epoch's keys.
  ends = np.cumsum([p._epoch_size(k) for k in range(3)])
  straddled = 0
  for end in ends[:2]:
    step = int(end) // p.batch_size
    epoch_of, at = p._locate(step * p.batch_size + np.arange(p.batch_size))
    got = p.batch(step)
    for e in np.unique(epoch_of).tolist():
      sel = epoch_of == e
      keys_of = lambda i, e=e: keyed_random.row_keys(p.seed, e, i)
      want = p.layout.examples(p.store.tokens, *p._epoch_data(e), at[sel], keys_of)
      for name, value in want.items():
        np.testing.assert_array_equal(got[name][sel], value, err_msg=name)
    straddled += len(np.unique(epoch_of)) == 2
  assert straddled


# Digests of three epochs' shuffled pair indices (and packings) of a synthetic corpus, recorded
# with bertjax before epochs were built ahead (pairs.build_pair_index on Python lists, then
# `index.take(rng.permutation(n))`, then `RowLayout.pack`).
DIGESTS = {
  (128, 0.1, None): "f4efe4cef1fbfe3c90ef9a8d5b15c789",
  (128, 1.0, 4): "8664853467a83fdeb555bf7c74526fb6",
  (32, 0.1, 3): "6cf2ab7101f861f1d754e39a20554f5c",
}


@pytest.mark.parametrize("seq_len,short,max_pairs", list(DIGESTS))
def test_three_epochs_are_the_pairs_recorded_before(seq_len, short, max_pairs):
  rng = np.random.default_rng(2024)
  per_doc = rng.integers(1, 30, size=3000)
  per_doc[::13] = 1
  lengths = rng.integers(1, 40, size=int(per_doc.sum()))
  lengths[::41] = rng.integers(80, 400, size=len(lengths[::41]))
  spec = masking.MaskingSpec(
    0.15, 20 if seq_len == 128 else 5, 0.8, 0.1, 4, np.ones(8, bool), np.arange(5, 8, dtype=np.int32), None
  )
  recipe = epochs.EpochRecipe(
    sent_start=np.concatenate([[0], np.cumsum(lengths)]),
    doc_start=np.concatenate([[0], np.cumsum(per_doc)]),
    seq_len=seq_len,
    short_seq_prob=short,
    random_next_prob=0.5,
    seed=7,
    layout=packing.RowLayout(seq_len, max_pairs, None, spec),
    train_docs=np.arange(3000)[np.arange(3000) % 29 != 3],
  )
  digest = hashlib.sha256()
  for e in range(3):
    index, packed = recipe.epoch(e)
    arrays = [index.a_start, index.a_len, index.b_start, index.b_len, index.label]
    arrays += [] if packed is None else [packed.row_start, packed.pairs]
    for a in arrays:
      digest.update(np.asarray(a, np.int64).tobytes())
  assert digest.hexdigest()[:32] == DIGESTS[(seq_len, short, max_pairs)]
