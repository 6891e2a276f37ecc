"""NSP pairs on numbered sentences, and the global, resumable, process-independent data order."""

import numpy as np
import pytest

from bertjax.data import pairs
from tests.support.corpora import examples_of


def numbered_store(n_docs=40, seed=0):
  """A token array where every token of sentence k is the number k: spans decode to sentences."""
  rng = np.random.default_rng(seed)
  per_doc = rng.integers(1, 9, size=n_docs)
  per_doc[3] = 1  # one-sentence documents are handled
  lengths = rng.integers(1, 25, size=int(per_doc.sum()))
  tokens = np.repeat(np.arange(len(lengths)), lengths)
  sent_start = np.concatenate([[0], np.cumsum(lengths)])
  doc_start = np.concatenate([[0], np.cumsum(per_doc)])
  return tokens, sent_start, doc_start


def google_truncate(la, lb, max_tokens, rng):
  """google-research/bert's truncate_seq_pair, token by token."""
  a, b = list(range(la)), list(range(lb))
  while len(a) + len(b) > max_tokens:
    longer = a if len(a) > len(b) else b
    longer.pop(0) if rng.random() < 0.5 else longer.pop()
  return len(a), len(b)


def test_truncation_matches_google_loop():
  rng = np.random.default_rng(0)
  la, lb = rng.integers(1, 80, 2000), rng.integers(1, 80, 2000)
  for max_tokens in (5, 29, 61, 125):
    got_a, got_b = pairs.truncated_lengths(la, lb, max_tokens)
    want = np.array([google_truncate(a, b, max_tokens, rng) for a, b in zip(la, lb)])
    np.testing.assert_array_equal(got_a, want[:, 0])
    np.testing.assert_array_equal(got_b, want[:, 1])


@pytest.mark.parametrize("seq_len", [16, 32, 128])
def test_numbered_pairs_are_consecutive_or_from_other_documents(seq_len):
  tokens, sent_start, doc_start = numbered_store()
  doc_of_sentence = np.repeat(np.arange(len(doc_start) - 1), np.diff(doc_start))
  index = pairs.build_pair_index(
    sent_start, doc_start, np.arange(len(doc_start) - 1), seq_len, 0.1, 0.5, np.random.default_rng(1)
  )
  assert len(index) > 50
  assert np.all(index.a_len >= 1) and np.all(index.b_len >= 1)
  assert np.all(index.a_len + index.b_len <= seq_len - 3)
  consecutive = 0
  for i in range(len(index)):
    a = tokens[index.a_start[i] : index.a_start[i] + index.a_len[i]]
    b = tokens[index.b_start[i] : index.b_start[i] + index.b_len[i]]
    assert np.all(np.diff(a) >= 0) and np.all(np.diff(a) <= 1)  # contiguous sentences
    assert np.all(np.diff(b) >= 0) and np.all(np.diff(b) <= 1)
    assert len(set(doc_of_sentence[a])) == 1 and len(set(doc_of_sentence[b])) == 1
    if index.label[i] == 0:
      assert doc_of_sentence[a[0]] == doc_of_sentence[b[0]]
      gap = b[0] - a[-1]  # the next sentence; truncation may drop whole sentences at the seam
      assert gap >= 1
      assert gap == 1 or index.a_len[i] + index.b_len[i] == seq_len - 3
      consecutive += gap == 1
    else:
      assert doc_of_sentence[a[0]] != doc_of_sentence[b[0]]
  assert consecutive > 0.5 * np.sum(index.label == 0)
  assert 0.3 < index.label.mean() < 0.7


def test_fewer_than_two_documents_is_refused(tmp_path, cache_dir, micro_tokenizer):
  from bertjax.data.cached import CachedPipeline
  from bertjax.errors import BertjaxError
  from tests.support.corpora import data_config

  (tmp_path / "one.txt").write_text("Only one document here.\nIt has two sentences.\n")
  with pytest.raises(BertjaxError, match="at least two"):
    CachedPipeline(data_config(f"files:{tmp_path}/one.txt", cache_dir), micro_tokenizer)


def assert_batches_equal(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_determinism_and_seed(make_pipeline):
  a, b = make_pipeline(), make_pipeline()
  for s in (0, 7, 123):
    assert_batches_equal(a.batch(s), b.batch(s))
  other = make_pipeline(train_seed=1)
  assert not np.array_equal(a.batch(0)["input_ids"], other.batch(0)["input_ids"])
  assert not np.array_equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])


