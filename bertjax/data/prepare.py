"""`bertjax data prepare`: a corpus tokenised once into shards, by one process, N local processes or a job's processes.

    bertjax data prepare --config FILE --out DIR                      one process
    bertjax data prepare --config FILE --out DIR --num_processes N    N local worker processes (spawned)
    bertjax data prepare --config FILE --out DIR --process_id I --num_processes N [--workers W]
                                                                      process I of a job: every host runs one

1. Process 0 sets DIR up (`prepared.py` has the format): the tokenizer (data.tokenizer, or one
   trained on the corpus) and the plan: the corpus in units of about --shard_mb of input, in corpus
   order (files; a larger .txt or .jsonl cut into byte ranges at document boundaries: a blank line,
   or any line in .jsonl; rows of an hf:/disk: dataset; the builtin corpus whole). The job's other
   processes wait for the plan.
2. Unit k becomes shard k: read, split into sentences, tokenised, written whole (a staged folder,
   then its .json), or skipped when it is there already. A job's processes divide the units by
   size, about 1/N of the input each; local workers take them as they free up. No unit or shard
   depends on the number of processes.
3. Once every shard exists, the manifest: process 0 waits for the others' shards and writes it, and
   so does any other process that finishes last (the same bytes).

A killed prepare resumes (the same command makes the missing shards); a finished one does nothing.
DIR keeps the corpus and tokenizer it was begun with and refuses others. One command (or job) at a
time writes a DIR.
"""

import concurrent.futures
import dataclasses
import hashlib
import heapq
import itertools
import json
import logging
import multiprocessing
import time

import numpy as np
from etils import epath

from bertjax import atomic
from bertjax.data import prepared
from bertjax.data.corpus import Corpus
from bertjax.data.document_stream import tokenise_documents
from bertjax.data.tokenizer import INFO_FILE, load_tokenizer, train_tokenizer
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 64.0
_POLL_S = 2.0  # how often a waiting process looks for the plan or the other processes' shards
_REPORT_S = 60.0  # how often it says what it waits for
# Process 0's refusal of a job, for the processes waiting for its plan (`_wait_for_plan`).
REFUSED = "refused.json"
_CLOCK_SLACK_S = 300.0  # a refusal this much older than a waiting process's start is an earlier job's
_DOCS_PER_BATCH = 256  # documents tokenised per encode call


@dataclasses.dataclass(frozen=True)
class Processes:
  """Who does the work: `num_processes` in all; `process_id` None: all of them started here (spawned
  when more than one), else this is that process of a job and spawns `workers` for its share."""

  num_processes: int = 1
  process_id: int | None = None
  workers: int = 1

  def check(self) -> None:
    if self.num_processes < 1:
      raise BertjaxError(f"--num_processes {self.num_processes}: give 1 or more")
    if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
      raise BertjaxError(
        f"--process_id {self.process_id} is not in 0..{self.num_processes - 1} for --num_processes {self.num_processes}"
      )
    if self.workers < 1:
      raise BertjaxError(f"--workers {self.workers}: give 1 or more")
    if self.workers != 1 and self.process_id is None:
      raise BertjaxError("--workers goes with --process_id; without it, give --num_processes N for N local processes")


