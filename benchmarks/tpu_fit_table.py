"""The per-chip batch that fits a TPU chip, and XLA's step time there: docs/scaling.md's table.

    python benchmarks/tpu_fit_table.py OUT_DIR [--models base,large] [--phases 1,2]
        [--chips v5e,v5p,v6e] [--remat none,full] [--attention auto] [--scan] [--report]

Every figure comes from `bertjax train --dry-run --compile --json` (libtpu, no TPU needed), run
as a subprocess on a 4-chip data-parallel slice of each generation; per-chip memory under data
parallelism does not depend on the slice's size. For each model, phase and rematerialisation the
search looks for the largest power-of-two batch per chip that XLA says fits (the next one does
not). It starts above the batch it expects to fit and halves: a compile that runs out of memory
fails within seconds, one that fits takes minutes, so the search compiles as few fitting batches
as it can. The first guess on the chip with the least HBM is `FIRST_GUESS` (times `REMAT_HEADROOM`
with rematerialisation); each next chip starts from the last one's batch times their HBM ratio,
doubled. Every compile reports XLA's estimates too (for the unrolled layers of `configs/base.py`
and `large.py` they come from the compiled program itself, at no extra cost), so the row's
figures are those of its largest fitting compile.

`--remat` takes any of `model.remat`'s policies (bertjax.model.config.REMAT_POLICIES), and
`--attention` any `model.attention_impl` (`pallas`: the Mosaic kernel with the dropout inside). `--scan`
compiles the layers scanned (`model.scan_layers=true`): one traced layer, so a compile takes a
fraction of the unrolled one's time. The search then compiles without estimates
(`--no-estimate`, memory only), and the largest fitting batch once more with them, which
compiles the 3- and 4-layer unrolled programs the scanned step's time is scaled from.

Each command's JSON line, tagged with `RECORDS`, is appended to OUT_DIR/runs.jsonl, so an
interrupted table resumes where it stopped; lines with another tag are compiled again. The
markdown table is printed at the end; `--report` prints it from runs.jsonl alone, compiling
nothing (a cell whose search is not complete says "not compiled yet").
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bertjax.perf import tpu as tpu_lib

SLICES = {"v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}  # 4 chips each
CHIPS = 4
CONFIGS = {"base": "configs/base.py", "large": "configs/large.py"}
FIRST_GUESS = {128: 256, 512: 32}  # per chip on the smallest chip (v5e), by sequence length: near the limit
# Full rematerialisation keeps one activation a layer instead of a dozen: its search starts this
# many times higher (a guess too high costs a failed compile, seconds; one too low, a fitting one).
# The policies between them keep some of a layer's activations: in between.
REMAT_HEADROOM = {
  "none": 1,
  "dots": 2,
  "dots_except_mlp_wide": 2,
  "attention_out_mlp_in": 8,
  "offload_dots": 16,
  "full": 16,
}
MAX_PER_CHIP = 4096
# The tag of runs.jsonl's lines: a change to what a step compiles to (its memory or its cost)
# changes it, so that older lines are compiled again.
RECORDS = "hash masks, the Mosaic attention kernel by default, two estimates"


def command(
  model: str,
  phase: str,
  chip: str,
  remat: str,
  per_chip: int,
  scan: bool = False,
  estimate=True,
  attention: str = "auto",
  layers: int | None = None,
) -> list[str]:
  """The `bertjax train --dry-run --compile --json` command of one table cell."""
  scanned = ["--config.model.scan_layers=true"] + ([] if estimate else ["--no-estimate"])
  # Flags that keep their defaults are left out, so that a command's line in runs.jsonl is the same.
  extra = [] if attention == "auto" else [f"--config.model.attention_impl={attention}"]
  extra += [] if layers is None else [f"--config.model.num_layers={layers}"]
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
    f"--config.train.batch_size={per_chip * CHIPS}",
    f"--config.model.remat={remat}",
    *(scanned if scan else []),
    *extra,
  ]


class NotCompiled(Exception):
  """A command that `--report` finds no line for."""


class Runs:
  """The JSON lines of the commands run so far, by command; runs a command not yet there (with
  `compile=False`, raises NotCompiled instead)."""

  def __init__(self, out: Path, compile: bool = True):
    self.path = out / "runs.jsonl"
    self.compile = compile
    self.done = {}
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        record = json.loads(line)
        if record.get("records") == RECORDS:
          self.done[" ".join(record["command"])] = record["figures"]

  def get(self, argv: list[str]) -> dict:
    key = " ".join(argv)
    if key not in self.done and not self.compile:
      raise NotCompiled(key)
    if key not in self.done:
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, "-m", "bertjax", *argv[1:]], capture_output=True, text=True)
      if proc.returncode != 0:
        raise SystemExit(f"{key} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
      figures = json.loads(proc.stdout.strip().splitlines()[-1])
      with self.path.open("a") as f:
        f.write(json.dumps({"records": RECORDS, "command": argv, "figures": figures}) + "\n")
      self.done[key] = figures
      print(f"{time.perf_counter() - start:6.0f} s  {key}  fits={figures['fits']}", flush=True)
    return self.done[key]


def largest_fitting(
  runs: Runs, model: str, phase: str, chip: str, remat: str, guess: int, scan: bool = False, attention: str = "auto"
) -> int | None:
  """The largest power-of-two batch per chip that fits: halving from `guess`, doubling if `guess` fits."""

  def fits(per_chip: int) -> bool:
    return runs.get(command(model, phase, chip, remat, per_chip, scan, not scan, attention))["fits"]

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
    "| model | phase (seq) | chip | remat | attention | batch per chip | memory per chip / HBM | step time: roofline "
    "| step time: scheduled | tokens/s per chip (scheduled) | MFU: roofline | MFU: scheduled |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  chips = sorted(args.chips, key=lambda c: tpu_lib.GENERATIONS[c].hbm_gib)  # the smallest HBM first
  for model in args.models:
    for phase in args.phases:
      seq = 128 if phase == "1" else 512
      for remat in args.remat:
        guess = min(MAX_PER_CHIP, FIRST_GUESS[seq] * REMAT_HEADROOM[remat])
        for i, chip in enumerate(chips):
          cell = f"| {model} | {phase} ({seq}) | {chip} | {remat} | {args.attention} |"
          try:
            per_chip = largest_fitting(runs, model, phase, chip, remat, guess, args.scan, args.attention)
            f = None
            if per_chip is not None:
              f = runs.get(command(model, phase, chip, remat, per_chip, args.scan, attention=args.attention))
          except NotCompiled:  # and the next chips' searches start from this one's result
            rows.extend(
              f"| {model} | {phase} ({seq}) | {c} | {remat} | {args.attention} | not compiled yet | | | | | | |"
              for c in chips[i:]
            )
            break
          if per_chip is None:
            rows.append(f"{cell} none fits | | | | | | |")
            continue
          batch = f"≥ {per_chip}" if per_chip == MAX_PER_CHIP else str(per_chip)  # the search's cap fits
          rows.append(
            f"{cell} {batch} | {f['memory_per_device_gib']:.1f} / {f['hbm_gib']:.1f} GiB | "
            f"{_ms(f['estimated_step_s'])} | {_ms(f['scheduled_step_s'])} | "
            f"{_per_chip(f['scheduled_tokens_per_s'])} | {_pct(f['estimated_mfu'])} | {_pct(f['scheduled_mfu'])} |"
          )
          if i + 1 < len(chips):  # the next chip has more HBM: start its search above that much more
            ratio = tpu_lib.GENERATIONS[chips[i + 1]].hbm_gib / tpu_lib.GENERATIONS[chip].hbm_gib
            guess = min(MAX_PER_CHIP, per_chip * 2 ** (math.floor(math.log2(ratio)) + 1))
  return "\n".join(rows)


def _ms(seconds: float | None) -> str:
  return "" if seconds is None else f"{1000 * seconds:.0f} ms"


def _per_chip(tokens_per_s: float | None) -> str:
  return "" if tokens_per_s is None else f"{tokens_per_s / CHIPS:,.0f}"


def _pct(fraction: float | None) -> str:
  return "" if fraction is None else f"{100 * fraction:.0f}%"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", type=Path)
  parser.add_argument("--models", default="base,large")
  parser.add_argument("--phases", default="1,2")
  parser.add_argument("--chips", default="v5e,v5p,v6e")
  parser.add_argument("--remat", default="none,full")
  parser.add_argument("--attention", default="auto", help="model.attention_impl: auto | xla | pallas")
  parser.add_argument("--scan", action="store_true", help="layers scanned (model.scan_layers=true): faster compiles")
  parser.add_argument("--report", action="store_true", help="the table of OUT_DIR/runs.jsonl alone: compile nothing")
  args = parser.parse_args()
  for key in ("models", "phases", "chips", "remat"):
    setattr(args, key, getattr(args, key).split(","))
  args.out.mkdir(parents=True, exist_ok=True)
  print(table(Runs(args.out, compile=not args.report), args))


if __name__ == "__main__":
  main()
