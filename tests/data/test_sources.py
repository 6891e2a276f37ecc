"""Corpora, sentence splitting, tokenizers, preview and bench; every bad input of issue 3."""

import json

import numpy as np
import pytest

from bertjax.data import corpus as corpus_lib
from bertjax.data import sentences
from bertjax.data import tokenizer as tok_lib
from bertjax.errors import BertjaxError
from tests.support.corpora import (
  data_config,
  numbered_documents,
  write_bert_text,
)
from tests.support.extras import require


def test_sentence_splitter_rules():
  got = sentences.split_sentences(
    'Dr. Smith met J. Doe at 3 p.m. yesterday.  It rained!  Did it stop? "Yes." '
    "Items: 1. apples, e.g. red ones. 42 remain"
  )
  assert got == [
    "Dr. Smith met J. Doe at 3 p.m. yesterday.",
    "It rained!",
    "Did it stop?",
    '"Yes."',
    "Items: 1. apples, e.g. red ones.",
    "42 remain",
  ]
  assert sentences.split_sentences("   ") == []
  assert sentences.cut_long("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]


def test_builtin_corpus():
  c = corpus_lib.Corpus("builtin")
  docs = list(c.documents())
  assert len(docs) > 300 and all(len(d) >= 2 for d in docs)
  assert sum(map(len, docs)) > 10_000
  assert corpus_lib.Corpus("builtin").fingerprint == c.fingerprint
  assert not any(s.startswith(">>>") for d in docs for s in d)


def test_files_text_jsonl_parquet_and_disk(tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = numbered_documents(6)
  write_bert_text(tmp_path / "a.txt", docs)
  text = ["\n".join(d) for d in docs]
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in text))
  pq.write_table(pa.table({"body": text}), tmp_path / "c.parquet")
  datasets.Dataset.from_dict({"body": text}).save_to_disk(str(tmp_path / "saved"))
  for source in (
    f"files:{tmp_path}/a.txt",
    f"files:{tmp_path}/b.jsonl",
    f"files:{tmp_path}/c.parquet",
    f"disk:{tmp_path}/saved",
    f"hf:{tmp_path}/hub",
  ):
    if source.startswith("hf:"):  # the hub code path on a local dataset folder (no network)
      (tmp_path / "hub").mkdir()
      (tmp_path / "hub" / "train.jsonl").write_text((tmp_path / "b.jsonl").read_text())
    c = corpus_lib.Corpus(source, text_column="body")
    assert list(c.documents()) == docs, source


def test_hf_and_disk_sources_feed_the_pipeline(tmp_path, cache_dir, micro_tokenizer):
  import datasets

  from bertjax.data.cached import CachedPipeline

  text = ["\n".join(d) for d in numbered_documents(12)]
  datasets.Dataset.from_dict({"text": text}).save_to_disk(str(tmp_path / "saved"))
  p = CachedPipeline(data_config(f"disk:{tmp_path}/saved", cache_dir), micro_tokenizer)
  assert p.stats["documents"] == 12 and p.batch(0)["input_ids"].shape == (8, 32)
  with pytest.raises(BertjaxError, match="no column 'body'"):
    corpus_lib.Corpus(f"disk:{tmp_path}/saved", text_column="body")


@pytest.mark.parametrize(
  "source, match",
  [
    ("files:/nonexistent/*.txt", "matches no files"),
    ("files:/nonexistent/x.txt", "matches no files"),
    ("disk:/nonexistent", "does not exist"),
    ("nonsense", "not understood"),
  ],
)
def test_bad_sources(source, match):
  with pytest.raises(BertjaxError, match=match):
    corpus_lib.Corpus(source)


def test_empty_corpus(tmp_path, cache_dir, micro_tokenizer):
  from bertjax.data.cached import CachedPipeline

  (tmp_path / "empty.txt").write_text("\n\n   \n")
  config = data_config(f"files:{tmp_path}/empty.txt", cache_dir)
  with pytest.raises(BertjaxError, match="empty"):
    CachedPipeline(config, micro_tokenizer)
  with pytest.raises(BertjaxError, match="no sentences"):
    tok_lib.train_tokenizer(config, tmp_path / "tok")


