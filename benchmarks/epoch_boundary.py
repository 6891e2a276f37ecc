"""The cached pipeline at an epoch boundary: how long the training loop waits for its batch there.

    python benchmarks/epoch_boundary.py [--sentences 3000000] [--step-ms 50] [--pack] [--out FILE.json]

Builds a synthetic tokenised corpus in a temporary folder (memory-mapped as the token store maps
its files: sentences of 10-40 tokens in documents of 5-50 sentences), makes a `CachedPipeline`
over it (the corpus and store loaders are replaced by it; nothing is tokenised) and reports:

- the wait for a batch: a consumer takes batches from `pipeline.iterator` every `--step-ms`
  (a training step), from `--lead-s` seconds of steps before the end of epoch 0 to a few steps
  after it; the longest wait at the boundary, and the longest elsewhere;
- the index build: pairs per second of `pairs.build_pair_index` alone, and seconds for a whole
  epoch (pairs, shuffle, packing), in this thread with nothing else running;
- bytes per pair: the peak RSS growth while one epoch is built (sampled every few ms, in a fresh
  process, the store already resident), and the arrays an epoch keeps (its pair index; its
  packing apart).

It runs against whichever bertjax is imported, so the same script measures an older commit:
`git archive OLD bertjax | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/epoch_boundary.py`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np

from bertjax.config.defaults import get_config
from bertjax.data import cached
from bertjax.data import pairs as pairs_lib
from bertjax.data.base import TRAIN_STREAM, keyed_generator


class _Tokenizer:
  """What the pipeline reads of a tokenizer: special ids, vocabulary size, word starts."""

  vocab_size = 30522
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
  fingerprint = "synthetic-tokenizer"

  def word_start_mask(self):
    return np.ones(self.vocab_size, bool)


def write_store(folder: str, sentences: int, seed: int = 0) -> None:
  """tokens.bin (uint16), sent_start.bin and doc_start.bin (int64), as the token store has them."""
  rng = np.random.default_rng(seed)
  per_doc = rng.integers(5, 51, size=sentences // 27 + 1)
  per_doc = per_doc[: np.searchsorted(np.cumsum(per_doc), sentences) + 1]
  per_doc[-1] -= int(per_doc.sum()) - sentences
  lengths = rng.integers(10, 41, size=sentences)
  sent_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  doc_start = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
  sent_start.tofile(os.path.join(folder, "sent_start.bin"))
  doc_start.tofile(os.path.join(folder, "doc_start.bin"))
  tokens = np.memmap(os.path.join(folder, "tokens.bin"), np.uint16, "w+", shape=(int(sent_start[-1]),))
  for c in range(0, len(tokens), 1 << 24):
    tokens[c : c + (1 << 24)] = rng.integers(5, _Tokenizer.vocab_size, size=len(tokens[c : c + (1 << 24)]))
  tokens.flush()
  meta = {"sentences": sentences, "documents": len(per_doc), "tokens": int(sent_start[-1])}
  with open(os.path.join(folder, "meta.json"), "w") as f:
    json.dump(meta, f)


def open_store(folder: str):
  """A store-like object over `write_store`'s files, memory-mapped."""
  with open(os.path.join(folder, "meta.json")) as f:
    m = json.load(f)
  meta = dict(m, tokenizer=_Tokenizer.fingerprint, source="synthetic", corpus="synthetic", warnings={})

  def mapped(name, dtype, count):
    return np.memmap(os.path.join(folder, name), dtype, "r", shape=(count,))

  return types.SimpleNamespace(
    tokens=mapped("tokens.bin", np.uint16, m["tokens"]),
    sent_start=mapped("sent_start.bin", np.int64, m["sentences"] + 1),
    doc_start=mapped("doc_start.bin", np.int64, m["documents"] + 1),
    meta=meta,
    num_documents=m["documents"],
  )


def make_pipeline(folder: str, args):
  """A CachedPipeline over the synthetic store (the corpus and store loaders replaced)."""
  c = get_config()
  c.data.source = "files:synthetic"
  c.data.seq_len = args.seq_len
  c.data.max_predictions = args.max_predictions
  c.data.short_seq_prob = args.short_seq_prob
  c.data.pack_pairs = args.pack
  c.data.prefetch = args.prefetch
  c.data.eval_fraction = 0.0
  c.data.vocab_size = _Tokenizer.vocab_size
  c.train.batch_size = args.batch_size
  store = open_store(folder)
  cached.load_corpus = lambda config: types.SimpleNamespace(source="synthetic", fingerprint="synthetic")
  cached.open_token_store = lambda *a, **k: store
  return cached.CachedPipeline(c, _Tokenizer())


def epoch_now(p, epoch: int):
  """Builds epoch `epoch` (pairs, shuffle, packing) in this thread, whichever version this is."""
  if hasattr(p, "_recipe"):  # built ahead: data/epochs.py
    return p._recipe.epoch(epoch)
  index = p._pair_index(p.train_docs, epoch, TRAIN_STREAM)  # the synchronous recipe before it
  index = index.take(keyed_generator(p.seed, epoch, 0x5F1).permutation(len(index)))
  return index, p.layout.pack(index)