def prepare(config, out, processes: Processes = Processes(), shard_mb: float = DEFAULT_SHARD_MB, command="") -> dict:
  """Tokenises `config.data.source` into shards in `out`: this process's share, and the manifest when it is last.

  Args:
    config: a validated config (its `data` section and `train.seed` are read).
    out: the output folder, local or gs://.
    processes: who does the work (see `Processes`).
    shard_mb: input per unit, in MiB (a new plan only: a begun DIR keeps its plan).
    command: the command line, recorded so that an unfinished DIR can say how to finish it.
  Returns:
    {"out", "shards": in all, "mine": this process's, "made": made now, "manifest": written or None}.
  Raises:
    BertjaxError: bad flags; the source is itself prepared:; `out` holds another corpus's or
      another tokenizer's shards; the corpus is empty.
  """
  processes.check()
  if shard_mb <= 0:
    raise BertjaxError(f"--shard_mb {shard_mb}: give a size above 0")
  out = epath.Path(out)
  d = config.data
  corpus = Corpus(d.source, d.text_column, d.max_sentence_chars, streaming=False, hf_split=d.hf_split)
  if corpus.kind == "prepared":
    raise BertjaxError(
      f"data.source={d.source} is already prepared: give the corpus it was made from (files:GLOB, builtin, hf:, disk:)"
    )
  job = processes.process_id is not None
  if not job or processes.process_id == 0:
    if job and (out / REFUSED).exists():  # an earlier job's
      (out / REFUSED).unlink()
    try:
      tokenizer, plan = _set_up(config, corpus, out, max(1, int(shard_mb * 2**20)), command)
    except BertjaxError as e:  # a job's other processes wait for the plan: they stop with this reason
      if job:
        atomic.write_text(out / REFUSED, json.dumps({"time": time.time(), "error": str(e)}))
      raise
  else:
    tokenizer, plan = _wait_for_plan(config, corpus, out, started=time.time())
  units = plan["units"]
  if job:
    mine = share([u["bytes"] for u in units], processes.process_id, processes.num_processes)
  else:
    mine = list(range(len(units)))
    _remove_partials(out)  # every writer of DIR is started here: what a killed one left is junk
  todo = [k for k in mine if not prepared.shard_complete(out, k)]
  log.info("%s: %d of %d shards to make here (%d in all)", out, len(todo), len(mine), len(units))
  _make_shards(corpus, tokenizer, out, units, todo, processes.workers if job else processes.num_processes)
  if job and processes.process_id == 0:  # the others make theirs
    _wait_until(lambda: prepared.missing_shards(out, len(units)), "the other processes' shards")
  manifest = prepared.write_manifest(out, plan) if not prepared.missing_shards(out, len(units)) else None
  return {"out": str(out), "shards": len(units), "mine": len(mine), "made": len(todo), "manifest": manifest}


# -- setting up: the tokenizer and the plan --------------------------------------------------------
def _set_up(config, corpus: Corpus, out: epath.Path, shard_bytes: int, command: str):
  """Process 0: DIR's tokenizer and plan, made now or checked against what DIR already holds."""
  folder = out / prepared.TOKENIZER_DIR
  if not (folder / INFO_FILE).exists():
    with atomic.staged_folder(folder, replace=False) as staging:
      if config.data.tokenizer:
        load_tokenizer(config.data.tokenizer).save(staging)
      else:
        log.info("training a tokenizer on %s (once, for every shard)", corpus.source)
        train_tokenizer(config, staging)
  tokenizer = _checked_tokenizer(config, out)
  path = out / prepared.PLAN
  if path.exists():
    plan = json.loads(path.read_text())
    _check_plan(plan, corpus, tokenizer, out)
    if plan["shard_bytes"] != shard_bytes:
      log.info("%s keeps the units it was begun with (%.1f MiB)", out, plan["shard_bytes"] / 2**20)
    return tokenizer, plan
  plan = {
    "format": prepared.FORMAT,
    "source": corpus.source,
    "corpus": corpus.fingerprint,
    "tokenizer": tokenizer.fingerprint,
    "token_dtype": prepared.token_dtype(tokenizer.vocab_size).name,
    "shard_bytes": shard_bytes,
    "command": command,
    "units": plan_units(corpus, shard_bytes),
  }
  atomic.write_text(path, json.dumps(plan, indent=1) + "\n")
  return tokenizer, plan


def _checked_tokenizer(config, out: epath.Path):
  """DIR's tokenizer, refused when data.tokenizer names another one."""
  tokenizer = load_tokenizer(out / prepared.TOKENIZER_DIR)
  if config.data.tokenizer:
    wanted = load_tokenizer(config.data.tokenizer)
    if wanted.fingerprint != tokenizer.fingerprint:
      raise BertjaxError(
        f"--out {out} holds shards of tokenizer {tokenizer.fingerprint}, but data.tokenizer={config.data.tokenizer} "
        f"is {wanted.fingerprint}: give another --out, or leave data.tokenizer empty to finish it with its own"
      )
  return tokenizer


def _check_plan(plan: dict, corpus: Corpus, tokenizer, out: epath.Path) -> None:
  if plan.get("format") != prepared.FORMAT or plan["corpus"] != corpus.fingerprint:
    raise BertjaxError(
      f"--out {out} holds shards of another corpus ({plan.get('source')}, fingerprint {plan.get('corpus')}; this "
      f"one is {corpus.fingerprint}: its files, sizes or times differ): give another --out, or delete {out}"
    )
  if plan["tokenizer"] != tokenizer.fingerprint:
    raise BertjaxError(
      f"{out}/{prepared.PLAN} names tokenizer {plan['tokenizer']}, not the {tokenizer.fingerprint} in "
      f"{out}/{prepared.TOKENIZER_DIR}: the folder is damaged; delete {out} and prepare it again"
    )