def test_undecodable_bytes_long_lines_and_one_sentence_documents(tmp_path, cache_dir, micro_tokenizer):
  from bertjax.data.cached import CachedPipeline

  docs = numbered_documents(10)
  write_bert_text(tmp_path / "ok.txt", docs)
  (tmp_path / "bad.txt").write_bytes(
    b"Broken \xff\xfe bytes here.\nAnother line.\n\nOne sentence document.\n\n"
    + b"word " * 5000
    + b"\n\n"
    + b"x" * 30000
    + b"\nEnd.\n"
  )
  c = corpus_lib.Corpus(f"files:{tmp_path}/*.txt", max_sentence_chars=1000)
  got = list(c.documents())
  assert any("\ufffd" in s for d in got for s in d)
  assert max(len(s) for d in got for s in d) <= 1000
  assert sum(c.warnings.values()) >= 2
  p = CachedPipeline(data_config(f"files:{tmp_path}/*.txt", cache_dir, max_sentence_chars=1000), micro_tokenizer)
  assert any("undecodable" in k for k in p.stats["warnings"])
  for s in range(20):  # the long and one-sentence documents go through without a crash
    assert p.batch(s)["input_ids"].shape == (8, 32)


def test_jsonl_without_the_text_column(tmp_path):
  (tmp_path / "x.jsonl").write_text(json.dumps({"content": "Hi."}) + "\n")
  with pytest.raises(BertjaxError, match="data.text_column"):
    list(corpus_lib.Corpus(f"files:{tmp_path}/x.jsonl").documents())


def test_trained_tokenizer_special_ids_and_roundtrip(micro_tokenizer, tmp_path):
  t = micro_tokenizer
  assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 1, 2, 3, 4)
  assert t.vocab_size == 256 and t.kind == "sentencepiece"
  assert not set(t.encode("the river [MASK] [CLS] [SEP]")) & {0, 2, 3, 4}  # never parsed
  assert (
    t.decode(t.encode("Doc 5 line 2 says the river runs.")) == "doc 5 line 2 says the river runs."
  )  # lower-cased by default
  t.save(tmp_path / "t")
  loaded = tok_lib.load_tokenizer(tmp_path / "t")
  assert loaded.fingerprint == t.fingerprint
  assert loaded.encode("bread and stone") == t.encode("bread and stone")
  starts = t.word_start_mask()
  assert starts.shape == (256,) and starts[:5].all() and 0 < starts.sum() < 256
  tok_lib.check_vocab_size(t, 256)
  with pytest.raises(BertjaxError, match="data.vocab_size=256"):
    tok_lib.check_vocab_size(t, 300)


def test_bpe_cased_tokenizer(corpus_dir, cache_dir, tmp_path):
  config = data_config(f"files:{corpus_dir}/*.txt", cache_dir, tokenizer_model="bpe", lowercase=False, vocab_size=200)
  t = tok_lib.train_tokenizer(config, tmp_path)
  assert t.vocab_size == 200 and t.mask_id == 4
  assert "Doc" in t.decode(t.encode("Doc 3"))
  with pytest.raises(BertjaxError, match="lower data.vocab_size"):
    tok_lib.train_tokenizer(data_config(f"files:{corpus_dir}/*.txt", cache_dir, vocab_size=60000), tmp_path / "big")


def write_vocab(path, words):
  path.write_text("".join(w + "\n" for w in words))


VOCAB = (
  ["[PAD]"]
  + [f"[unused{i}]" for i in range(3)]
  + [
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "river",
    "run",
    "##s",
    "##ning",
    "past",
    "mill",
    ".",
    ",",
    "a",
    "##b",
    "b",
  ]
)


