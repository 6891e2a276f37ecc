"""The format of a corpus `bertjax data prepare` tokenised once (`prepare.py` makes its shards), and its reader.

    DIR/manifest.json         written last, once every shard exists: the format, the corpus and tokenizer
                              fingerprints, the ordered shards with their counts, sizes and SHA-256
                              digests, the totals, the repairs (warnings), and the folder's fingerprint
    DIR/plan.json             the units the shards are made of (input files, byte ranges of them at
                              document boundaries, dataset rows), in corpus order; the tokenizer's fingerprint
    DIR/tokenizer/            the tokenizer the shards were made with (the run uses it)
    DIR/shards/NNNNNN/        shard N, from unit N of the plan: tokens.bin (uint16, or int32 for a vocabulary
                              over 65,536), sent_start.bin int64 [S+1] (its sentences' first tokens, from 0),
                              doc_start.bin int64 [D+1] (its documents' first sentences, from 0)
    DIR/shards/NNNNNN.json    written after the shard's files: its unit, counts, sizes, digests, repairs;
                              the shard is complete when this exists and the sizes match

Here: the folder's layout, what a complete shard is, the manifest from the shards' .json files (the
same bytes whoever writes it), and the reader. The shards laid end to end in plan order are the
corpus, the same documents in the same order as `Corpus.documents()` of the source, whatever number
of processes made them. Training reads them as one store with `TokenStore`'s interface
(`open_prepared`): the tokens of a local DIR are memory-mapped in place; those of a gs:// DIR are
copied shard by shard into the local cache first (a copy, not a tokenisation). The corpus-wide
sentence and document offsets are built once per host in the cache, keyed by the manifest's
fingerprint.
"""

import collections
import hashlib
import json
import logging
import os
import resource
import threading

import numpy as np
from etils import epath

from bertjax import atomic, storage
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)

FORMAT = "bertjax-prepared-v1"
MANIFEST, PLAN, TOKENIZER_DIR, SHARDS = "manifest.json", "plan.json", "tokenizer", "shards"
ARRAYS = ("tokens.bin", "sent_start.bin", "doc_start.bin")
# Memory maps held open at once (each holds a file descriptor): every shard of a corpus the size
# of Wikipedia + BookCorpus (about 300 at 64 MiB) when the descriptor limit allows, since a random
# batch touches most shards and a map closed and opened again costs fresh page faults.
_MAX_OPEN_SHARDS = max(128, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)