def epoch_boundary_step(p):
  """A step whose batch straddles the end of epoch 0 (or the step just after it)."""
  return p._epoch_size(0) // p.batch_size


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_assemble_the_same_global_batch(make_pipeline, processes):
  whole = make_pipeline()
  for step in (0, 5, epoch_boundary_step(whole), epoch_boundary_step(whole) + 40):
    parts = []
    for rank in range(processes):  # each "process" is its own pipeline, building its rows only
      rows = np.arange(8).reshape(processes, -1)[rank]
      parts.append(make_pipeline().batch(step, rows))
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert_batches_equal(whole.batch(step), joined)
  shuffled = np.array([5, 0, 3])
  sub = whole.batch(9, shuffled)
  assert_batches_equal(sub, {k: v[shuffled] for k, v in whole.batch(9).items()})


def test_epochs_reshuffle_and_remask(make_pipeline):
  p = make_pipeline()
  size = p._epoch_size(0)
  assert p.epoch_of(0) == 0.0
  assert 1.0 <= p.epoch_of(size // p.batch_size + 1) < 2.0
  e0 = p._epoch(0)
  e1 = p._epoch(1)
  assert not (len(e0) == len(e1) and np.array_equal(e0.a_start, e1.a_start))

  # Remasking: a row of epoch 1 is masked with epoch 1's keys, so a pair seen in both epochs is
  # masked afresh. The pairs themselves are redrawn each epoch (random targets, random B), so
  # the same pair is masked here with both epochs' keys at the same index.
  from bertjax.data import keyed_random

  step = size // p.batch_size + 1  # wholly in epoch 1
  epochs, index = p._locate(step * p.batch_size + np.arange(p.batch_size))
  assert set(epochs.tolist()) == {1}
  assert_batches_equal(p.batch(step), examples_of(p, e1.take(index), keyed_random.row_keys(p.seed, 1, index)))
  as_epoch_0 = examples_of(p, e1.take(index), keyed_random.row_keys(p.seed, 0, index))
  differ = [not np.array_equal(a, b) for a, b in zip(p.batch(step)["masked_positions"], as_epoch_0["masked_positions"])]
  assert sum(differ) >= 0.75 * p.batch_size, differ


def test_resume_equals_uninterrupted(make_pipeline):
  p = make_pipeline(prefetch=4)
  with p.iterator(0) as it:
    first = [next(it) for _ in range(5)]
    state = it.state()
    import time

    time.sleep(0.2)  # let the prefetcher run ahead: the state must not move
    assert it.state() == state
    rest = [next(it) for _ in range(6)]
  assert state["step"] == 5 and [s for s, _ in first] == list(range(5))
  import json

  state = json.loads(json.dumps(state))
  fresh = make_pipeline()
  with fresh.iterator_from_state(state) as it:
    resumed = [next(it) for _ in range(6)]
  for (s1, b1), (s2, b2) in zip(rest, resumed):
    assert s1 == s2
    assert_batches_equal(b1, b2)
  with fresh.iterator(3, rows=[1, 6]) as it:
    step, part = next(it)
  assert step == 3
  assert_batches_equal(part, {k: v[[1, 6]] for k, v in fresh.batch(3).items()})


def test_restore_refuses_another_tokenizer_or_order(make_pipeline):
  from bertjax.errors import BertjaxError

  p = make_pipeline()
  state = p.state_for(12)
  assert p.restore(state) == 12
  with pytest.raises(BertjaxError, match="tokenizer"):
    p.restore(dict(state, tokenizer="0123456789abcdef"))
  with pytest.raises(BertjaxError, match="batch_size"):
    p.restore(dict(state, batch_size=16))


def test_eval_split_is_held_out_and_fixed(make_pipeline):
  p = make_pipeline()
  assert len(p.eval_docs) >= 2 and not set(p.eval_docs) & set(p.train_docs)
  first, again = p.eval_batches(), make_pipeline().eval_batches()
  assert len(first) == 2
  for x, y in zip(first, again):
    assert_batches_equal(x, y)
  # No training pair touches an eval document.
  doc_start, sent_start = p.store.doc_start, p.store.sent_start
  token_doc = lambda t: np.searchsorted(doc_start, np.searchsorted(sent_start, t, "right") - 1, "right") - 1
  e0 = p._epoch(0)
  used = set(token_doc(e0.a_start)) | set(token_doc(e0.b_start))
  assert not used & set(p.eval_docs)
  assert used <= set(p.train_docs)


def test_rows_for_sharding_on_fake_devices():
  import jax

  from bertjax.parallel.mesh import rows_for_sharding

  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  np.testing.assert_array_equal(rows_for_sharding(sharding, 16), np.arange(16))
  one = jax.sharding.SingleDeviceSharding(devices[0])
  np.testing.assert_array_equal(rows_for_sharding(one, 16), np.arange(16))