def test_wordpiece_vocab_txt_matches_transformers(tmp_path):
  transformers = require("transformers")
  write_vocab(tmp_path / "vocab.txt", VOCAB)
  t = tok_lib.load_tokenizer(tmp_path)
  assert t.kind == "wordpiece"
  assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 4, 5, 6, 7)
  ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
  for text in ("The river runs past the mill.", "Running, abb zzz!"):
    assert t.encode(text) == ref.encode(text, add_special_tokens=False)
  starts = t.word_start_mask()
  assert not starts[VOCAB.index("##s")] and starts[VOCAB.index("run")]
  t.save(tmp_path / "saved")
  again = tok_lib.load_tokenizer(tmp_path / "saved" / "tokenizer.json")
  assert again.encode("the river runs") == t.encode("the river runs")


def test_wordpiece_whole_word_masking_groups_hash_pieces(tmp_path):
  from types import SimpleNamespace

  from bertjax.data import keyed_random, masking

  write_vocab(tmp_path / "vocab.txt", VOCAB)
  t = tok_lib.load_tokenizer(tmp_path / "vocab.txt")
  d = SimpleNamespace(
    mask_prob=0.3, max_predictions=6, mask_token_prob=0.8, random_token_prob=0.1, whole_word_mask=True
  )
  spec = masking.MaskingSpec.from_config(d, t)
  ids = np.array([[t.cls_id] + t.encode("running runs the mill runs running") + [t.sep_id]] * 500)
  out = masking.mask_batch(ids, np.ones_like(ids), keyed_random.row_keys(0, 0, np.arange(500)), spec)
  cont = ~t.word_start_mask()[ids]
  masked = np.zeros(ids.shape, bool)
  w = out["masked_weights"] > 0
  masked[np.nonzero(w)[0], out["masked_positions"][w]] = True
  # a ## piece is masked exactly when the piece before it is
  assert np.array_equal(masked[:, 1:][cont[:, 1:]], masked[:, :-1][cont[:, 1:]])
  assert masked[:, 1:][cont[:, 1:]].any()


def test_tokenizer_missing_special_tokens(tmp_path):
  write_vocab(tmp_path / "vocab.txt", [w for w in VOCAB if w != "[MASK]"])
  with pytest.raises(BertjaxError, match=r"lacks the special tokens \[MASK\]"):
    tok_lib.load_tokenizer(tmp_path)
  with pytest.raises(BertjaxError, match="does not exist"):
    tok_lib.load_tokenizer(tmp_path / "nope")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(BertjaxError, match="not a sentencepiece model"):
    tok_lib.load_tokenizer(tmp_path / "junk.model")


def test_tokenizer_for_run_trains_once(corpus_dir, cache_dir, tmp_path):
  config = data_config(f"files:{corpus_dir}/*.txt", cache_dir)
  first = tok_lib.tokenizer_for_run(config, tmp_path)
  assert (tmp_path / "tokenizer" / "spm.model").exists()
  assert tok_lib.tokenizer_for_run(config, tmp_path).fingerprint == first.fingerprint


def test_preview_and_bench(corpus_dir, cache_dir, micro_tokenizer, tmp_path, capsys):
  from bertjax.data import bench, preview

  config = data_config(f"files:{corpus_dir}/*.txt", cache_dir)
  micro_tokenizer.save(tmp_path / "work" / "tokenizer")
  preview.preview(config, tmp_path / "work", 3, tmp_path / "p.npz")
  arrays = np.load(tmp_path / "p.npz")
  assert set(arrays.files) == {
    "input_ids",
    "segment_ids",
    "attention_mask",
    "masked_positions",
    "masked_ids",
    "masked_weights",
    "nsp_labels",
  }
  assert arrays["input_ids"].shape == (24, 32)
  printed = capsys.readouterr().out
  assert "[CLS]" in printed and "[MASK=" in printed
  result = bench.run(config, tmp_path / "work", seconds=0.3)
  assert result["pipeline_tokens_per_s"] > 0 and result["tokenize_tokens_per_s"] > 0


def test_bad_data_values_are_refused_by_the_config_validation(corpus_dir, cache_dir):
  from bertjax.config.validation import validate

  for key, value, match in (("seq_len", 4, "data.seq_len"), ("mask_prob", 0.0, "data.mask_prob")):
    with pytest.raises(BertjaxError, match=match):
      validate(data_config(f"files:{corpus_dir}/*.txt", cache_dir, **{key: value}))
