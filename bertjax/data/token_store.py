"""The tokenised corpus, built once and memory-mapped: flat tokens plus sentence and document offsets.

    CACHE/tokenized/<corpus fingerprint>-<tokenizer fingerprint>/
      tokens.bin        uint16 (vocab < 65536) or int32, every sentence's tokens back to back
      sent_start.bin    int64 [S+1]: first token of each sentence
      doc_start.bin     int64 [D+1]: first sentence of each document
      meta.json         counts, dtypes, fingerprints, repair counts

Tokenisation is one `datasets.map(batched=True, num_proc=...)` over documents that the corpus
streams into an Arrow file on disk; the result is appended chunk by chunk to the flat files, so a
corpus larger than RAM works. The folder is built under a temporary name and renamed when complete
(`bertjax.atomic`). The processes of one host build it once: one holds an flock on
`<key>.lock` beside the folder and builds, the others wait for the lock and open what it built.

A corpus of `data.source=prepared:DIR` is not tokenised here: `open_token_store` returns the
prepared shards as one store with the same interface (`prepared.open_prepared`).
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys

import numpy as np
from etils import epath

from bertjax import atomic
from bertjax.data import prepared
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)
FORMAT = "token-store-v1"


class TokenStore:
  """Read-only, memory-mapped view of one tokenised corpus."""

  def __init__(self, directory):
    self.directory = str(directory)
    self.meta = json.loads((epath.Path(directory) / "meta.json").read_text())
    m = self.meta
    self.tokens = _map(directory, "tokens.bin", m["token_dtype"], m["tokens"])
    self.sent_start = _map(directory, "sent_start.bin", "int64", m["sentences"] + 1)
    self.doc_start = _map(directory, "doc_start.bin", "int64", m["documents"] + 1)

  @property
  def num_documents(self) -> int:
    return self.meta["documents"]


def _map(directory, name, dtype, count):
  if count == 0:
    return np.zeros(0, dtype)
  return np.memmap(os.path.join(directory, name), dtype=dtype, mode="r", shape=(count,))


def cache_root(data_config) -> epath.Path:
  """data.cache_dir, or the user's cache folder (tokenised corpora are shared between runs)."""
  if data_config.cache_dir:
    return epath.Path(data_config.cache_dir)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return epath.Path(base) / "bertjax"


def open_token_store(corpus, tokenizer, root, num_proc: int = 0):
  """The cached tokenisation of `corpus` by `tokenizer`, built on first use (a prepared corpus: its shards).

  Args:
    corpus: the corpus; its fingerprint and the tokenizer's name the cache folder.
    tokenizer: the run's tokenizer.
    root: the cache root (`cache_root`); the store is ROOT/tokenized/<fingerprints>.
    num_proc: tokenising processes; 0 is one per CPU.
  Returns:
    A `TokenStore`, or for `prepared:DIR` a `prepared.PreparedStore` (the same interface).
  Raises:
    BertjaxError: `root` is remote (memory-mapping needs local disk), or a prepared DIR is missing,
      unfinished, damaged or made with another tokenizer.
  """
  root = epath.Path(root)
  if "://" in str(root):
    raise BertjaxError(
      f"data.cache_dir={root} is remote: memory-mapped token arrays need a "
      "local folder; set data.cache_dir to local disk"
    )
  if corpus.kind == "prepared":
    return prepared.open_prepared(corpus.source.partition(":")[2], tokenizer, root, host_lock)
  key = f"{corpus.fingerprint}-{tokenizer.fingerprint}"
  final = root / "tokenized" / key
  if not (final / "meta.json").exists():
    with host_lock(final):  # one process of this host builds; the others wait for it, then open it
      if not (final / "meta.json").exists():
        # Hosts sharing a cache folder may still build it at once: the copies are identical, the first stays.
        with atomic.staged_folder(final, replace=False) as staging:
          _build(corpus, tokenizer, staging, num_proc or os.cpu_count() or 1)
  return TokenStore(final)


