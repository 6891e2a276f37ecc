"""`bertjax data prepare` with 1, 2 and 4 processes against the per-run cache, on a synthetic English-like corpus.

    python benchmarks/prepare_corpus.py generate --out DIR [--files 16] [--mb 64] [--words 10000] [--seed 0]
    python benchmarks/prepare_corpus.py tokenizer --corpus DIR --out TOK [--vocab 8000] [--sentences 200000]
    python benchmarks/prepare_corpus.py measure --corpus DIR --tokenizer TOK --work DIR [--processes 1,2,4]
        [--cache_num_proc 1,2] [--shard_mb 64] [--config configs/base.py] [--bench_seconds 20]

`generate` writes google-research/bert's format (one sentence a line, a blank line between
documents): FILES files of MB MiB each, documents of 4-40 sentences of 8-30 words drawn with the
Zipf-Mandelbrot law p(k) ~ 1/(k + 2.7) from WORDS English-like words (about 400 common English words
first, then made-up words of 1-3 syllables), the first word capitalised, a comma now and then, '.',
'?' or '!' at the end; the same bytes for the same flags.

`tokenizer` trains a sentencepiece tokenizer of VOCAB pieces once, on the first file (a uniform
sample of at most SENTENCES sentences), with `bertjax tokenizer train`.

`measure` runs each command under `/usr/bin/time -v`, one after the other, and prints one JSON
line each and a markdown table: wall time, user + system CPU, the peak resident memory of the
largest process (time's maximum RSS covers the command and the children it waited for), the
output's size on disk at the end and at its peak (sampled every second; the difference is staging
and temporary files), and `uptime`'s load average just before (other users' work shares the CPUs):

  - `bertjax data prepare --num_processes N` for each N of --processes, into WORK/prepared-N
    (local processes; the shards of every N are compared byte for byte);
  - the per-run cache (`token_store.open_token_store`, one `datasets.map` with data.num_proc) for each
    value of --cache_num_proc, into WORK/cache-P;
  - reading: the first open of the prepared corpus (the corpus-wide offsets written once) and
    `bertjax data bench` from it and from the cache (batches of the config's seq_len and batch size).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

_FUNCTION_WORDS = """the of and to a in is it that was for on are as with his they at be this from have or by
one had not but what all were when we there can an your which their said if do will each about how up out
them then she many some so these would other into has more her two like him see time could no make than
first been its who now people my made over did down only way find use may water long little very after
words called just where most know get through back much before go good new write our used me man too any
day same right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell men say
small every found still between name should home big give air line set own under read last never us left
end along while might next sound below saw something thought both few those always looked show large often
together asked house world going want school important until form food keep children feet land side without
boy once animals life enough took sometimes four head above kind began almost live page got earth need far
hand high year mother light parts country father let night following picture being study second eyes soon
times story boys since white days ever paper hard near sentence better best across during today others sure
means knew its try told young miles sun ways thing whole hear example heard several change answer room sea
against top turned learn point city play toward five using himself usually""".split()
_ONSETS = (
  "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sc sh sl sm sn sp st str t th tr v w".split()
)
_ONSETS += ["wh", "y", "z"]
_VOWELS = "a e i o u ai ea ee ie oa oo ou ay".split()
_CODAS = ["", "", "", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "ll", "nt", "sh", "th"]
_SUFFIXES = ["", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ness", "ment", "able", "al"]


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
  """`size` distinct lower-case words: the function words, then made-up words of 1-3 syllables."""
  words = list(dict.fromkeys(_FUNCTION_WORDS))[:size]
  seen = set(words)
  while len(words) < size:
    syllables = int(rng.choice([1, 1, 2, 2, 2, 3]))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    word += rng.choice(_SUFFIXES)
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words


def _sentences(words: np.ndarray, cdf: np.ndarray, count: int, rng: np.random.Generator) -> list[str]:
  lengths = rng.integers(8, 31, count)
  drawn = words[np.searchsorted(cdf, rng.random(int(lengths.sum())))]
  ends = rng.choice(np.array([".", ".", ".", ".", ".", ".", ".", ".", "?", "!"]), count)
  commas = rng.integers(2, 8, count)
  comma_at = np.where(rng.random(count) < 0.3, commas, -1)
  out, start = [], 0
  for n, end, comma in zip(lengths.tolist(), ends.tolist(), comma_at.tolist()):
    sentence = list(drawn[start : start + n])
    start += n
    if 0 <= comma < n - 1:
      sentence[comma] += ","
    first = sentence[0]
    sentence[0] = first[:1].upper() + first[1:]
    out.append(" ".join(sentence) + end)
  return out


def generate(args) -> None:
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  words = np.array(vocabulary(args.words, rng), dtype=object)
  weights = 1.0 / (np.arange(1, len(words) + 1) + 2.7)  # Zipf-Mandelbrot, English's fit: "the" about 4%
  cdf = np.cumsum(weights) / weights.sum()
  target = int(args.mb * 2**20)
  start = time.perf_counter()
  for i in range(args.files):
    path = out / f"part-{i:03d}.txt"
    written = 0
    with open(path, "w") as f:
      while written < target:
        sentences = iter(_sentences(words, cdf, 20_000, rng))
        chunk = []
        for size in rng.integers(4, 41, 2_000).tolist():
          doc = [s for _, s in zip(range(size), sentences)]
          if not doc:
            break
          chunk.append("\n".join(doc) + "\n\n")
        text = "".join(chunk)
        f.write(text)
        written += len(text)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB ({time.perf_counter() - start:.0f} s)", flush=True)


def train_tokenizer(args) -> None:
  first = sorted(Path(args.corpus).glob("*.txt"))[0]
  overrides = [
    f"data.source=files:{first}",
    f"data.vocab_size={args.vocab}",
    f"data.tokenizer_sentences={args.sentences}",
  ]
  _bertjax(["tokenizer", "train", "--config", args.config, "--out", args.out, *(f"--config.{o}" for o in overrides)])


def _bertjax(argv: list[str]) -> None:
  subprocess.run([sys.executable, "-m", "bertjax", *argv], check=True)


def _du(path: Path) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):  # a staging file renamed meanwhile
        total += os.path.getsize(os.path.join(root, name))
  return total


_TIME_FIELDS = {
  "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
  "user_s": r"User time \(seconds\): (\S+)",
  "system_s": r"System time \(seconds\): (\S+)",
  "max_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
}


def timed(label: str, argv: list[str], watch: Path | None) -> dict:
  """`argv` under /usr/bin/time -v, with the load before and `watch`'s disk use sampled meanwhile."""
  uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  peak = [0]
  done = threading.Event()

  def sample():
    while not done.wait(1.0):
      if watch is not None and watch.exists():
        peak[0] = max(peak[0], _du(watch))

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
  done.set()
  sampler.join()
  if proc.returncode != 0:
    raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  row = {"what": label, "command": " ".join(argv), "load_before": uptime.split("load average:")[-1].strip()}
  for key, pattern in _TIME_FIELDS.items():
    value = re.search(pattern, proc.stderr).group(1)
    if key == "wall_s":
      parts = [float(p) for p in value.split(":")]
      value = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    row[key] = round(float(value), 1)
  if watch is not None:
    final = _du(watch)
    row.update(disk_mb=round(final / 1e6, 1), peak_disk_mb=round(max(peak[0], final) / 1e6, 1))
  row["stdout_tail"] = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
  print(json.dumps(row), flush=True)
  return row