def shard_name(index: int) -> str:
  return f"{index:06d}"


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (the per-run cache's rule), else int32."""
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def again_command(directory, plan: dict | None = None) -> str:
  """The command that finishes DIR: the one recorded in its plan, else its shape."""
  if plan and plan.get("command"):
    return plan["command"]
  return f"bertjax data prepare --config FILE --out {directory}"


def read_manifest(directory) -> dict:
  """DIR/manifest.json, checked: the folder exists, is finished and has this format.

  Raises:
    BertjaxError: DIR is missing, unfinished (no manifest) or of another format.
  """
  root = epath.Path(directory)
  if not root.exists():
    raise BertjaxError(
      f"data.source=prepared:{directory}: no such folder; make it with bertjax data prepare --config FILE "
      f"--out {directory}, or fix the path"
    )
  path = root / MANIFEST
  if not path.exists():
    plan = json.loads((root / PLAN).read_text()) if (root / PLAN).exists() else None
    raise BertjaxError(
      f"prepared:{directory} is unfinished (no {MANIFEST}): run {again_command(directory, plan)} again to finish it"
    )
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise BertjaxError(
      f"prepared:{directory} has format {manifest.get('format')!r}, not {FORMAT!r}: prepare the corpus again "
      "into a new folder with this bertjax"
    )
  return manifest


# -- writing: what a complete shard is, and the manifest of the shards (`prepare.py` makes them) --
def shard_complete(out: epath.Path, index: int) -> bool:
  """Shard `index` exists whole: its .json, and files of the sizes it lists."""
  marker = out / SHARDS / f"{shard_name(index)}.json"
  if not marker.exists():
    return False
  sizes = json.loads(marker.read_text())["bytes"]
  folder = out / SHARDS / shard_name(index)
  return all((folder / n).exists() and (folder / n).stat().length == sizes[n] for n in ARRAYS)


def missing_shards(out: epath.Path, count: int) -> list[int]:
  """The shards of 0..count-1 whose .json DIR lacks (one listing)."""
  folder = out / SHARDS
  have = {p.name for p in folder.glob("*.json")} if folder.exists() else set()
  return [k for k in range(count) if f"{shard_name(k)}.json" not in have]


def write_manifest(out: epath.Path, plan: dict) -> dict:
  """DIR/manifest.json from the shards' .json files: the same bytes whoever writes it.

  Raises:
    BertjaxError: the corpus holds no document.
  """
  shards = [json.loads((out / SHARDS / f"{shard_name(k)}.json").read_text()) for k in range(len(plan["units"]))]
  warnings = collections.Counter()
  for shard in shards:
    warnings.update(shard["warnings"])
  totals = {what: sum(s[what] for s in shards) for what in ("documents", "sentences", "tokens")}
  if totals["documents"] == 0:
    raise BertjaxError(f"corpus {plan['source']} is empty after tokenisation: point data.source at some text")
  digest = json.dumps([FORMAT, plan["corpus"], plan["tokenizer"], [s["sha256"] for s in shards]])
  manifest = {
    "format": FORMAT,
    "fingerprint": hashlib.sha256(digest.encode()).hexdigest()[:16],
    "source": plan["source"],
    "corpus": plan["corpus"],
    "tokenizer": plan["tokenizer"],
    "token_dtype": plan["token_dtype"],
    "shard_bytes": plan["shard_bytes"],
    **totals,
    "bytes": sum(sum(s["bytes"].values()) for s in shards),
    "warnings": dict(sorted(warnings.items())),
    "shards": shards,
  }
  text = json.dumps(manifest, indent=1) + "\n"
  path = out / MANIFEST
  if not path.exists() or path.read_text() != text:
    atomic.write_text(path, text)
    for what, count in manifest["warnings"].items():
      log.warning("corpus %s: %d %s", plan["source"], count, what)
  return manifest


# -- reading ---------------------------------------------------------------------------------
class ShardedTokens:
  """The tokens of every shard as one read-only flat array: `tokens[idx]` gathers global positions.

  Supports what the pipelines do with a token array: `len`, `dtype`, `shape` and numpy indexing by
  an integer, a slice or an integer array (any shape). The shards' memory maps are opened when
  first read, at most `_MAX_OPEN_SHARDS` at once (least recently used closed first).
  """

  def __init__(self, paths, counts, dtype):
    self._paths = [str(p) for p in paths]
    self._counts = np.asarray(counts, np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
    self.dtype = np.dtype(dtype)
    self.shape = (int(self._starts[-1]),)
    self.ndim = 1
    self._open: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()
    self._lock = threading.Lock()  # the prefetching thread and the caller both read

  def __len__(self) -> int:
    return self.shape[0]

  def _shard(self, k: int) -> np.memmap:
    with self._lock:
      if k in self._open:
        self._open.move_to_end(k)
        return self._open[k]
      mapped = np.memmap(self._paths[k], dtype=self.dtype, mode="r", shape=(int(self._counts[k]),))
      self._open[k] = mapped
      if len(self._open) > _MAX_OPEN_SHARDS:
        self._open.popitem(last=False)
      return mapped

  def __getitem__(self, index):
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    idx = np.asarray(index)
    if idx.dtype.kind not in "iu":
      raise IndexError(f"tokens take integer indices, not {idx.dtype}")
    flat = idx.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + len(self), flat)
    if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
      raise IndexError(f"token index out of range for {len(self)} tokens")
    shard = np.searchsorted(self._starts, flat, side="right") - 1
    out = np.empty(len(flat), self.dtype)
    order = np.argsort(shard, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
      if len(group):
        k = int(shard[group[0]])
        out[group] = self._shard(k)[flat[group] - self._starts[k]]
    return out[0] if idx.ndim == 0 else out.reshape(idx.shape)


class PreparedStore:
  """A prepared corpus with `TokenStore`'s interface: `tokens`, `sent_start`, `doc_start`, `meta`."""

  def __init__(self, index_dir, token_paths, manifest: dict):
    self.directory = str(index_dir)
    self.meta = json.loads((epath.Path(index_dir) / "meta.json").read_text())
    counts = [s["tokens"] for s in manifest["shards"]]
    for path, count in zip(token_paths, counts):
      size = os.path.getsize(path) if os.path.exists(path) else -1
      if size != count * np.dtype(self.meta["token_dtype"]).itemsize:
        raise BertjaxError(
          f"{path} holds {size} bytes, not the {count} tokens its manifest lists: the prepared folder is damaged; "
          f"run bertjax data prepare --out {self.meta['source'].partition(':')[2]} again to repair it"
        )
    self.tokens = ShardedTokens(token_paths, counts, self.meta["token_dtype"])
    self.sent_start = _map(index_dir, "sent_start.bin", self.meta["sentences"] + 1)
    self.doc_start = _map(index_dir, "doc_start.bin", self.meta["documents"] + 1)

  @property
  def num_documents(self) -> int:
    return self.meta["documents"]


def _map(directory, name, count):
  return np.memmap(os.path.join(directory, name), dtype=np.int64, mode="r", shape=(count,))


def open_prepared(source_dir, tokenizer, root, host_lock) -> PreparedStore:
  """The prepared corpus in `source_dir` as one store, for `tokenizer`.

  Args:
    source_dir: the DIR of `prepared:DIR`, local or gs://.
    tokenizer: the run's tokenizer; it must be the one the corpus was prepared with.
    root: the local cache root (`token_store.cache_root`): the offsets (and a gs:// DIR's token
      copies) go into ROOT/prepared/<manifest fingerprint>/.
    host_lock: a context manager factory taking a folder: one process of the host at a time builds it.
  Raises:
    BertjaxError: DIR is missing, unfinished or damaged, or was prepared with another tokenizer.
  """
  manifest = read_manifest(source_dir)
  if manifest["tokenizer"] != tokenizer.fingerprint:
    raise BertjaxError(
      f"prepared:{source_dir} was made with tokenizer {manifest['tokenizer']}, not this run's "
      f"{tokenizer.fingerprint}: leave data.tokenizer empty to use {source_dir}/{TOKENIZER_DIR}"
    )
  source = epath.Path(source_dir)
  local = epath.Path(root) / "prepared" / manifest["fingerprint"]
  remote = storage.is_remote(source_dir)
  names = [shard_name(s["index"]) for s in manifest["shards"]]
  if remote:
    token_paths = [str(local / SHARDS / f"{name}.tokens.bin") for name in names]
  else:
    token_paths = [str(source / SHARDS / name / "tokens.bin") for name in names]
  index = local / "index"

  def ready() -> bool:
    copied = all(_has_size(p, s["bytes"]["tokens.bin"]) for p, s in zip(token_paths, manifest["shards"]))
    return (index / "meta.json").exists() and (copied or not remote)

  if not ready():
    with host_lock(local):  # one process of this host copies and indexes; the others wait, then read
      if remote:
        _copy_tokens(source, manifest, token_paths)
      if not (index / "meta.json").exists():
        with atomic.staged_folder(index, replace=False) as staging:
          _write_offsets(source, manifest, staging, f"prepared:{source_dir}")
  return PreparedStore(index, token_paths, manifest)


def _has_size(path: str, size: int) -> bool:
  return os.path.exists(path) and os.path.getsize(path) == size


def _copy_tokens(source: epath.Path, manifest: dict, targets: list[str]) -> None:
  """Each shard's tokens.bin into the local cache, whole (a copy that stopped resumes at its shard)."""
  copied = 0
  for shard, target in zip(manifest["shards"], targets):
    if _has_size(target, shard["bytes"]["tokens.bin"]):
      continue
    data = (source / SHARDS / shard_name(shard["index"]) / "tokens.bin").read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]["tokens.bin"]:
      raise BertjaxError(
        f"{source}/{SHARDS}/{shard_name(shard['index'])}/tokens.bin does not match its manifest: the prepared "
        f"folder is damaged; run bertjax data prepare --out {source} again to repair it"
      )
    atomic.write_bytes(target, data)
    copied += len(data)
  if copied:
    log.info("copied %.1f MB of tokens from %s into %s", copied / 1e6, source, epath.Path(targets[0]).parent)


def _write_offsets(source: epath.Path, manifest: dict, out: epath.Path, name: str) -> None:
  """The corpus-wide sent_start [S+1] and doc_start [D+1], from each shard's own, and meta.json."""
  tokens = sentences = 0
  with open(out / "sent_start.bin", "wb") as f_sent, open(out / "doc_start.bin", "wb") as f_doc:
    for shard in manifest["shards"]:
      folder = source / SHARDS / shard_name(shard["index"])
      sent = np.frombuffer((folder / "sent_start.bin").read_bytes(), np.int64)
      doc = np.frombuffer((folder / "doc_start.bin").read_bytes(), np.int64)
      if len(sent) != shard["sentences"] + 1 or len(doc) != shard["documents"] + 1 or sent[-1] != shard["tokens"]:
        raise BertjaxError(
          f"{folder} does not match its manifest: the prepared folder is damaged; run bertjax data prepare "
          f"--out {source} again to repair it"
        )
      f_sent.write((sent[:-1] + tokens).tobytes())
      f_doc.write((doc[:-1] + sentences).tobytes())
      tokens += shard["tokens"]
      sentences += shard["sentences"]
    f_sent.write(np.int64(tokens).tobytes())
    f_doc.write(np.int64(sentences).tobytes())
  meta = {
    "format": "token-store-v1",
    "corpus": manifest["corpus"],
    "source": name,
    "prepared_from": manifest["source"],
    "fingerprint": manifest["fingerprint"],
    "tokenizer": manifest["tokenizer"],
    "token_dtype": manifest["token_dtype"],
    "tokens": manifest["tokens"],
    "sentences": manifest["sentences"],
    "documents": manifest["documents"],
    "warnings": manifest["warnings"],
  }
  (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def decoded_documents(directory):
  """The prepared corpus as text again, each sentence decoded by its tokenizer, for what reads a
  corpus's text (`bertjax data bench`'s tokenizer rate); approximate: normalised as it was tokenised."""
  manifest = read_manifest(directory)
  root = epath.Path(directory)
  decode = _decoder(root / TOKENIZER_DIR)
  for shard in manifest["shards"]:
    folder = root / SHARDS / shard_name(shard["index"])
    tokens = np.frombuffer((folder / "tokens.bin").read_bytes(), manifest["token_dtype"])
    sent = np.frombuffer((folder / "sent_start.bin").read_bytes(), np.int64)
    doc = np.frombuffer((folder / "doc_start.bin").read_bytes(), np.int64)
    for d in range(len(doc) - 1):
      yield [decode(tokens[sent[s] : sent[s + 1]].tolist()) for s in range(doc[d], doc[d + 1])]


def _decoder(folder: epath.Path):
  """Decoding of the files `Tokenizer.save` wrote. tokenizer.py imports this module (inside a
  function), and imports go one way, so this is not `load_tokenizer(folder).decode`."""
  if (folder / "spm.model").exists():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=(folder / "spm.model").read_bytes()).decode
  import tokenizers

  tk = tokenizers.Tokenizer.from_str((folder / "tokenizer.json").read_text())
  return lambda ids: tk.decode(ids, skip_special_tokens=False)