@contextlib.contextmanager
def host_lock(folder):
  """Holds an exclusive flock on FOLDER.lock (beside `folder`, on local disk) while the block runs.

  The processes of one host that need the same cache folder take turns: the first builds it, the
  others find it built. The lock file stays (removing it would race with a waiting process).
  """
  folder = epath.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  with open(folder.parent / f"{folder.name}.lock", "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.info("another process of this host is building %s: waiting for it", folder)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _TokenizeDocuments:
  """The `datasets.map` function: documents in, per-document flat ids and sentence lengths out.

  A class (not a closure) so it pickles into worker processes with the tokenizer's model bytes.
  Empty sentences and documents are dropped here.
  """

  def __init__(self, tokenizer, corpus, column):
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.column = column

  def __call__(self, batch):
    ids_out, lengths_out = [], []
    for item in batch[self.column]:
      doc = item if self.column == "sentences" else self.corpus.split_document(item)
      encoded = [e for e in self.tokenizer.encode_batch(doc) if e] if doc else []
      if encoded:
        ids_out.append([t for e in encoded for t in e])
        lengths_out.append([len(e) for e in encoded])
    return {"ids": ids_out, "lengths": lengths_out}


def _generate_documents(corpus):
  for doc in corpus.documents():
    yield {"sentences": doc}


def _build(corpus, tokenizer, tmp: epath.Path, num_proc: int):
  hf_cache = str(tmp / "hf")
  tokenized = _tokenized(corpus, tokenizer, hf_cache, num_proc)
  dtype = prepared.token_dtype(tokenizer.vocab_size)
  n_tokens, n_sents, n_docs = _write_arrays(tokenized, tmp, dtype)
  shutil.rmtree(hf_cache, ignore_errors=True)
  if n_docs == 0:
    raise BertjaxError(f"corpus {corpus.source} is empty after tokenisation: point data.source at some text")
  warnings = dict(corpus.warnings)
  for what, count in warnings.items():
    log.warning("corpus %s: %d %s", corpus.source, count, what)
  meta = {
    "format": FORMAT,
    "corpus": corpus.fingerprint,
    "source": corpus.source,
    "tokenizer": tokenizer.fingerprint,
    "token_dtype": np.dtype(dtype).name,
    "tokens": n_tokens,
    "sentences": n_sents,
    "documents": n_docs,
    "warnings": warnings,
  }
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _tokenized(corpus, tokenizer, hf_cache: str, num_proc: int):
  """The corpus's documents tokenised by `datasets` (in `num_proc` processes when worth it)."""
  import datasets  # heavy; only a cache miss needs it

  if corpus.kind in ("builtin", "files"):
    if next(iter(corpus.documents()), None) is None:  # datasets refuses an empty generator
      raise BertjaxError(f"corpus {corpus.source} is empty: point data.source at some text")
    corpus.warnings.clear()  # the peek must not count its document's repairs twice
    docs = datasets.Dataset.from_generator(
      _generate_documents,
      gen_kwargs={"corpus": corpus},
      cache_dir=hf_cache,
      fingerprint=f"docs-{corpus.fingerprint}",
      features=datasets.Features({"sentences": datasets.Sequence(datasets.Value("string"))}),
    )
    column = "sentences"
  else:
    docs = corpus._load_hf_dataset()
    column = corpus.text_column
  if len(docs) == 0:
    raise BertjaxError(f"corpus {corpus.source} is empty: point data.source at some text")
  num_proc = max(1, min(num_proc, len(docs) // 64))  # tiny corpora are not worth the processes
  if num_proc > 1 and _jax_started():
    log.info("tokenising in this process: JAX runs threads here, which forked workers could deadlock on")
    num_proc = 1
  features = datasets.Features(
    {"ids": datasets.Sequence(datasets.Value("int32")), "lengths": datasets.Sequence(datasets.Value("int32"))}
  )
  return docs.map(
    _TokenizeDocuments(tokenizer, corpus, column),
    batched=True,
    batch_size=64,
    num_proc=num_proc if num_proc > 1 else None,
    remove_columns=docs.column_names,
    features=features,
    cache_file_name=os.path.join(hf_cache, "tokens.arrow"),
    new_fingerprint=f"tok-{corpus.fingerprint}-{tokenizer.fingerprint}",
    desc="tokenising",
  )


def _jax_started() -> bool:
  """Whether JAX has started its runtime (and its threads) in this process, read without importing
  JAX: `datasets` forks its workers, which is safe only before then (the CLI tokenises first)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started and started())


def _write_arrays(tokenized, tmp: epath.Path, dtype) -> tuple[int, int, int]:
  """tokens.bin, sent_start.bin and doc_start.bin from the tokenised table: (tokens, sentences, documents)."""
  n_tokens = n_sents = n_docs = 0
  with (
    open(tmp / "tokens.bin", "wb") as f_tok,
    open(tmp / "sent_start.bin", "wb") as f_sent,
    open(tmp / "doc_start.bin", "wb") as f_doc,
  ):
    f_sent.write(np.zeros(1, np.int64).tobytes())
    f_doc.write(np.zeros(1, np.int64).tobytes())
    for record_batch in tokenized.data.table.to_batches(max_chunksize=4096):
      ids = record_batch.column("ids").flatten().to_numpy()
      lengths_col = record_batch.column("lengths")
      lengths = lengths_col.flatten().to_numpy().astype(np.int64)
      per_doc = np.diff(lengths_col.offsets.to_numpy()).astype(np.int64)
      f_tok.write(ids.astype(dtype).tobytes())
      f_sent.write((n_tokens + np.cumsum(lengths)).tobytes())
      f_doc.write((n_sents + np.cumsum(per_doc)).tobytes())
      n_tokens += len(ids)
      n_sents += len(lengths)
      n_docs += len(per_doc)
  return n_tokens, n_sents, n_docs