_OPEN = """
import sys, time
from bertjax.data import token_store
from bertjax.data.corpus import Corpus
from bertjax.data.tokenizer import load_tokenizer
source, tokenizer, cache, num_proc = sys.argv[1:]
start = time.perf_counter()
store = token_store.open_token_store(Corpus(source), load_tokenizer(tokenizer), cache, int(num_proc))
seconds = time.perf_counter() - start
print(f"{store.meta['documents']} documents, {store.meta['tokens']} tokens in {seconds:.1f} s")
"""


def measure(args) -> None:
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  corpus = f"files:{Path(args.corpus).resolve()}/*.txt"
  common = [f"--config.data.source={corpus}", f"--config.data.tokenizer={args.tokenizer}"]
  rows = []
  outs = {}
  for n in [int(p) for p in args.processes.split(",") if p]:  # a count given twice runs twice
    out = work / f"prepared-{n}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "bertjax", "data", "prepare", "--config", args.config, "--out", str(out)]
    argv += ["--shard_mb", str(args.shard_mb), "--num_processes", str(n), *common]
    rows.append(timed(f"data prepare, {n} process{'es' if n > 1 else ''}", argv, out))
    outs[n] = out
  first = next(iter(outs.values()))
  for n, out in outs.items():
    same = all(
      (first / "shards" / s.name / a).read_bytes() == (s / a).read_bytes()
      for s in sorted((out / "shards").glob("[0-9]*[0-9]"))
      for a in ("tokens.bin", "sent_start.bin", "doc_start.bin")
    )
    print(f"prepared-{n}: shards {'identical to' if same else 'DIFFERENT FROM'} {first.name}'s", flush=True)
  for p in [int(x) for x in args.cache_num_proc.split(",") if x]:
    cache = work / f"cache-{p}"
    shutil.rmtree(cache, ignore_errors=True)
    argv = [sys.executable, "-c", _OPEN, corpus, args.tokenizer, str(cache), str(p)]
    rows.append(timed(f"per-run cache, data.num_proc={p}", argv, cache))
  read_cache = work / "read-cache"
  shutil.rmtree(read_cache, ignore_errors=True)
  argv = [sys.executable, "-c", _OPEN, f"prepared:{first}", args.tokenizer, str(read_cache), "1"]
  rows.append(timed("first open of prepared:DIR (offsets written)", argv, read_cache))
  for source, cache in (
    (f"prepared:{first}", read_cache),
    (corpus, work / f"cache-{args.cache_num_proc.split(',')[0]}"),
  ):
    argv = [sys.executable, "-m", "bertjax", "data", "bench", "--config", args.config, "--workdir", str(work / "bench")]
    argv += ["--seconds", str(args.bench_seconds), f"--config.data.source={source}"]
    argv += [f"--config.data.tokenizer={args.tokenizer}", f"--config.data.cache_dir={cache}"]
    rows.append(timed(f"data bench from {source.split(':')[0]}", argv, None))
  print("\n| what | wall s | user+sys s | max RSS MB | disk MB (peak) | load before |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    disk = f"{r['disk_mb']} ({r['peak_disk_mb']})" if "disk_mb" in r else ""
    cpu = round(r["user_s"] + r["system_s"], 1)
    print(f"| {r['what']} | {r['wall_s']} | {cpu} | {r['max_rss_kb'] // 1024} | {disk} | {r['load_before']} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("generate", help="write the synthetic corpus")
  p.add_argument("--out", required=True)
  p.add_argument("--files", type=int, default=16)
  p.add_argument("--mb", type=float, default=64.0, help="MiB per file")
  p.add_argument(
    "--words", type=int, default=10_000, help="distinct words (a tokenizer of 8000 pieces needs about 8000)"
  )
  p.add_argument("--seed", type=int, default=0)
  p = sub.add_parser("tokenizer", help="train the tokenizer once, on the first file")
  p.add_argument("--corpus", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--vocab", type=int, default=8000)
  p.add_argument("--sentences", type=int, default=200_000)
  p.add_argument("--config", default="configs/base.py")
  p = sub.add_parser("measure", help="time prepare with each process count, the cache, and reading")
  p.add_argument("--corpus", required=True)
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--work", required=True, help="outputs and caches go here (removed and remade)")
  p.add_argument("--processes", default="1,2,4")
  p.add_argument("--cache_num_proc", default="1,2")
  p.add_argument("--shard_mb", type=float, default=64.0)
  p.add_argument("--config", default="configs/base.py")
  p.add_argument("--bench_seconds", type=float, default=20.0)
  args = parser.parse_args()
  {"generate": generate, "tokenizer": train_tokenizer, "measure": measure}[args.command](args)


if __name__ == "__main__":
  main()
