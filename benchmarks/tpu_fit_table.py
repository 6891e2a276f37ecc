"""The per-chip batch that fits a TPU chip, and XLA's step time there: docs/scaling.md's table.

    python benchmarks/tpu_fit_table.py OUT_DIR [--models base,large] [--phases 1,2]
        [--chips v5e,v5p,v6e] [--remat none,full]

Every figure comes from `bertjax train --dry-run --compile --json` (libtpu, no TPU needed), run
as a subprocess on a 4-chip data-parallel slice of each generation; per-chip memory under data
parallelism does not depend on the slice's size. For each model, phase and rematerialisation,
memory-only compiles (`--no-estimate`) double or halve the batch per chip until it is the
largest power of two that XLA says fits (the next one does not), starting on the chip with the
least HBM and on each next chip from that batch times the HBM ratio; the row is then compiled
with XLA's step-time estimate.

Each command's JSON line is appended to OUT_DIR/runs.jsonl, so an interrupted table resumes
where it stopped. The markdown table is printed at the end.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bertjax.perf import aot

SLICES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}  # 4 chips each
CHIPS = 4
CONFIGS = {"base": "configs/base.py", "large": "configs/large.py"}
FIRST_GUESS = {128: 128, 512: 32}  # per chip, by sequence length: where the search starts
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
      proc = subprocess.run([sys.executable, "-m", "bertjax", *argv[1:]], capture_output=True, text=True)
      if proc.returncode != 0:
        raise SystemExit(f"{key} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
      figures = json.loads(proc.stdout.strip().splitlines()[-1])
      with self.path.open("a") as f:
        f.write(json.dumps({"command": argv, "figures": figures}) + "\n")
      self.done[key] = figures
      print(f"{time.perf_counter() - start:6.0f} s  {key}  fits={figures['fits']}", flush=True)
    return self.done[key]


def largest_fitting(runs: Runs, model: str, phase: str, chip: str, remat: str, guess: int) -> int | None:
  """The largest power-of-two batch per chip that fits, from memory-only compiles starting at `guess`."""

  def fits(per_chip: int) -> bool:
    return runs.get(command(model, phase, chip, remat, per_chip, estimate=False))["fits"]

  per_chip = guess
  if fits(per_chip):
    while per_chip < MAX_PER_CHIP and fits(2 * per_chip):
      per_chip *= 2
    return per_chip
  while per_chip > 1:
    per_chip //= 2
    if fits(per_chip):
      return per_chip
  return None


def table(runs: Runs, args) -> str:
  rows = [
    "| model | phase (seq) | chip | remat | batch per chip | memory per chip / HBM | XLA step time "
    "| tokens/s per chip | MFU |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  chips = sorted(args.chips, key=lambda c: aot.GENERATIONS[c].hbm_gib)  # the smallest HBM first
  for model in args.models:
    for phase in args.phases:
      seq = 128 if phase == "1" else 512
      for remat in args.remat:
        guess = FIRST_GUESS[seq]
        for i, chip in enumerate(chips):
          per_chip = largest_fitting(runs, model, phase, chip, remat, guess)
          cell = f"| {model} | {phase} ({seq}) | {chip} | {remat} |"
          if per_chip is None:
            rows.append(f"{cell} none fits | | | | |")
            continue
          f = runs.get(command(model, phase, chip, remat, per_chip, estimate=True))
          step = f["estimated_step_s"]
          tokens = "" if step is None else f"{f['estimated_tokens_per_s'] / CHIPS:,.0f}"
          mfu = "" if f["estimated_mfu"] is None else f"{100 * f['estimated_mfu']:.0f}%"
          rows.append(
            f"{cell} {per_chip} | {f['memory_per_device_gib']:.1f} / {f['hbm_gib']:.1f} GiB | "
            f"{'' if step is None else f'{1000 * step:.0f} ms'} | {tokens} | {mfu} |"
          )
          if i + 1 < len(chips):  # the next chip has more HBM: start its search that much higher
            ratio = aot.GENERATIONS[chips[i + 1]].hbm_gib / aot.GENERATIONS[chip].hbm_gib
            guess = per_chip * 2 ** math.floor(math.log2(ratio))
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
