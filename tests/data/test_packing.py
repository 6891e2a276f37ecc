"""Sequence packing (data.pack_pairs): first-fit rows, per-pair layout and masking, global order."""

import json

import numpy as np
import pytest

from bertjax.data import keyed_random, masking, packing
from bertjax.errors import BertjaxError
from tests.support.corpora import examples_of

# The session corpus has long sentences for its size: at seq 128 with every document's target
# drawn short, about half the pairs are short enough to share a row; at 256 some rows hold three.
PACKED = dict(seq_len=128, short_seq_prob=1.0, max_predictions=20, pack_pairs=True, max_pairs_per_row=4)


def assert_batches_equal(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_first_fit_respects_every_capacity_and_places_each_pair_once():
  rng = np.random.default_rng(0)
  lengths = np.where(rng.random(3000) < 0.6, 64, rng.integers(5, 64, 3000))
  spec = masking.MaskingSpec(0.15, 10, 0.8, 0.1, 4, np.ones(8, bool), np.arange(5, 8), None)
  budgets = masking.prediction_budget(lengths, spec)
  packed = packing.pack(lengths, budgets, 64, 3, 10)
  assert sorted(packed.pairs.tolist()) == list(range(3000))  # every pair, once
  counts = np.diff(packed.row_start)
  row_of = np.repeat(np.arange(packed.num_rows), counts)
  assert counts.min() >= 1 and counts.max() == 3
  assert np.bincount(row_of, weights=lengths[packed.pairs]).max() <= 64
  assert np.bincount(row_of, weights=budgets[packed.pairs]).max() <= 10
  assert np.all(counts[lengths[packed.pairs[packed.row_start[:-1]]] == 64] == 1)  # full pairs stay alone
  for r in range(packed.num_rows):  # within a row, pairs keep their order in the stream
    assert np.all(np.diff(packed.pairs[packed.row_start[r] : packed.row_start[r + 1]]) > 0)
  # Rows open in stream order: each row's first pair comes after the previous row's first pair.
  assert np.all(np.diff(packed.pairs[packed.row_start[:-1]]) > 0)
  full = int((lengths == 64).sum())  # about 1,800 take a row each; the 1,200 others share rows
  assert packed.num_rows < full + 0.6 * (3000 - full)
  again = packing.pack(lengths, budgets, 64, 3, 10)
  np.testing.assert_array_equal(again.pairs, packed.pairs)
  np.testing.assert_array_equal(again.row_start, packed.row_start)
  # The prediction slots bind too: with 3 slots a row, pairs needing 2 or 3 predictions sit alone.
  tight = packing.pack(lengths, np.minimum(budgets, 3), 64, 3, 3)
  row_of = np.repeat(np.arange(tight.num_rows), np.diff(tight.row_start))
  assert np.bincount(row_of, weights=np.minimum(budgets, 3)[tight.pairs]).max() <= 3


def test_berts_count_rule_rounds_half_to_even_with_floor_and_cap():
  spec = masking.MaskingSpec(0.15, 20, 0.8, 0.1, 4, np.ones(8, bool), np.arange(5, 8), None)
  lengths = np.array([5, 10, 30, 50, 70, 128, 512])
  # 0.75 -> 1; 1.5 -> 2; 4.5 -> 4 (half to even, as Python's round); 7.5 -> 8; 10.5 -> 10;
  # 19.2 -> 19; 76.8 -> capped at 20.
  np.testing.assert_array_equal(masking.prediction_budget(lengths, spec), [1, 2, 4, 8, 10, 19, 20])


@pytest.fixture(scope="module")
def packed_pipeline(make_pipeline):
  return make_pipeline(**PACKED)


def test_packed_rows_lay_out_each_pair_as_it_would_be_alone(make_pipeline):
  for shape in (PACKED, dict(PACKED, seq_len=256, short_seq_prob=0.1, max_predictions=40)):
    p = make_pipeline(**shape)
    t, seq = p.tokenizer, shape["seq_len"]
    pairs, packed = p._epoch_data(0)
    most = int(np.diff(packed.row_start).max())
    assert most >= 2
    step = 3
    b = p.batch(step)
    rows = step * p.batch_size + np.arange(p.batch_size)  # wholly inside epoch 0 at this size
    index, row_of_pair, slot = packed.select(rows)
    alone = examples_of(p, pairs.take(index), keyed_random.row_keys(p.seed, 0, index))
    assert b["nsp_labels"].shape == b["nsp_positions"].shape == b["nsp_weights"].shape == (8, 4)
    np.testing.assert_array_equal(b["nsp_weights"].sum(1), np.bincount(row_of_pair, minlength=8))
    for j, (r, k) in enumerate(zip(row_of_pair, slot)):
      n = int(alone["attention_mask"][j].sum())
      start = int(b["nsp_positions"][r, k])
      span = slice(start, start + n)
      assert b["input_ids"][r, start] == t.cls_id
      np.testing.assert_array_equal(b["input_ids"][r, span], alone["input_ids"][j, :n])
      np.testing.assert_array_equal(b["segment_ids"][r, span], alone["segment_ids"][j, :n])
      np.testing.assert_array_equal(b["position_ids"][r, span], np.arange(n))
      assert np.all(b["pair_ids"][r, span] == k + 1)
      assert b["nsp_labels"][r, k] == alone["nsp_labels"][j] and b["nsp_weights"][r, k] == 1
      # The pair's predictions, moved by its offset, are among the row's.
      w = alone["masked_weights"][j] > 0
      row_w = b["masked_weights"][r] > 0
      mine = (b["masked_positions"][r] >= start) & (b["masked_positions"][r] < start + n) & row_w
      np.testing.assert_array_equal(b["masked_positions"][r][mine], alone["masked_positions"][j][w] + start)
      np.testing.assert_array_equal(b["masked_ids"][r][mine], alone["masked_ids"][j][w])
    real = b["pair_ids"] > 0
    np.testing.assert_array_equal(b["attention_mask"], real.astype(np.int32))
    assert np.all(real == (np.arange(seq)[None] < real.sum(1, keepdims=True)))  # pairs first, then padding
    assert np.all(b["input_ids"][~real] == t.pad_id) and np.all(b["position_ids"][~real] == 0)
    assert np.all(b["nsp_weights"][:, 0] == 1)  # every row holds a pair
    w = b["masked_weights"] > 0
    unused = 10**6 + np.arange(w.shape[1])  # unused slots (weight 0) come last
    assert np.all(np.diff(np.where(w, b["masked_positions"], unused), axis=1) > 0)  # sorted, unique
    assert np.all(b["masked_positions"][~w] == 0) and np.all(b["nsp_positions"][b["nsp_weights"] == 0] == 0)


def test_masking_per_pair_follows_berts_count_rule(packed_pipeline):
  p = packed_pipeline
  checked = 0
  for step in range(6):
    b = p.batch(step)
    for r in range(p.batch_size):
      for k in np.flatnonzero(b["nsp_weights"][r]):
        in_pair = b["pair_ids"][r] == k + 1
        n = int(in_pair.sum())
        w = b["masked_weights"][r] > 0
        got = int(in_pair[b["masked_positions"][r][w]].sum())
        assert got == min(max(round(0.15 * n), 1), 20), (step, r, k, n, got)  # round: half to even
        checked += 1
  assert checked > 1.3 * 6 * p.batch_size  # several rows held more than one pair


def test_packing_lowers_the_padding_fraction(make_pipeline):
  unpacked = make_pipeline(**dict(PACKED, pack_pairs=False)).stats
  packed = make_pipeline(**PACKED).stats
  assert packed["pairs_per_epoch"] == unpacked["pairs_per_epoch"] == unpacked["rows_per_epoch"]
  assert packed["rows_per_epoch"] < 0.8 * packed["pairs_per_epoch"]
  assert packed["padding_fraction"] < 0.6 * unpacked["padding_fraction"]


def test_an_unpacked_batch_is_what_it_was(make_pipeline):
  """pack_pairs off: no packing arrays, one NSP label a row, pairs as the stream holds them."""
  p = make_pipeline()
  b = p.batch(2)
  assert set(b) == {
    "input_ids",
    "segment_ids",
    "attention_mask",
    "masked_positions",
    "masked_ids",
    "masked_weights",
    "nsp_labels",
  }
  index = 2 * p.batch_size + np.arange(p.batch_size)
  assert_batches_equal(b, examples_of(p, p._epoch(0).take(index), keyed_random.row_keys(p.seed, 0, index)))
  assert "max_pairs_per_row" not in p.state_for(2)


@pytest.mark.parametrize("processes", [2, 4])
def test_packed_order_is_the_same_for_one_two_and_four_processes(make_pipeline, packed_pipeline, processes):
  whole = packed_pipeline
  boundary = whole._epoch_size(0) // whole.batch_size  # straddles the end of epoch 0
  for step in (0, 5, boundary, boundary + 1, boundary + 20):
    parts = []
    for rank in range(processes):  # each "process" is its own pipeline, building its rows only
      rows = np.arange(8).reshape(processes, -1)[rank]
      parts.append(make_pipeline(**PACKED).batch(step, rows))
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert_batches_equal(whole.batch(step), joined)
  shuffled = np.array([5, 0, 3])
  assert_batches_equal(whole.batch(9, shuffled), {k: v[shuffled] for k, v in whole.batch(9).items()})


def test_packed_resume_equals_uninterrupted_and_refuses_another_packing(make_pipeline):
  p = make_pipeline(**PACKED, prefetch=3)
  with p.iterator(0) as it:
    [next(it) for _ in range(4)]
    state = it.state()
    rest = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(state))
  assert state["step"] == 4 and state["max_pairs_per_row"] == 4
  fresh = make_pipeline(**PACKED)
  with fresh.iterator_from_state(state) as it:
    for (s1, b1), (s2, b2) in zip(rest, [next(it) for _ in range(5)]):
      assert s1 == s2
      assert_batches_equal(b1, b2)
  with pytest.raises(
    BertjaxError, match="data.pack_pairs=true, data.max_pairs_per_row=4, this run data.pack_pairs=false"
  ):
    make_pipeline(**dict(PACKED, pack_pairs=False)).restore(state)
  with pytest.raises(BertjaxError, match="max_pairs_per_row=2"):
    make_pipeline(**dict(PACKED, max_pairs_per_row=2)).restore(state)


