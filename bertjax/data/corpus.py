"""Corpora: where documents (lists of sentences) come from, selected by `data.source`.

    builtin          English that ships with CPython: pydoc_data's documentation topics and the
                     docstrings of the standard library (parsed with `ast`, never imported);
                     one document per topic or module, at least two sentences each.
    files:GLOB       local (or epath) files: .txt in google-research/bert's format (one sentence
                     per line, blank line between documents), .jsonl or .parquet with a text column
                     (one document per row).
    hf:NAME[:CONFIG] a Hugging Face hub dataset (split `data.hf_split`), streamed if data.streaming.
    disk:DIR         a dataset written by `datasets.Dataset.save_to_disk`.
    prepared:DIR     a corpus `bertjax data prepare` tokenised into shards (local or gs://): training
                     reads its tokens (`prepared.py`); its fingerprint is the one it was prepared from.

A `Corpus` streams documents; nothing holds the raw text in memory. Its fingerprint keys the
tokenised cache. Sentence splitting rules are in `sentences.py`.
"""

import ast
import collections
import glob as globlib
import hashlib
import io
import json
import logging
import os
import sys
import sysconfig

from etils import epath

from bertjax.data import sentences as sentence_rules
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_BUILTIN_VERSION = "builtin-v1"  # bump when the extraction rules change: the fingerprint follows


def parse_source(source: str) -> tuple[str, str]:
  """`data.source` as (kind, argument): builtin, files:GLOB, hf:NAME[:CONFIG], disk:DIR or prepared:DIR."""
  kind, _, arg = source.partition(":")
  if not ((kind == "builtin" and not arg) or (kind in ("files", "hf", "disk", "prepared") and arg)):
    raise BertjaxError(
      f"config data.source={source!r} is not understood; use builtin, files:GLOB, hf:NAME[:CONFIG], disk:DIR "
      "or prepared:DIR"
    )
  return kind, arg


