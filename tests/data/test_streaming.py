"""data.streaming: batches from a document stream keep the global order, masks and exact resume."""

import json
import re
import time

import numpy as np
import pytest

from bertjax.errors import BertjaxError
from tests.support.corpora import numbered_documents, streaming_config, write_bert_text, write_jsonl_hub

# 60 documents, the first 6 held out, windows of 16: 16 + 16 + 16 + 6 documents a pass.
STEPS = 45  # a pass is about 31 steps: this crosses windows and reaches the second pass


def assert_batches_equal(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def streamed(make_streaming):
  """One pipeline's first STEPS global batches, read in order."""
  p = make_streaming()
  return p, [p.batch(s) for s in range(STEPS)]


def test_factory_and_pass_structure(make_streaming, make_pipeline, streamed):
  from bertjax.data.cached import CachedPipeline
  from bertjax.data.streaming import StreamingPipeline

  p, _ = streamed
  assert isinstance(p, StreamingPipeline) and isinstance(make_pipeline(), CachedPipeline)
  assert p.stats["windows_per_epoch"] == 4 and p.stats["documents_read"] == 54
  assert [w.documents for w in p.windows.entries[:4]] == [16, 16, 16, 6]
  assert p.windows.entries[0].locator["docs"] == 6  # after the held-out documents
  assert p.epoch_of(0) == 0.0 and 1.0 < p.epoch_of(STEPS - 1) < 2.0
  # The same window in the second pass draws other pairs.
  first, second = p.windows.built(0)[1], p.windows.built(4)[1]
  assert not (len(first) == len(second) and np.array_equal(first.a_start, second.a_start))


def test_batches_are_well_formed(streamed, micro_tokenizer):
  t = micro_tokenizer
  _, batches = streamed
  special = [t.pad_id, t.cls_id, t.sep_id, t.mask_id]
  labels = []
  for b in batches:
    assert b["input_ids"].shape == b["segment_ids"].shape == (8, 32)
    assert b["masked_positions"].shape == b["masked_weights"].shape == (8, 5)
    assert b["input_ids"].dtype == np.int32 and b["masked_weights"].dtype == np.float32
    ids, att = b["input_ids"], b["attention_mask"]
    assert np.all(ids[:, 0] == t.cls_id)
    real = att.astype(bool)
    assert np.all(np.sum((ids == t.sep_id) & real, 1) == 2)
    assert np.all(ids[~real] == t.pad_id)
    w = b["masked_weights"] > 0
    assert np.all(w.sum(1) >= 1)
    rows = np.nonzero(w)[0]
    pos = b["masked_positions"][w]
    assert np.all(real[rows, pos])  # only real tokens
    assert not np.isin(b["masked_ids"][w], special).any()  # that were not special
    assert np.all(ids[rows, pos] != t.sep_id) and np.all(pos > 0)
    labels.extend(b["nsp_labels"])
  assert 0.3 < np.mean(labels) < 0.7


def test_determinism_and_seed(make_streaming, streamed):
  _, batches = streamed
  again = make_streaming()
  for s in (0, 7, 40):
    assert_batches_equal(again.batch(s), batches[s])
  other = make_streaming(train_seed=1)
  assert not np.array_equal(other.batch(0)["input_ids"], batches[0]["input_ids"])
  assert not np.array_equal(batches[0]["input_ids"], batches[1]["input_ids"])


def test_files_and_hub_streams_of_the_same_documents_agree(make_streaming, streamed):
  _, batches = streamed
  hub = make_streaming("hf")
  parallel = make_streaming("hf", num_proc=2)  # rows split and tokenised in 2 worker processes
  for s in range(0, STEPS, 9):
    assert_batches_equal(hub.batch(s), batches[s])
    assert_batches_equal(parallel.batch(s), batches[s])
  assert parallel._tokeniser._pool is not None


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_processes_assemble_the_same_global_batch(make_streaming, streamed, processes):
  p, batches = streamed
  ends = [w.first_example + w.size for w in p.windows.entries]
  straddling = next(
    s for s in range(STEPS) if len(np.unique(np.searchsorted(ends, s * 8 + np.arange(8), side="right"))) > 1
  )
  ranks = [make_streaming() for _ in range(processes)]  # each reads the stream itself
  for step in (0, straddling, STEPS - 1):
    parts = [r.batch(step, np.arange(8).reshape(processes, -1)[k]) for k, r in enumerate(ranks)]
    assert_batches_equal({k: np.concatenate([q[k] for q in parts]) for k in parts[0]}, batches[step])
  rows = np.array([5, 0, 3])
  assert_batches_equal(ranks[0].batch(9, rows), {k: v[rows] for k, v in batches[9].items()})


@pytest.mark.parametrize("source", ["files", "hf"])
def test_resume_equals_uninterrupted(make_streaming, streamed, source):
  _, batches = streamed
  p = make_streaming(source, prefetch=4)
  with p.iterator(0) as it:
    first = [next(it) for _ in range(33)]
    state = it.state()
    time.sleep(0.2)  # the prefetcher runs ahead: the state must not move
    assert it.state() == state
  assert state["step"] == 33 and [s for s, _ in first] == list(range(33))
  for step, b in first:
    assert_batches_equal(b, batches[step])
  for saved in (state, p.state_for(STEPS - 8)):  # mid-pass, and in the second pass
    saved = json.loads(json.dumps(saved))  # checkpoints store it as JSON
    assert (saved["locator"]["stream"] is not None) == (source == "hf")
    fresh = make_streaming(source)
    with fresh.iterator_from_state(saved) as it:
      resumed = [next(it) for _ in range(6)]
    assert [s for s, _ in resumed] == list(range(saved["step"], saved["step"] + 6))
    for step, b in resumed:
      assert_batches_equal(b, batches[step])
    # It started at the saved window: nothing before it was read or tokenised.
    assert (fresh.windows.entries[0].epoch, fresh.windows.entries[0].index) == (saved["epoch"], saved["window"])
  with fresh.iterator(3, rows=[1, 6]) as it:  # before the resumed window: read from the start
    step, part = next(it)
  assert step == 3
  assert_batches_equal(part, {k: v[[1, 6]] for k, v in batches[3].items()})


def test_restore_refuses_another_order_or_the_other_pipeline(make_streaming, make_pipeline, streamed):
  p, _ = streamed
  state = p.state_for(12)
  assert p.restore(state) == 12
  with pytest.raises(BertjaxError, match="tokenizer"):
    p.restore(dict(state, tokenizer="0123456789abcdef"))
  with pytest.raises(BertjaxError, match="train.batch_size"):
    p.restore(dict(state, batch_size=16))
  with pytest.raises(BertjaxError, match="streaming_window_documents"):
    make_streaming(window_documents=20).restore(state)
  with pytest.raises(BertjaxError, match="streaming=true"):
    make_pipeline().restore(state)
  with pytest.raises(BertjaxError, match="streaming=false"):
    p.restore(make_pipeline().state_for(12))


def _doc_numbers(tokenizer, tokens) -> set[int]:
  return {int(d) for d in re.findall(r"doc (\d+) line", tokenizer.decode(tokens))}


def test_eval_holds_out_the_first_documents_and_is_fixed(make_streaming, streamed, micro_tokenizer):
  p, _ = streamed
  first, again = p.eval_batches(), make_streaming().eval_batches()
  assert len(first) == 2 and first[0]["input_ids"].shape == (8, 32)
  for x, y in zip(first, again):
    assert_batches_equal(x, y)
  assert _doc_numbers(micro_tokenizer, p._eval[0]) == set(range(6))
  trained = set()
  for w in range(len(p.windows.entries)):
    trained |= _doc_numbers(micro_tokenizer, p.windows.built(w)[0])
  assert trained == set(range(6, 60))
  assert make_streaming(eval_documents=0).eval_batches() == []


def test_bad_streaming_settings(tmp_path, cache_dir, micro_tokenizer):
  from bertjax.data.pipeline import make_pipeline as factory

  docs = numbered_documents(5)
  write_bert_text(tmp_path / "few.txt", docs)
  source = f"files:{tmp_path}/few.txt"
  with pytest.raises(BertjaxError, match="at least two after the 4 held out"):
    factory(streaming_config(source, cache_dir, eval_documents=4), micro_tokenizer).batch(0)
  from bertjax.config.validation import validate  # the settings themselves: refused at the entry point

  with pytest.raises(BertjaxError, match="streaming_eval_documents"):
    validate(streaming_config(source, cache_dir, eval_documents=1))
  with pytest.raises(BertjaxError, match="streaming_window_documents"):
    validate(streaming_config(source, cache_dir, window_documents=1))
  hub = tmp_path / "hub"
  write_jsonl_hub(hub, [[""]] * 3 + [["   "]] * 3)
  with pytest.raises(BertjaxError, match="no sentence pairs"):
    factory(streaming_config(f"hf:{hub}", cache_dir, eval_documents=0), micro_tokenizer).batch(0)
  # Windows of 2 over 5 documents: the lone last one is skipped, and the passes go on.
  p = factory(streaming_config(source, cache_dir, window_documents=2, eval_documents=0), micro_tokenizer)
  for s in range(30):
    assert p.batch(s)["input_ids"].shape == (8, 32)
  assert p.stats["windows_per_epoch"] == 2 and p.stats["warnings"]