def test_packed_eval_batches_are_fixed_and_cover_pairs_not_rows(make_pipeline, packed_pipeline):
  first, again = packed_pipeline.eval_batches(), make_pipeline(**PACKED).eval_batches()
  assert len(first) == 2
  for x, y in zip(first, again):
    assert_batches_equal(x, y)
  assert {"pair_ids", "nsp_weights"} <= set(first[0])
  assert_batches_equal(packed_pipeline.eval_batches([6, 1])[1], {k: v[[6, 1]] for k, v in first[1].items()})


def test_streaming_packs_each_window(make_streaming):
  p = make_streaming(**PACKED)
  whole = [p.batch(s) for s in range(6)]
  assert any(b["nsp_weights"].sum() > p.batch_size for b in whole)
  for b in whole:
    np.testing.assert_array_equal(b["attention_mask"], (b["pair_ids"] > 0).astype(np.int32))
  for step in (0, 4):  # two "processes", each its own pipeline and rows
    parts = [make_streaming(**PACKED).batch(step, rows) for rows in (np.arange(4), np.arange(4, 8))]
    assert_batches_equal(whole[step], {k: np.concatenate([x[k] for x in parts]) for k in parts[0]})
  state = json.loads(json.dumps(p.state_for(3)))
  assert state["max_pairs_per_row"] == 4
  with make_streaming(**PACKED).iterator_from_state(state) as it:
    for s in (3, 4, 5):
      step, b = next(it)
      assert step == s
      assert_batches_equal(b, whole[s])
  with pytest.raises(BertjaxError, match="data.pack_pairs"):
    make_streaming(**dict(PACKED, pack_pairs=False)).restore(state)
  assert {"pair_ids", "nsp_weights"} <= set(p.eval_batches()[0])