class Corpus:
  """Documents of sentences from one source; iterate `documents()` as often as needed."""

  def __init__(
    self,
    source: str,
    text_column: str = "text",
    max_sentence_chars: int = 10_000,
    streaming: bool = False,
    hf_split: str = "train",
  ):
    self.source = source
    self.text_column = text_column
    self.max_sentence_chars = max_sentence_chars
    self.streaming = streaming
    self.hf_split = hf_split
    self.warnings: collections.Counter = collections.Counter()  # what was repaired, and how often
    kind, arg = parse_source(source)
    self.kind = kind
    self._arg = arg
    self._files = _expand_glob(arg) if kind == "files" else []
    self.fingerprint = self._fingerprint()

  def __repr__(self):
    return f"Corpus({self.source!r}, fingerprint={self.fingerprint})"

  @property
  def files(self) -> list[str]:
    """A files: corpus's files, in reading order (sorted); [] for other sources."""
    return list(self._files)

  # -- fingerprint --------------------------------------------------------------------------
  def _fingerprint(self) -> str:
    if self.kind == "prepared":  # the corpus it was prepared from: the same documents, in the same order
      from bertjax.data import prepared

      return prepared.read_manifest(self._arg)["corpus"]
    h = hashlib.sha256()
    h.update(json.dumps([self.source, self.text_column, self.max_sentence_chars, sentence_rules.VERSION]).encode())
    if self.kind == "builtin":
      # The builtin text changes with the Python version: hash what is actually read.
      h.update(_BUILTIN_VERSION.encode() + sys.version.encode())
      for path in _stdlib_sources():
        h.update(path.encode())
        with open(path, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
      h.update(json.dumps(_pydoc_topics(), sort_keys=True).encode())
    elif self.kind == "files":
      for path in self._files:
        st = epath.Path(path).stat()
        h.update(json.dumps([path, st.length, st.mtime]).encode())
    elif self.kind == "disk":
      h.update(self._load_hf_dataset()._fingerprint.encode())
    else:
      h.update(self.hf_split.encode())
    return h.hexdigest()[:16]

  # -- documents ----------------------------------------------------------------------------
  def documents(self):
    """Yields each document as a list of sentences (str), in a fixed order."""
    if self.kind == "builtin":
      yield from _builtin_documents(self)
    elif self.kind == "files":
      for path in self._files:
        yield from self._file_documents(path)
    elif self.kind == "prepared":
      from bertjax.data import prepared

      yield from prepared.decoded_documents(self._arg)
    else:
      for row in self._load_hf_dataset():
        doc = self.split_document(row[self.text_column])
        if doc:
          yield doc

  def split_document(self, text) -> list[str]:
    """A document's text (paragraphs separated by newlines) as a list of sentences."""
    if not isinstance(text, str):
      self.warnings["non-text rows skipped"] += 1
      return []
    out = []
    for line in text.split("\n"):
      out.extend(self._sentences(line))
    return out

  def _sentences(self, line: str) -> list[str]:
    pieces = sentence_rules.split_sentences(line)
    if any(len(p) > self.max_sentence_chars for p in pieces):
      self.warnings["over-long sentences cut"] += 1
      pieces = [c for p in pieces for c in sentence_rules.cut_long(p, self.max_sentence_chars)]
    return pieces

  def unit_documents(self, unit: dict):
    """The documents of one unit of the corpus (`bertjax data prepare` plans them, `prepare.plan_units`):
    a file's bytes [start, end) that begin and end at document boundaries, a whole file, rows
    [start, end) of an hf:/disk: dataset, or the whole corpus. Units laid end to end in the plan's
    order give `documents()`."""
    kind = unit["kind"]
    if kind == "bytes":
      yield from self._file_documents(unit["path"], unit["start"], unit["end"])
    elif kind == "file":
      yield from self._file_documents(unit["path"])
    elif kind == "rows":
      texts = self._load_hf_dataset()[unit["start"] : unit["end"]][self.text_column]
      for text in texts:
        doc = self.split_document(text)
        if doc:
          yield doc
    else:
      yield from self.documents()

  def _file_documents(self, path: str, start: int = 0, end: int | None = None):
    """A file's documents, or those of its bytes [start, end) (read whole) when both are document boundaries."""
    if path.endswith(".parquet"):
      yield from self._parquet_documents(path)
      return
    is_jsonl = path.endswith((".jsonl", ".json"))
    doc: list[str] = []
    with epath.Path(path).open("rb") as f:
      lines = f
      if end is not None:
        f.seek(start)
        lines = io.BytesIO(f.read(end - start))  # one read of the range; lines split as the file's are
      for lineno, raw in enumerate(lines, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          line = raw.decode("utf-8", errors="replace")
          self.warnings[f"lines with undecodable bytes (replaced by U+FFFD) in {path}"] += 1
        if is_jsonl:
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            where = f"{path}:{lineno}" if not start else f"{path} (line {lineno} from byte {start})"
            raise BertjaxError(f"{where} is not valid JSON ({e.msg}): fix or remove that line") from e
          if not isinstance(row, dict) or self.text_column not in row:
            where = f"{path}:{lineno}" if not start else f"{path} (line {lineno} from byte {start})"
            raise BertjaxError(
              f"{where} has no column {self.text_column!r}: set data.text_column to the column that holds the text"
            )
          doc = self.split_document(row[self.text_column])
          if doc:
            yield doc
        elif line.strip():
          doc.extend(self._sentences(line.strip()))
        elif doc:
          yield doc
          doc = []
    if doc and not is_jsonl:
      yield doc

  def _parquet_documents(self, path: str):
    import pyarrow.parquet as pq  # only parquet corpora need it

    with epath.Path(path).open("rb") as f:
      pf = pq.ParquetFile(f)
      if self.text_column not in pf.schema_arrow.names:
        raise BertjaxError(
          f"{path} has no column {self.text_column!r} (it has {', '.join(pf.schema_arrow.names)}): set data.text_column"
        )
      for batch in pf.iter_batches(columns=[self.text_column], batch_size=1024):
        for text in batch.column(0).to_pylist():
          doc = self.split_document(text)
          if doc:
            yield doc

  # -- datasets -----------------------------------------------------------------------------
  def _load_hf_dataset(self):
    import datasets  # heavy: only hub and disk corpora need it here

    if self.kind == "disk":
      if not epath.Path(self._arg).exists():
        raise BertjaxError(
          f"data.source={self.source!r}: {self._arg} does not exist; give a folder written by save_to_disk"
        )
      try:
        ds = datasets.load_from_disk(self._arg)
      except FileNotFoundError as e:
        raise BertjaxError(
          f"data.source={self.source!r} is not a saved dataset ({e}): give a folder written by save_to_disk"
        ) from e
      if isinstance(ds, datasets.DatasetDict):
        if self.hf_split not in ds:
          raise BertjaxError(
            f"data.source={self.source!r} has no split {self.hf_split!r} (it has {', '.join(ds)}): set data.hf_split"
          )
        ds = ds[self.hf_split]
    else:
      name, _, conf = self._arg.partition(":")
      try:
        ds = datasets.load_dataset(name, conf or None, split=self.hf_split, streaming=self.streaming)
      except Exception as e:  # the hub raises many kinds; all mean "cannot get this dataset"
        raise BertjaxError(
          f"data.source={self.source!r} could not be loaded "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
          "check the name, config and network (HF_HUB_OFFLINE)"
        ) from e
    names = ds.column_names or []
    if names and self.text_column not in names:
      raise BertjaxError(
        f"data.source={self.source!r} has no column {self.text_column!r} (it "
        f"has {', '.join(names)}): set data.text_column"
      )
    return ds


def load_corpus(config) -> Corpus:
  """The corpus `config.data.source` names."""
  d = config.data
  return Corpus(
    d.source,
    text_column=d.text_column,
    max_sentence_chars=d.max_sentence_chars,
    streaming=d.streaming,
    hf_split=d.hf_split,
  )


def corpus_stats(corpus: Corpus, tokenizer=None) -> dict:
  """Size in documents, sentences, characters (and tokens, given a tokenizer); one full pass."""
  docs = sents = chars = tokens = 0
  for doc in corpus.documents():
    docs += 1
    sents += len(doc)
    chars += sum(map(len, doc))
    if tokenizer is not None:
      tokens += sum(map(len, tokenizer.encode_batch(doc)))
  stats = {
    "source": corpus.source,
    "fingerprint": corpus.fingerprint,
    "documents": docs,
    "sentences": sents,
    "characters": chars,
  }
  if tokenizer is not None:
    stats["tokens"] = tokens
    stats["tokenizer"] = tokenizer.fingerprint
  return stats


def builtin_corpus_stats(tokenizer=None) -> dict:
  """The size report of the builtin corpus (documents, sentences, characters, tokens)."""
  return corpus_stats(Corpus("builtin"), tokenizer)


def _expand_glob(pattern: str) -> list[str]:
  if "://" in pattern:  # gs:// and friends: let epath glob below the first wildcard
    head, _, rest = pattern.partition("*")
    root = epath.Path(head.rsplit("/", 1)[0])
    files = sorted(str(p) for p in root.glob(pattern[len(str(root)) + 1 :]))
  else:
    files = sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
  files = [f for f in files if not epath.Path(f).is_dir()]
  if not files:
    raise BertjaxError(
      f"data.source=files:{pattern} matches no files: check the path (quote the glob, use ** for subfolders)"
    )
  return files


# -- the builtin corpus ---------------------------------------------------------------------
def _pydoc_topics() -> dict:
  from pydoc_data import topics  # a data module: a dict of documentation pages

  return topics.topics


def _stdlib_sources() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_"))
  return out


def _module_docstrings(path: str) -> list[str]:
  """The docstrings of a module, its classes and functions in source order; never imports it."""
  with open(path, "rb") as f:
    source = f.read()
  try:
    tree = ast.parse(source, filename=path)
  except (SyntaxError, ValueError):  # a few stdlib files are templates or other Pythons' syntax
    return []
  nodes = [
    n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
  ]
  nodes.sort(key=lambda n: getattr(n, "lineno", 0))
  return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _builtin_documents(corpus: Corpus):
  texts = [text for _, text in sorted(_pydoc_topics().items())]
  texts += ["\n\n".join(_module_docstrings(p)) for p in _stdlib_sources()]
  for text in texts:
    doc = []
    for paragraph in sentence_rules.prose_paragraphs(text):
      doc.extend(corpus._sentences(paragraph))
    if len(doc) >= 2:  # a one-sentence document gives NSP nothing but random pairs
      yield doc
