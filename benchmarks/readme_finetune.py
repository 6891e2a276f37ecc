"""Does the README's fine-tuning example learn? The tiny model of `make train`, fine-tuned on an
easy sentence-pair task with the recipe's default learning rate (the model's width decides) and
with the paper's 2e-5 for BERT-base.

    python benchmarks/readme_finetune.py OUT_DIR [--init runs/tiny] [--task key|shared]

Without --init it pretrains the tiny model first, as `make train` does (configs/tiny.py). The
tasks (chance 50%): `key`, two texts of three common words each, the label says whether the
second holds a key word; `shared`, whether the two texts share a word (the model must compare
its two segments). Prints one JSON line per learning rate with the dev accuracy.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

WORDS = "the function module value list string file class object return type name error default".split()


def _shared(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    first = list(rng.choice(WORDS, 3, replace=False))
    rest = [w for w in WORDS if w not in first]
    second = list(rng.choice(rest, 3, replace=False))
    shared = rng.random() < 0.5
    if shared:
      second[rng.integers(3)] = first[rng.integers(3)]
    rows.append({"text": " ".join(first), "text_pair": " ".join(second), "label": "yes" if shared else "no"})
  return rows


def _pairs(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  key, fillers = WORDS[0], WORDS[1:]
  rows = []
  for _ in range(n):
    first, second = list(rng.choice(fillers, 3)), list(rng.choice(fillers, 3))
    if rng.random() < 0.5:
      first[rng.integers(3)] = key
    in_second = rng.random() < 0.5
    if in_second:
      second[rng.integers(3)] = key
    rows.append({"text": " ".join(first), "text_pair": " ".join(second), "label": "yes" if in_second else "no"})
  return rows


def _bertjax(*args: str) -> str:
  done = subprocess.run([sys.executable, "-m", "bertjax", *args], capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
  return done.stdout


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=Path)
  parser.add_argument("--init", type=Path)
  parser.add_argument("--task", choices=("key", "shared"), default="key")
  args = parser.parse_args()
  make = _pairs if args.task == "key" else _shared
  args.out.mkdir(parents=True, exist_ok=True)
  init = args.init or args.out / "tiny"
  if args.init is None:
    _bertjax("train", "--config", "tiny", "--workdir", str(init))
  for split, n, seed in (("train", 2000, 1), ("dev", 400, 2)):
    (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)))
  for lr in ("", "2e-5"):
    workdir = args.out / f"{args.task}-lr-{lr or 'default'}"
    spec = "finetune/classification.py" + (f":lr={lr}" if lr else "")
    data = [f"finetune.train_file={args.out}/train.jsonl", f"finetune.dev_file={args.out}/dev.jsonl"]
    _bertjax(
      "finetune",
      "--task",
      "classification",
      "--config",
      spec,
      "--init",
      str(init),
      "--workdir",
      str(workdir),
      *(f"--config.{o}" for o in [*data, "finetune.labels=no,yes", "finetune.max_seq_len=32"]),
    )
    results = json.loads((workdir / "eval_results.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    print(
      json.dumps(
        {"task": args.task, "lr": config["optim"]["lr"], "accuracy": results["accuracy"], "steps": results["step"]}
      )
    )


if __name__ == "__main__":
  main()