def index_now(p, epoch: int):
  d = p.config.data
  rng = keyed_generator(p.seed, epoch, TRAIN_STREAM, 0x9A1)
  store = p.store
  return pairs_lib.build_pair_index(
    store.sent_start, store.doc_start, p.train_docs, p.seq_len, d.short_seq_prob, d.pair_random_next_prob, rng
  )


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(folder: str, args) -> dict:
  """In this (fresh) process: peak RSS growth while epoch 5 is built, and the bytes it keeps."""
  p = make_pipeline(folder, args)
  for a in (p.store.tokens, p.store.sent_start, p.store.doc_start):
    int(np.asarray(a[:: max(1, 4096 // a.itemsize)]).sum())  # resident before the baseline
  p.train_docs.sum()
  before, peak, done = _rss(), [0], threading.Event()

  def sample():  # the RSS every few milliseconds while the epoch is built
    while not done.wait(0.002):
      peak[0] = max(peak[0], _rss())

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  index, packed = epoch_now(p, 5)
  done.set()
  sampler.join()
  peak = max(peak[0], _rss())
  fields = ("a_start", "a_len", "b_start", "b_len", "label")
  kept = sum(getattr(index, f).nbytes for f in fields)
  packing_bytes = 0 if packed is None else packed.row_start.nbytes + packed.pairs.nbytes
  return {
    "pairs": len(index),
    "build_peak_bytes_per_pair": round((peak - before) / len(index), 1),
    "rss_bytes_per_pair_after": round((_rss() - before) / len(index), 1),
    "kept_index_bytes_per_pair": round(kept / len(index), 1),
    "kept_packing_bytes_per_pair": round(packing_bytes / len(index), 1),
    "dtypes": [str(getattr(index, f).dtype) for f in fields],
  }


def _spin(n: int) -> int:
  x = 0
  for i in range(n):
    x += i
  return x


def _spins_for(ms: float) -> int:
  """Iterations of `_spin` that take `ms` milliseconds in a quiet process."""
  n = 100_000
  t = time.perf_counter()
  _spin(n)
  return int(n * ms / 1000 / (time.perf_counter() - t))


def boundary_waits(p, args) -> dict:
  """A consumer at one step per `step_ms` across the end of epoch 0: the waits for its batches.

  A step is `python_ms` of Python (as a training loop's dispatch and logging, which need the GIL)
  and the rest asleep (the accelerator's work, which does not)."""
  end = p._epoch_size(0)  # builds epoch 0 (before the clock: a run's first batch waits for it anyway)
  boundary = end // p.batch_size  # the first step with examples of epoch 1
  lead = int(args.lead_s * 1000 / args.step_ms)
  start, stop = max(0, boundary - lead), boundary + args.after
  spins = _spins_for(args.python_ms)
  waits, python = {}, []
  with p.iterator(start) as it:
    for _ in range(start, stop):
      t = time.perf_counter()
      step, _batch = next(it)
      waits[step] = time.perf_counter() - t
      t = time.perf_counter()
      _spin(spins)
      python.append(time.perf_counter() - t)
      time.sleep(max(0.0, args.step_ms / 1000 - python[-1]))  # the training step
  near = [waits[s] for s in range(boundary - 1, min(stop, boundary + args.prefetch + 2))]
  rest = [w for s, w in waits.items() if not boundary - 1 <= s < boundary + args.prefetch + 2 and s > start + 2]
  return {
    "first_step": start,
    "boundary_step": boundary,
    "steps": stop - start,
    "boundary_wait_s": round(max(near), 3),
    "other_max_wait_s": round(max(rest), 3) if rest else None,
    "median_wait_ms": round(1000 * float(np.median(list(waits.values()))), 2),
    "total_wait_s": round(sum(waits.values()), 3),
    # Waits over 10 ms, by step relative to the boundary (the first few steps fill the prefetch).
    "waits_over_10ms": {s - boundary: round(1000 * w) for s, w in waits.items() if w > 0.01 and s > start + 2},
    # The Python part of the steps: a build holding the GIL stretches it.
    "python_part_ms": {
      "asked": args.python_ms,
      "median": round(1000 * float(np.median(python)), 2),
      "p99": round(1000 * float(np.percentile(python, 99)), 2),
      "max": round(1000 * max(python), 2),
    },
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sentences", type=int, default=3_000_000)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--max-predictions", type=int, default=20)
  parser.add_argument("--short-seq-prob", type=float, default=0.1)
  parser.add_argument("--pack", action="store_true", help="data.pack_pairs")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--step-ms", type=float, default=50.0, help="the simulated training step")
  parser.add_argument("--python-ms", type=float, default=2.0, help="of which Python (holding the GIL)")
  parser.add_argument("--lead-s", type=float, default=30.0, help="seconds of steps before the boundary")
  parser.add_argument("--after", type=int, default=20, help="steps after the boundary")
  parser.add_argument("--store", help="an existing folder of write_store's files (default: a new temporary one)")
  parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", help="also write the figures here (JSON)")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix="bertjax-epoch-bench-") as tmp:
    folder = args.store or tmp
    if not args.store:
      write_store(folder, args.sentences)
    if args.memory_only:
      print(json.dumps(measure_memory(folder, args)))
      return
    argv = [*sys.argv[1:], "--store", folder, "--memory-only"]
    memory = subprocess.run([sys.executable, __file__, *argv], check=True, stdout=subprocess.PIPE, text=True)
    result = {
      "bertjax": os.path.dirname(os.path.dirname(os.path.abspath(cached.__file__))),
      "sentences": open_store(folder).meta["sentences"],
      "seq_len": args.seq_len,
      "short_seq_prob": args.short_seq_prob,
      "pack_pairs": args.pack,
      "batch_size": args.batch_size,
      "step_ms": args.step_ms,
      **json.loads(memory.stdout.strip().splitlines()[-1]),
    }
    p = make_pipeline(folder, args)
    t = time.perf_counter()
    n = len(index_now(p, 7))
    result["index_pairs_per_s"] = round(n / (time.perf_counter() - t))
    t = time.perf_counter()
    epoch_now(p, 8)
    result["epoch_build_s"] = round(time.perf_counter() - t, 2)
    del p
    result.update(boundary_waits(make_pipeline(folder, args), args))
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
