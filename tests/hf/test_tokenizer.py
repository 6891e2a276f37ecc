"""Exported tokenizers give transformers' AutoTokenizer bertjax's ids; imported ones round-trip.

Tokenizers are trained here on the builtin corpus (no network); the "page" is real English prose.
"""

import json

import pytest

from bertjax.config import loading as config_lib
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.data.corpus import load_corpus
from bertjax.hf import tokenizer as hf_tokenizer
from tests.support.extras import require

transformers = require("transformers")

PAGE_SENTENCES = 60


@pytest.fixture(scope="module")
def builtin_sentences():
  config = config_lib.load_config("configs/tiny.py", ["data.source=builtin"])
  return [s for doc in load_corpus(config).documents() for s in doc]


def _export_to(tokenizer, folder):
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))  # as an hf export has
  hf_tokenizer.save_for_transformers(tokenizer, folder, model_max_length=512)
  return transformers.AutoTokenizer.from_pretrained(str(folder))


def _check_parity(tokenizer, auto, sentences):
  page = sentences[:PAGE_SENTENCES]
  got = auto(page)["input_ids"]
  want = [[tokenizer.cls_id, *ids, tokenizer.sep_id] for ids in tokenizer.encode_batch(page)]
  assert got == want
  whole_page = "\n".join(page)  # one text with newlines: the normalisers must agree on those too
  assert auto(whole_page)["input_ids"] == [tokenizer.cls_id, *tokenizer.encode(whole_page), tokenizer.sep_id]
  pair = auto(page[0], page[1])
  a, b = tokenizer.encode(page[0]), tokenizer.encode(page[1])
  assert pair["input_ids"] == [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
  assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
  assert (auto.pad_token_id, auto.unk_token_id, auto.cls_token_id, auto.sep_token_id, auto.mask_token_id) == tuple(
    tokenizer.special_ids.tolist()
  )


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_export_gives_autotokenizer_the_same_ids(tmp_path, builtin_sentences, model_type):
  config = config_lib.load_config(
    "configs/tiny.py",
    [
      "data.source=builtin",
      "data.vocab_size=1000",
      f"data.tokenizer_model={model_type}",
      "data.tokenizer_sentences=2000",
    ],
  )
  tokenizer = tokenizer_lib.train_tokenizer(config, tmp_path / "spm")
  auto = _export_to(tokenizer, tmp_path / "export")
  _check_parity(tokenizer, auto, builtin_sentences)
  # Over the whole builtin corpus. Unigram segmentations of equal score (runs of one repeated
  # character, as in ASCII tables) may break ties differently in sentencepiece and tokenizers.
  sentences = builtin_sentences[:3000]
  want = tokenizer.encode_batch(sentences)
  got = auto(sentences, add_special_tokens=False)["input_ids"]
  agree = sum(g == w for g, w in zip(got, want)) / len(sentences)
  print(f"\n{model_type}: AutoTokenizer ids equal bertjax's on {agree:.2%} of {len(sentences)} sentences")
  assert agree >= 0.995
  # Importing the export gives back the same tokenizer (spm.model rides along): same fingerprint.
  assert hf_tokenizer.load_from_transformers(tmp_path / "export").fingerprint == tokenizer.fingerprint


def _vocab_txt(sentences, size=600):
  words = sorted({w.strip('.,:;"()').lower() for s in sentences[:400] for w in s.split()} - {""})
  specials = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  pieces = (
    specials + list('abcdefghijklmnopqrstuvwxyz0123456789.,:;"()') + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
  )
  return pieces + [w for w in words if w not in pieces][: size - len(pieces)]


def test_wordpiece_export_gives_bert_tokenizer_the_same_ids(tmp_path, builtin_sentences):
  (tmp_path / "vocab").mkdir()
  (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(_vocab_txt(builtin_sentences)) + "\n")
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "vocab" / "vocab.txt")
  assert tokenizer.cls_id == 4  # not bertjax's own 2: the ids come from the vocabulary
  auto = _export_to(tokenizer, tmp_path / "export")
  assert type(auto).__name__ == "BertTokenizer"
  assert (tmp_path / "export" / "vocab.txt").read_text() == (tmp_path / "vocab" / "vocab.txt").read_text()
  _check_parity(tokenizer, auto, builtin_sentences)
  back = hf_tokenizer.load_from_transformers(tmp_path / "export")
  assert back.encode_batch(builtin_sentences[:200]) == tokenizer.encode_batch(builtin_sentences[:200])


def test_vocab_txt_import_follows_do_lower_case(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nHello\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  assert hf_tokenizer.load_from_transformers(tmp_path).encode("Hello hello") == [6, 5]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  assert hf_tokenizer.load_from_transformers(tmp_path).encode("Hello hello") == [5, 5]