def _wait_for_plan(config, corpus: Corpus, out: epath.Path, started: float):
  """Processes other than 0: wait for process 0's tokenizer and plan, then check them. When
  process 0 refused the job (REFUSED, written since `started`, give or take the hosts' clocks),
  stop with its reason rather than wait for a plan that will not come."""
  path = out / prepared.PLAN

  def missing():
    refused = out / REFUSED
    if refused.exists():
      said = json.loads(refused.read_text())
      if said.get("time", 0) > started - _CLOCK_SLACK_S:
        raise BertjaxError(f"process 0 of this job stopped: {said.get('error')}")
    return [] if path.exists() else [path]

  _wait_until(missing, "process 0's tokenizer and plan")
  plan = json.loads(path.read_text())
  tokenizer = _checked_tokenizer(config, out)
  _check_plan(plan, corpus, tokenizer, out)
  return tokenizer, plan


def _wait_until(missing, what: str) -> None:
  """Until `missing()` is empty, saying now and then what is missing."""
  said = time.monotonic()
  while lacking := missing():
    if time.monotonic() - said > _REPORT_S:
      log.info("waiting for %s (%d missing, first %s)", what, len(lacking), lacking[0])
      said = time.monotonic()
    time.sleep(_POLL_S)


def plan_units(corpus: Corpus, shard_bytes: int) -> list[dict]:
  """The corpus as units of about `shard_bytes` of input, in the order of `corpus.documents()`.

  Each is a dict with `kind` (bytes: a file's [start, end); file: a whole parquet file; rows: an
  hf:/disk: dataset's rows [start, end); all: the builtin corpus) and `bytes`, its input size.
  """
  if corpus.kind == "files":
    units = []
    for path in corpus.files:
      size = epath.Path(path).stat().length
      if path.endswith(".parquet"):
        units.append({"kind": "file", "path": path, "bytes": size})
        continue
      cuts = _cuts(path, size, shard_bytes, blank_lines=not path.endswith((".jsonl", ".json")))
      units += [{"kind": "bytes", "path": path, "start": a, "end": b, "bytes": b - a} for a, b in zip(cuts, cuts[1:])]
    return units
  if corpus.kind in ("hf", "disk"):
    ds = corpus._load_hf_dataset()
    rows, size = len(ds), max(1, ds.data.nbytes)
    step = max(1, int(rows * shard_bytes / size))
    return [
      {"kind": "rows", "start": a, "end": min(a + step, rows), "bytes": int(size * (min(a + step, rows) - a) / rows)}
      for a in range(0, rows, step)
    ]
  return [{"kind": "all", "bytes": 0}]


def _cuts(path: str, size: int, shard_bytes: int, blank_lines: bool) -> list[int]:
  """[0, the document boundaries at or after k x size / n for k = 1..n-1, size]: n units of about
  `shard_bytes` each (n = size / shard_bytes, rounded), as even as the documents allow."""
  cuts, units = [0], max(1, round(size / shard_bytes))
  if units == 1:
    return [0, size]
  with epath.Path(path).open("rb") as f:
    for k in range(1, units):
      x = k * size // units
      if x <= cuts[-1]:  # a document longer than a unit: the cut before was past x
        continue
      cut = _boundary(f, x, blank_lines)
      if cut >= size:
        break
      cuts.append(cut)
  return cuts + [size]


def _boundary(f, x: int, blank_lines: bool) -> int:
  """The first document boundary at or after byte x > 0: the start of the first line that begins at
  x or later and (.txt) is blank as the reader judges it; the file's size when there is none."""
  f.seek(x - 1)
  position = x - 1 + len(f.readline())  # the rest of the line holding byte x - 1
  while blank_lines:
    line = f.readline()
    if not line or not line.decode("utf-8", errors="replace").strip():
      break
    position += len(line)
  return position


