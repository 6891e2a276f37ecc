"""The per-chip batch that fits a TPU chip, and XLA's step time there: docs/scaling.md's table.

    python benchmarks/tpu_fit_table.py OUT_DIR [--models base,large] [--phases 1,2]
        [--chips v5e,v5p,v6e] [--remat none,full]

Every figure comes from `bertjax train --dry-run --compile --json` (libtpu, no TPU needed), run
as a subprocess on a 4-chip data-parallel slice of each generation; per-chip memory under data
parallelism does not depend on the slice's size. For each model, phase and rematerialisation:

1. two memory-only compiles (`--no-estimate`) on a v5p at 8 and 16 sequences a chip give XLA's
   memory as a line in the batch;
2. for each chip, the largest power of two the line puts under the chip's HBM is compiled with
   the estimate, and twice that memory-only: the row is the largest batch XLA says fits, checked
   against the next power of two that does not (moving down or up when the line was off).

Each command's JSON line is appended to OUT_DIR/runs.jsonl, so an interrupted table resumes
where it stopped. The markdown table is printed at the end.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bertjax.perf import aot

SLICES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}  # 4 chips each
CHIPS = 4
CONFIGS = {"base": "configs/base.py", "large": "configs/large.py"}
PROBE_BATCHES = (8, 16)  # per chip
MAX_PER_CHIP = 4096


def command(model: str, phase: str, chip: str, remat: str, per_chip: int, estimate: bool) -> list[str]:
  """The `bertjax train --dry-run --compile --json` command of one table cell."""
  return [
    "bertjax",
    "train",
    "--config",
    f"{CONFIGS[model]}:phase={phase}",
    "--workdir",
    "/tmp/bertjax-dry-run",
    "--dry-run",
    "--compile",
    "--topology",
    SLICES[chip],
    "--json",
    *([] if estimate else ["--no-estimate"]),
    f"--config.train.batch_size={per_chip * CHIPS}",
    f"--config.model.remat={remat}",
  ]


class Runs:
  """The JSON lines of the commands run so far, by command; runs a command not yet there."""

  def __init__(self, out: Path):
    self.path = out / "runs.jsonl"
    self.done = {}
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        record = json.loads(line)
        self.done[" ".join(record["command"])] = record["figures"]

  def get(self, argv: list[str]) -> dict:
    key = " ".join(argv)
    if key not in self.done:
      start = time.perf_counter()
      proc = subprocess.run(
        [sys.executable, "-m", "bertjax", *argv[1:]], capture_output=True, text=True, env={**os.environ}
      )
      if proc.returncode != 0:
        raise SystemExit(f"{key} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
      figures = json.loads(proc.stdout.strip().splitlines()[-1])
      with self.path.open("a") as f:
        f.write(json.dumps({"command": argv, "figures": figures}) + "\n")
      self.done[key] = figures
      print(f"{time.perf_counter() - start:6.0f} s  {key}  fits={figures['fits']}", flush=True)
    return self.done[key]


def largest_fitting(runs: Runs, model: str, phase: str, chip: str, remat: str) -> tuple[int, dict] | None:
  """The largest power-of-two batch per chip that fits (with its estimated figures), or None if 1 does not."""
  low, high = (runs.get(command(model, phase, "v5p", remat, b, estimate=False)) for b in PROBE_BATCHES)
  per_seq = (high["memory_bytes"]["total"] - low["memory_bytes"]["total"]) / (PROBE_BATCHES[1] - PROBE_BATCHES[0])
  fixed = low["memory_bytes"]["total"] - per_seq * PROBE_BATCHES[0]
  hbm = aot.GENERATIONS[chip].hbm_gib * 2**30
  guess = max(1, min(MAX_PER_CHIP, 2 ** math.floor(math.log2(max(1.0, (hbm - fixed) / per_seq)))))
  per_chip = guess
  while True:
    figures = runs.get(command(model, phase, chip, remat, per_chip, estimate=True))
    if not figures["fits"]:
      if per_chip == 1:
        return None
      per_chip //= 2
      continue
    if per_chip >= MAX_PER_CHIP:
      return per_chip, figures
    if not runs.get(command(model, phase, chip, remat, 2 * per_chip, estimate=False))["fits"]:
      return per_chip, figures
    per_chip *= 2


def table(runs: Runs, args) -> str:
  rows = [
    "| model | phase (seq) | chip | remat | batch per chip | memory per chip / HBM | XLA step time "
    "| tokens/s per chip | MFU |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for model in args.models:
    for phase in args.phases:
      for chip in args.chips:
        for remat in args.remat:
          found = largest_fitting(runs, model, phase, chip, remat)
          seq = 128 if phase == "1" else 512
          if found is None:
            rows.append(f"| {model} | {phase} ({seq}) | {chip} | {remat} | none fits | | | | |")
            continue
          per_chip, f = found
          step = f["estimated_step_s"]
          tokens = "" if step is None else f"{f['estimated_tokens_per_s'] / CHIPS:,.0f}"
          mfu = "" if f["estimated_mfu"] is None else f"{100 * f['estimated_mfu']:.0f}%"
          rows.append(
            f"| {model} | {phase} ({seq}) | {chip} | {remat} | {per_chip} | "
            f"{f['memory_per_device_gib']:.1f} / {f['hbm_gib']:.1f} GiB | "
            f"{'' if step is None else f'{1000 * step:.0f} ms'} | {tokens} | {mfu} |"
          )
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", type=Path)
  parser.add_argument("--models", default="base,large")
  parser.add_argument("--phases", default="1,2")
  parser.add_argument("--chips", default="v5e,v5p,v6e")
  parser.add_argument("--remat", default="none,full")
  args = parser.parse_args()
  for key in ("models", "phases", "chips", "remat"):
    setattr(args, key, getattr(args, key).split(","))
  args.out.mkdir(parents=True, exist_ok=True)
  print(table(Runs(args.out), args))


if __name__ == "__main__":
  main()