def test_the_config_refuses_more_pairs_than_a_row_can_hold():
  from bertjax.config import loading

  with pytest.raises(BertjaxError, match=r"^config data.max_pairs_per_row=7 pairs cannot fit in data.seq_len=32"):
    loading.load_config(
      "configs/tiny.py",
      ["data.seq_len=32", "data.max_predictions=5", "data.pack_pairs=true", "data.max_pairs_per_row=7"],
    )
  with pytest.raises(BertjaxError, match="data.max_pairs_per_row=0 must be positive"):
    loading.load_config("configs/tiny.py", ["data.max_pairs_per_row=0"])
  config = loading.load_config("configs/packed.py")
  assert config.data.pack_pairs and config.data.max_pairs_per_row == 4 and config.data.seq_len == 128
  config = loading.load_config("configs/packed.py:phase=2")
  assert config.data.pack_pairs and config.data.max_pairs_per_row == 8 and config.data.seq_len == 512


def test_preview_and_data_bench_show_packed_rows(corpus_dir, cache_dir, micro_tokenizer, tmp_path, capsys):
  from bertjax.data import bench, preview
  from tests.support.corpora import data_config

  config = data_config(f"files:{corpus_dir}/*.txt", cache_dir, **PACKED)
  micro_tokenizer.save(tmp_path / "work" / "tokenizer")
  preview.preview(config, tmp_path / "work", 2, tmp_path / "p.npz", show=16)
  arrays = np.load(tmp_path / "p.npz")
  assert {"position_ids", "pair_ids", "nsp_positions", "nsp_weights"} <= set(arrays.files)
  assert arrays["nsp_labels"].shape == (16, 4)
  printed = capsys.readouterr().out
  assert " || [CLS] " in printed and "nsp_label=[" in printed
  result = bench.run(config, tmp_path / "work", seconds=0.3)
  assert result["pack_pairs"] and result["pairs_per_row"] > 1.2 and 0 < result["padding_fraction"] < 0.3
  assert result["epoch_padding_fraction"] < 0.2 and result["epoch_pairs_per_row"] > 1.2


def test_a_packed_run_of_two_processes_logs_what_one_process_logs(tmp_path, corpus_and_tokenizer):
  """Real processes joined through jax.distributed, each building only its rows of packed batches."""
  from bertjax.metrics import writer
  from tests.support.runs import launch, launch_job, train_args, train_losses

  packed = [
    "--config.model.max_position_embeddings=128",
    *(f"--config.data.{k}={str(v).lower()}" for k, v in PACKED.items()),
  ]
  one = launch(train_args(corpus_and_tokenizer, tmp_path / "one", steps=3) + packed, devices=4)
  out, _ = one.communicate(timeout=300)
  assert one.returncode == 0, out[-3000:]
  procs = launch_job(train_args(corpus_and_tokenizer, tmp_path / "two", steps=3) + packed)
  for p in procs:
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-5)
  train = [r for r in writer.read_metrics(tmp_path / "one") if r["split"] == "train"]
  assert len(train) == 3 and max(r["pairs_per_row"] for r in train) > 1
  assert all(0 <= r["padding_fraction"] < 0.5 and r["tokens_per_s"] > 0 for r in train)
