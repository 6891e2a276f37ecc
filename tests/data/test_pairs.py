"""The compact pair index: the same pairs, draw for draw, as the straightforward build it replaced."""

import tracemalloc

import numpy as np
import pytest

from bertjax.data import pairs


def reference_pair_index(sent_start, doc_start, doc_ids, seq_len, short_seq_prob, random_next_prob, rng):
  """bertjax 0.1's `build_pair_index`: Python lists, then truncation over all pairs at once."""
  import bisect

  max_tokens = seq_len - 3
  doc_ids = np.asarray(doc_ids, np.int64)
  n_docs = len(doc_ids)
  a0, a1, b0, b1, labels = [], [], [], [], []
  for pos, d in enumerate(doc_ids.tolist()):
    s0, s1 = int(doc_start[d]), int(doc_start[d + 1])
    offsets = sent_start[s0 : s1 + 1].tolist()
    target = max_tokens
    if rng.random() < short_seq_prob:
      target = int(rng.integers(2, max_tokens + 1))
    i = 0
    n = s1 - s0
    while i < n:
      j = min(max(bisect.bisect_left(offsets, offsets[i] + target), i + 1), n)
      size = j - i
      a_end = i + (int(rng.integers(1, size)) if size >= 2 else 1)
      if size == 1:
        is_random = j >= n or rng.random() < random_next_prob
        if not is_random:
          j = i + 2
      else:
        is_random = rng.random() < random_next_prob
      if is_random and n_docs > 1:
        k = int(rng.integers(n_docs - 1))
        r = int(doc_ids[k + (k >= pos)])
        r0, r1 = int(doc_start[r]), int(doc_start[r + 1])
        start = int(rng.integers(r0, r1))
        target_b = target - (offsets[a_end] - offsets[i])
        want = int(sent_start[start]) + max(target_b, 1)
        stop = int(np.searchsorted(sent_start[start + 1 : r1 + 1], want)) + start + 1
        stop = min(stop, r1)
        b0.append(int(sent_start[start])), b1.append(int(sent_start[stop]))
        labels.append(1)
        next_i = a_end
      else:
        b0.append(offsets[a_end]), b1.append(offsets[j])
        labels.append(0)
        next_i = j
      a0.append(offsets[i]), a1.append(offsets[a_end])
      i = next_i
  a_start = np.array(a0, np.int64)
  a_len = np.array(a1, np.int64) - a_start
  b_start = np.array(b0, np.int64)
  b_len = np.array(b1, np.int64) - b_start
  new_a, new_b = pairs.truncated_lengths(a_len, b_len, max_tokens)
  cut_a = rng.binomial(a_len - new_a, 0.5)
  cut_b = rng.binomial(b_len - new_b, 0.5)
  return a_start + cut_a, new_a, b_start + cut_b, new_b, np.array(labels, np.int64)


def synthetic_store(n_docs, seed=0, long_every=23):
  """Documents of 1-20 sentences of 1-40 tokens, some sentences far longer than a row."""
  rng = np.random.default_rng(seed)
  per_doc = rng.integers(1, 21, size=n_docs)
  per_doc[::11] = 1  # one-sentence documents
  lengths = rng.integers(1, 41, size=int(per_doc.sum()))
  lengths[::long_every] = rng.integers(100, 700, size=len(lengths[::long_every]))
  return np.concatenate([[0], np.cumsum(lengths)]), np.concatenate([[0], np.cumsum(per_doc)])


def assert_same_pairs(index, reference):
  for name, want in zip(("a_start", "a_len", "b_start", "b_len", "label"), reference):
    np.testing.assert_array_equal(np.asarray(getattr(index, name), np.int64), want, err_msg=name)


@pytest.mark.parametrize(
  "seq_len,short,random_next,docs",
  [(32, 0.1, 0.5, "all"), (128, 1.0, 0.5, "all"), (512, 0.1, 0.3, "every other"), (16, 0.0, 0.9, "two")],
)
def test_the_compact_build_draws_the_reference_pairs(monkeypatch, seq_len, short, random_next, docs):
  monkeypatch.setattr(pairs, "_CHUNK", 1000)  # truncation and shuffling cross chunk boundaries
  sent_start, doc_start = synthetic_store(600)
  doc_ids = {"all": np.arange(600), "every other": np.arange(1, 600, 2), "two": np.array([4, 9])}[docs]
  key = [seq_len, int(short * 10)]
  rng, ref_rng = np.random.default_rng(key), np.random.default_rng(key)
  index = pairs.build_pair_index(sent_start, doc_start, doc_ids, seq_len, short, random_next, rng)
  reference = reference_pair_index(sent_start, doc_start, doc_ids, seq_len, short, random_next, ref_rng)
  assert_same_pairs(index, reference)
  assert rng.random() == ref_rng.random()  # the generator is left where the reference leaves it
  assert len(index) > (10 if docs == "two" else 500)


def test_the_index_is_compact():
  sent_start, doc_start = synthetic_store(300)
  index = pairs.build_pair_index(sent_start, doc_start, np.arange(300), 128, 0.1, 0.5, np.random.default_rng(0))
  dtypes = [getattr(index, f).dtype for f in ("a_start", "a_len", "b_start", "b_len", "label")]
  assert dtypes == [np.int64, np.int16, np.int64, np.int16, np.int8]
  assert index.nbytes / len(index) <= 24
  assert pairs.length_dtype(512) == np.int16 and pairs.length_dtype(1 << 16) == np.int32


def test_building_holds_tens_of_bytes_a_pair_not_python_lists(monkeypatch):
  """The old build held Python lists of ints (about 220 bytes a pair at its peak); now typed
  buffers, truncation a chunk at a time, and a shuffle that replaces one array at a time."""
  monkeypatch.setattr(pairs, "_CHUNK", 1024)
  sent_start, doc_start = synthetic_store(4000, long_every=1_000_000)
  rng = np.random.default_rng(0)
  tracemalloc.start()
  try:
    index = pairs.build_pair_index(sent_start, doc_start, np.arange(4000), 128, 0.1, 0.5, rng)
    built = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    index.permute(pairs.shuffle_order(rng, len(index)))
    shuffled = tracemalloc.get_traced_memory()[1] - base
  finally:
    tracemalloc.stop()
  assert len(index) > 10_000
  # 25 bytes a pair of buffers, 4 of truncated lengths, growth and one chunk (about 30 at scale)
  assert built / len(index) < 45, built / len(index)
  assert shuffled / len(index) < 16, shuffled / len(index)  # the int32 order and one int64 array


def test_permute_and_shuffle_order_are_take_and_permutation():
  sent_start, doc_start = synthetic_store(200)
  index = pairs.build_pair_index(sent_start, doc_start, np.arange(200), 64, 0.1, 0.5, np.random.default_rng(3))
  for n in (0, 1, 17, len(index)):
    order = pairs.shuffle_order(np.random.default_rng(n), n)
    np.testing.assert_array_equal(order, np.random.default_rng(n).permutation(n))
  perm = np.random.default_rng(5).permutation(len(index))
  taken = index.take(perm)
  assert_same_pairs(index.permute(pairs.shuffle_order(np.random.default_rng(5), len(index))), taken.__dict__.values())


def test_a_build_stops_when_asked():
  sent_start, doc_start = synthetic_store(3000)
  asked = []

  def should_stop():
    asked.append(1)
    return len(asked) > 1

  with pytest.raises(pairs.Cancelled):
    pairs.build_pair_index(sent_start, doc_start, np.arange(3000), 128, 0.1, 0.5, np.random.default_rng(0), should_stop)
  assert len(asked) == 2