def share(sizes: list[int], process_id: int, num_processes: int) -> list[int]:
  """The units process `process_id` of `num_processes` makes: largest first, each to the process
  with the least input so far (ties to the lower id); the same answer on every process."""
  loads = [(0, p) for p in range(num_processes)]
  mine = []
  for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
    load, p = heapq.heappop(loads)
    if p == process_id:
      mine.append(k)
    heapq.heappush(loads, (load + sizes[k] + 1, p))  # + 1: empty units spread too
  return sorted(mine)


# -- shards ---------------------------------------------------------------------------------------
def make_shard(corpus: Corpus, tokenizer, out: epath.Path, index: int, unit: dict) -> dict:
  """Unit `index` read, split, tokenised and written as shard `index`; returns its .json."""
  corpus.warnings.clear()
  dtype, parts, documents = prepared.token_dtype(tokenizer.vocab_size), [], corpus.unit_documents(unit)
  while True:
    batch = list(itertools.islice(documents, _DOCS_PER_BATCH))
    tokens, lengths, per_doc = tokenise_documents(corpus, tokenizer, batch)[:3]
    parts.append((tokens.astype(dtype), lengths, per_doc))  # the shard's dtype at once: half of int32's memory
    if len(batch) < _DOCS_PER_BATCH:
      break
  tokens, lengths, per_doc = (np.concatenate([p[i] for p in parts]) for i in range(3))
  parts.clear()
  arrays = {
    "tokens.bin": tokens,
    "sent_start.bin": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    "doc_start.bin": np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64),
  }
  name = prepared.shard_name(index)
  with atomic.staged_folder(out / prepared.SHARDS / name, replace=True) as staging:
    for file, data in arrays.items():
      (staging / file).write_bytes(memoryview(data).cast("B"))  # the array's bytes, not a copy
  marker = {
    "index": index,
    "unit": unit,
    "documents": len(per_doc),
    "sentences": len(lengths),
    "tokens": len(tokens),
    "bytes": {file: data.nbytes for file, data in arrays.items()},
    "sha256": {file: hashlib.sha256(memoryview(data).cast("B")).hexdigest() for file, data in arrays.items()},
    "warnings": dict(sorted(corpus.warnings.items())),
  }
  atomic.write_text(out / prepared.SHARDS / f"{name}.json", json.dumps(marker, indent=1) + "\n")  # it is complete
  return marker


def _make_shards(corpus, tokenizer, out: epath.Path, units: list[dict], todo: list[int], workers: int) -> None:
  order = sorted(todo, key=lambda k: (-units[k]["bytes"], k))  # largest first: the workers end together
  start = time.perf_counter()

  def done(n: int, k: int) -> None:
    log.info(
      "shard %s done (%d of %d here, %.0f s)", prepared.shard_name(k), n, len(order), time.perf_counter() - start
    )

  if workers <= 1 or len(order) <= 1:
    for n, k in enumerate(order, 1):
      make_shard(corpus, tokenizer, out, k, units[k])
      done(n, k)
    return
  # spawn, not fork: no worker inherits a parent's threads (a library's, or JAX's in a notebook)
  with concurrent.futures.ProcessPoolExecutor(
    min(workers, len(order)),
    mp_context=multiprocessing.get_context("spawn"),
    initializer=_init_worker,
    initargs=(corpus, tokenizer, str(out)),
  ) as pool:
    futures = {pool.submit(_worker_make_shard, k, units[k]): k for k in order}
    try:
      for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
        future.result()
        done(n, futures[future])
    except concurrent.futures.process.BrokenProcessPool as e:
      raise BertjaxError(
        f"a worker process of bertjax data prepare died ({e}): run the same command again to continue "
        "(the shards made so far are kept)"
      ) from e


_WORKER: tuple = ()  # (corpus, tokenizer, out) in a worker process


def _init_worker(corpus, tokenizer, out: str) -> None:
  global _WORKER
  _WORKER = (corpus, tokenizer, epath.Path(out))


def _worker_make_shard(index: int, unit: dict) -> None:
  corpus, tokenizer, out = _WORKER
  make_shard(corpus, tokenizer, out, index, unit)


def _remove_partials(out: epath.Path) -> None:
  """What killed writers left: staged shard folders and files never renamed into place."""
  folder = out / prepared.SHARDS
  if folder.exists():
    for leftover in (p for p in folder.iterdir() if atomic.is_staged(p.name)):
      leftover.rmtree() if leftover.is_dir() else leftover.unlink()
