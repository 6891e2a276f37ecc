"""Reading a corpus as a stream of records, and tokenising them, for the streaming pipeline.

`DocumentStream` is one pass over the corpus's documents from a resumable locator;
`RecordTokeniser` splits and tokenises a window's records, in spawned worker processes when
`data.num_proc` allows (spawn, not fork: the parent runs JAX's threads).
"""

import collections
import itertools
import os
import threading

import numpy as np

from bertjax.errors import BertjaxError

_MAX_WORKERS = 8  # default cap on tokenising processes (each holds the tokenizer)


class DocumentStream:
  """One pass over the corpus's documents from a locator, with a resumable position.

  A document is a record of the stream: a row's text for hf:/disk: sources (split into sentences
  later, with the tokenisation, so in parallel when data.num_proc allows; a row whose text holds
  no sentence still counts), a list of sentences for files: and builtin.
  """

  def __init__(self, corpus, locator: dict):
    self.corpus = corpus
    self.docs = 0
    self.exhausted = False
    self._ds = None
    if corpus.kind in ("hf", "disk"):
      import datasets  # only these sources need it

      ds = corpus._load_hf_dataset()
      if not isinstance(ds, datasets.IterableDataset):
        ds = ds.to_iterable_dataset()  # disk: (and hf: without streaming) read as a stream too
      if locator.get("stream") is not None:
        ds.load_state_dict(locator["stream"])
        self.docs = int(locator["docs"])
      self._ds = ds
      self._it = self._rows(ds)
    else:
      self._it = corpus.documents()
    skip = int(locator["docs"]) - self.docs
    if skip and len(self.take(skip)) < skip:
      raise BertjaxError(
        f"corpus {corpus.source} ended before document {locator['docs']}: "
        "the stream changed since the checkpoint; resume with the same data"
      )

  def _rows(self, ds):
    column = self.corpus.text_column
    for row in ds:
      if column not in row:
        raise BertjaxError(
          f"data.source={self.corpus.source!r} has no column {column!r} (it has {', '.join(row)}): set data.text_column"
        )
      yield row[column]  # split into sentences with the tokenisation, maybe in a worker

  def position(self) -> dict:
    """The locator of the next document (the stream's state is exact for hf:/disk: sources)."""
    return {"docs": self.docs, "stream": self._ds.state_dict() if self._ds is not None else None}

  def take(self, n: int) -> list:
    out = list(itertools.islice(self._it, n))
    self.docs += len(out)
    self.exhausted = len(out) < n
    return out


class RecordTokeniser:
  """Flat tokens and offsets of stream records, split over worker processes spawned on first use."""

  def __init__(self, corpus, tokenizer, num_proc: int):
    self.corpus = corpus
    self.tokenizer = tokenizer
    # 0 = one per core, at most _MAX_WORKERS; 1 = in this process.
    self._num_proc = num_proc or min(os.cpu_count() or 1, _MAX_WORKERS)
    self._pool = None
    self._pool_lock = threading.Lock()

  def tokenise(self, docs):
    """Flat tokens and sentence/document offsets of stream records (empty sentences and
    documents dropped); split across `data.num_proc` worker processes, in order."""
    workers = self._workers()
    if workers is None or len(docs) < 2:
      parts = [tokenise_documents(self.corpus, self.tokenizer, docs)]
    else:
      cuts = np.linspace(0, len(docs), min(len(docs), 4 * self._num_proc) + 1).astype(int)
      parts = list(workers.map(_worker_tokenise, [docs[a:b] for a, b in zip(cuts, cuts[1:])]))
    for part in parts:
      self.corpus.warnings.update(part[3])
    tokens = np.concatenate([part[0] for part in parts])
    lengths = np.concatenate([part[1] for part in parts])
    per_doc = np.concatenate([part[2] for part in parts])
    sent_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    doc_start = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    return tokens, sent_start, doc_start

  def _workers(self):
    """The worker processes (spawned once, on first use), or None for data.num_proc=1."""
    if self._num_proc <= 1:
      return None
    with self._pool_lock:
      if self._pool is None:
        import concurrent.futures
        import multiprocessing
        import weakref

        # spawn, not fork: the parent runs JAX's threads
        self._pool = concurrent.futures.ProcessPoolExecutor(
          self._num_proc,
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker,
          initargs=(self.corpus, self.tokenizer),
        )
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
      return self._pool


_WORKER: tuple = ()  # (corpus, tokenizer) in a worker process


def _init_worker(corpus, tokenizer):
  global _WORKER
  _WORKER = (corpus, tokenizer)


def _worker_tokenise(docs):
  corpus, tokenizer = _WORKER
  corpus.warnings.clear()  # the worker's copy: its repair counts go back to the parent's
  out = tokenise_documents(corpus, tokenizer, docs)
  return out[:3] + (collections.Counter(corpus.warnings),)


def tokenise_documents(corpus, tokenizer, docs):
  """Records -> (tokens int32, sentence lengths, sentences per document, repair counts to add),
  without empty sentences and documents. Text records are split into sentences here.

  Args:
    corpus: the corpus the records came from (its `split_document`).
    tokenizer: the run's tokenizer.
    docs: records, each a list of sentences or a document's text.
  Returns:
    (tokens [T], lengths int64 [S], per_doc [D], an empty Counter): the repairs are counted in
    `corpus.warnings` instead.
  """
  docs = [d if isinstance(d, list) else corpus.split_document(d) for d in docs]
  sentences = [s for doc in docs for s in doc]
  encoded = tokenizer.encode_batch(sentences) if sentences else []
  lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
  doc_of = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])[lengths > 0]
  per_doc = np.bincount(doc_of, minlength=len(docs))
  lengths = lengths[lengths > 0]
  tokens = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum()))
  return tokens, lengths, per_doc[per_doc > 0], collections.Counter()  # counted in `corpus`
