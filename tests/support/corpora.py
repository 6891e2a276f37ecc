"""A small English corpus for the input-pipeline tests, its tokenizer, and pipelines over it."""

import numpy as np
import pytest

from bertjax.config.defaults import get_config
from bertjax.data.base import make_examples

_WORDS = """the river runs past an old mill where children play and fishermen talk about
weather boats markets songs bread stone bridges gardens lanterns quiet mornings evening bells
people walk slowly through narrow streets carrying baskets of apples pears onions and flowers
merchants count coins while teachers explain numbers letters maps stars seasons""".split()


_SYLLABLES = "ka lo mi ren tas vel or un pe sil dra con fe bi mor ta zu gan hel ost".split()


def _lexicon(rng) -> list[str]:
  """English words plus made-up ones of 1-3 syllables: enough variety for 256 pieces, and words
  that split into several pieces (whole-word masking needs them)."""
  made_up = {"".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(400)}
  return _WORDS + sorted(made_up)


def numbered_documents(n_docs: int = 60, seed: int = 0) -> list[list[str]]:
  """Documents of plain sentences; sentence k of document d begins 'Doc d line k'."""
  rng = np.random.default_rng(seed)
  lexicon = _lexicon(rng)
  docs = []
  for d in range(n_docs):
    sentences = []
    for k in range(int(rng.integers(1 if d % 17 == 5 else 3, 12))):
      words = rng.choice(lexicon, size=int(rng.integers(4, 14)))
      sentences.append(f"Doc {d} line {k} says {' '.join(words)}.")
    docs.append(sentences)
  return docs


def write_bert_text(path, docs) -> None:
  """google-research/bert's format: one sentence per line, a blank line between documents."""
  path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n")


def data_config(source: str, cache_dir, **data):
  """The test micro config's data shape: seq 32, vocab 256, 5 predictions, batch 8."""
  c = get_config()
  c.data.source = source
  c.data.seq_len = 32
  c.data.max_predictions = 5
  c.data.vocab_size = 256
  c.data.cache_dir = str(cache_dir)
  c.data.num_proc = 1
  c.data.tokenizer_sentences = 5000
  c.data.eval_fraction = 0.1
  c.train.batch_size = 8
  c.train.eval_batches = 2
  for key, value in data.items():
    if key.startswith("train_"):
      c.train[key[len("train_") :]] = value
    else:
      c.data[key] = value
  return c


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  docs = numbered_documents()
  write_bert_text(root / "part-0.txt", docs[:30])
  write_bert_text(root / "part-1.txt", docs[30:])
  return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def micro_tokenizer(corpus_dir, cache_dir, tmp_path_factory):
  from bertjax.data.tokenizer import train_tokenizer

  config = data_config(f"files:{corpus_dir}/*.txt", cache_dir)
  return train_tokenizer(config, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def make_pipeline(corpus_dir, cache_dir, micro_tokenizer):
  """Builds a micro pipeline over the session corpus (the tokenised cache is shared)."""
  from bertjax.data.cached import CachedPipeline

  def make(**data):
    return CachedPipeline(data_config(f"files:{corpus_dir}/*.txt", cache_dir, **data), micro_tokenizer)

  return make


def streaming_config(source: str, cache_dir, window_documents: int = 16, eval_documents: int = 6, **data):
  """The micro config read as a stream: windows of 16 documents, the first 6 held out."""
  c = data_config(source, cache_dir, streaming=True, **data)
  c.data.streaming_window_documents = window_documents
  c.data.streaming_eval_documents = eval_documents
  return c


def write_jsonl_hub(folder, docs, column: str = "text") -> None:
  """A local dataset folder for `hf:FOLDER` (datasets' json builder): one document per line."""
  import json

  folder.mkdir(parents=True, exist_ok=True)
  (folder / "train.jsonl").write_text("".join(json.dumps({column: "\n".join(doc)}) + "\n" for doc in docs))


@pytest.fixture(scope="session")
def make_streaming(corpus_dir, cache_dir, micro_tokenizer, tmp_path_factory):
  """Builds a streaming micro pipeline over the session corpus: `files:` (the .txt parts) or
  `hf:` (the same documents as a local jsonl dataset folder, read with streaming=True)."""
  from bertjax.data.pipeline import make_pipeline

  hub = tmp_path_factory.mktemp("hub")
  write_jsonl_hub(hub, numbered_documents())

  def make(source: str = "files", **data):
    path = f"files:{corpus_dir}/*.txt" if source == "files" else f"hf:{hub}"
    return make_pipeline(streaming_config(path, cache_dir, **data), micro_tokenizer)

  return make


def examples_of(pipeline, pair_index, keys) -> dict[str, np.ndarray]:
  """The rows a cached pipeline makes of these pairs with these mask keys, one pair a row."""
  p = pipeline
  return make_examples(p.store.tokens, pair_index, keys, p.seq_len, p.tokenizer, p.masking)
