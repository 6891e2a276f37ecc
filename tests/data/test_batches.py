"""Statistics and structure of the batches the train step receives (micro config scale)."""

import numpy as np
import pytest

from bertjax.data import keyed_random, masking

SHAPES = {
  "input_ids": (32,),
  "segment_ids": (32,),
  "attention_mask": (32,),
  "masked_positions": (5,),
  "masked_ids": (5,),
  "masked_weights": (5,),
  "nsp_labels": (),
}


@pytest.fixture(scope="module")
def big(make_pipeline):
  """About 4,000 examples from one pipeline with a large batch."""
  p = make_pipeline(train_batch_size=512)
  batches = [p.batch(s) for s in range(8)]
  return p, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def originals(b):
  ids = b["input_ids"].copy()
  w = b["masked_weights"] > 0
  rows = np.nonzero(w)[0]
  ids[rows, b["masked_positions"][w]] = b["masked_ids"][w]
  return ids


def test_shapes_and_dtypes(big):
  _, b = big
  for name, shape in SHAPES.items():
    assert b[name].shape[1:] == shape, name
    assert b[name].dtype == (np.float32 if name == "masked_weights" else np.int32), name


def test_layout_cls_sep_segments(big):
  p, b = big
  t = p.tokenizer
  ids = originals(b)
  assert np.all(b["input_ids"][:, 0] == t.cls_id)
  assert np.all((b["input_ids"] == t.sep_id).sum(1) == 2)
  assert np.all((b["input_ids"] == t.cls_id).sum(1) == 1)
  n = b["attention_mask"].sum(1)
  sep = np.argsort(ids != t.sep_id, axis=1, kind="stable")[:, :2]  # the two [SEP] positions
  assert np.all(sep[:, 1] == n - 1)
  cols = np.arange(32)[None]
  expected_seg = ((cols > sep[:, :1]) & (cols <= sep[:, 1:])).astype(np.int32)
  np.testing.assert_array_equal(b["segment_ids"], expected_seg)
  np.testing.assert_array_equal(b["attention_mask"], (cols < n[:, None]).astype(np.int32))
  assert np.all((ids == t.pad_id) == (b["attention_mask"] == 0))
  assert np.all(sep[:, 0] >= 2) and np.all(sep[:, 1] - sep[:, 0] >= 2)  # A and B non-empty


def test_masking_rate_and_budget(big):
  p, b = big
  n = b["attention_mask"].sum(1)
  budget = np.clip(np.round(n * 0.15), 1, 5)
  np.testing.assert_array_equal(b["masked_weights"].sum(1), budget)
  rate = b["masked_weights"].sum() / (n - 3).sum()
  assert 0.14 < rate < 0.19, rate


def test_80_10_10_split(big):
  p, b = big
  w = b["masked_weights"] > 0
  rows = np.nonzero(w)[0]
  now = b["input_ids"][rows, b["masked_positions"][w]]
  truth = b["masked_ids"][w]
  assert len(now) > 10_000
  frac_mask = np.mean(now == p.tokenizer.mask_id)
  frac_same = np.mean(now == truth)
  frac_random = 1 - frac_mask - frac_same
  assert abs(frac_mask - 0.8) < 0.02, frac_mask
  assert abs(frac_same - 0.1) < 0.02, frac_same
  assert abs(frac_random - 0.1) < 0.02, frac_random


def test_special_tokens_never_masked(big):
  p, b = big
  t = p.tokenizer
  w = b["masked_weights"] > 0
  assert not np.isin(b["masked_ids"][w], [t.cls_id, t.sep_id, t.pad_id, t.mask_id]).any()
  assert np.all(b["masked_positions"][w] < b["attention_mask"].sum(1)[:, None].repeat(5, 1)[w])
  assert np.all(np.diff(np.where(w, b["masked_positions"], 99), axis=1) > 0)  # sorted, unique
  assert np.all(b["masked_positions"][~w] == 0) and np.all(b["masked_ids"][~w] == 0)


def test_nsp_balance(big):
  _, b = big
  # google's semantics lean slightly to "random": a document's lone last sentence always gets a
  # random B, and a random pair returns A's unused sentences, which make more pairs. Measured on
  # this corpus: 0.54-0.56 at seq 32, 0.50 at seq 128.
  assert 0.45 < b["nsp_labels"].mean() < 0.58


def test_masks_are_dynamic_and_keyed(make_pipeline):
  p = make_pipeline()
  ids, _, attention = p.batch(0)["input_ids"], None, p.batch(0)["attention_mask"]
  same = masking.mask_batch(ids, attention, keyed_random.row_keys(0, 0, np.arange(8)), p.masking)
  again = masking.mask_batch(ids, attention, keyed_random.row_keys(0, 0, np.arange(8)), p.masking)
  other = masking.mask_batch(ids, attention, keyed_random.row_keys(0, 1, np.arange(8)), p.masking)
  np.testing.assert_array_equal(same["masked_positions"], again["masked_positions"])
  assert not np.array_equal(same["masked_positions"], other["masked_positions"])


def word_ids(starts_NxL):
  return np.cumsum(starts_NxL, axis=1)


def test_whole_word_masking_never_splits_a_word(make_pipeline):
  p = make_pipeline(whole_word_mask=True, train_batch_size=256)
  t = p.tokenizer
  start_V = t.word_start_mask()
  split_words = whole_words = 0
  for s in range(4):
    b = p.batch(s)
    ids = originals(b)
    cand = ~np.isin(ids, [t.pad_id, t.cls_id, t.sep_id, t.mask_id])
    word = word_ids(start_V[ids] | ~cand)
    masked = np.zeros_like(cand)
    w = b["masked_weights"] > 0
    masked[np.nonzero(w)[0], b["masked_positions"][w]] = True
    for r in range(len(ids)):
      for wid in np.unique(word[r][masked[r]]):
        in_word = (word[r] == wid) & cand[r]
        split_words += int(not masked[r][in_word].all())
        whole_words += int(in_word.sum() > 1)
  assert split_words == 0
  assert whole_words > 50  # multi-piece words were masked whole, so the check had teeth
