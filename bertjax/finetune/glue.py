"""`bertjax glue`: every GLUE task over a learning-rate grid and several seeds, as the paper does.

    run_suite(spec, overrides, init=..., data=..., workdir=..., task_names=..., seeds=..., lrs=...)

Each (task, learning rate, seed) is an ordinary fine-tuning run in WORKDIR/TASK/lr-LR/seed-S
(WORKDIR/TASK/seed-S without a grid: the config's learning rate), train.seed = S: the head's
initialisation, dropout and data order. The suite resumes like any run: a complete run of the
same inputs (its fingerprint, `finetune/fingerprint.py`) is read back from its eval_results.json,
an interrupted one continues from its checkpoint, and a run made of other inputs (another --init,
changed data, another recipe) is trained again, saying why. A task's data is read and tokenised
once for all its runs. Every task's folder is checked before the first run starts.

The paper picks each task's learning rate on the dev set among 5e-5, 4e-5, 3e-5 and 2e-5: here
the grid's learning rate whose runs have the highest median task score over the seeds is
selected, and the table reports its median and spread (lowest and highest) over the seeds, in
percent. A task's score is the mean of its metrics (GLUE's convention: MRPC and QQP average F1 and
accuracy, STS-B Pearson and Spearman, MNLI its matched and mismatched accuracy); the average is
the mean of the tasks' selected median scores, WNLI left out as in the paper.
WORKDIR/glue_results.json holds task -> the selected learning rate, its metrics (values per seed,
median, min, max) and the whole grid (each learning rate's metrics and median score), and the
"average"; WORKDIR/glue_results.md the table. Both are written, whole, once every run is complete.
"""

import json
import logging
import statistics
import time

from etils import epath

from bertjax import atomic, tasks
from bertjax.errors import BertjaxError
from bertjax.finetune import fingerprint, job, sources
from bertjax.finetune import init as init_lib
from bertjax.finetune import run as run_lib

log = logging.getLogger(__name__)
RESULTS_JSON = "glue_results.json"
RESULTS_MD = "glue_results.md"
# The paper's column order (Table 1), then the task it leaves out.
ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")


def parse_tasks(text: str) -> list[str]:
  """`--tasks sst2,mrpc` (empty: all of GLUE) in the paper's order."""
  names = tasks.split_list(text.lower()) or list(ORDER)
  unknown = [n for n in names if n not in tasks.GLUE]
  if unknown:
    raise BertjaxError(f"--tasks: {unknown[0]!r} is not a GLUE task; choose among {','.join(ORDER)}")
  return sorted(set(names), key=ORDER.index)


def parse_lrs(text: str) -> list[float | None]:
  """`--lrs 5e-5,4e-5` as numbers; empty: [None], the config's own learning rate."""
  try:
    lrs = [float(x) for x in tasks.split_list(text)]
  except ValueError:
    raise BertjaxError(f"--lrs {text}: give learning rates separated by commas, e.g. 5e-5,4e-5,3e-5,2e-5") from None
  if any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs):
    raise BertjaxError(f"--lrs {text}: give distinct positive learning rates, e.g. 5e-5,4e-5,3e-5,2e-5")
  return lrs or [None]


def _run_dir(workdir: epath.Path, name: str, lr: float | None, seed: int) -> epath.Path:
  return workdir / name / (f"lr-{lr:g}" if lr is not None else "") / f"seed-{seed}"


def _results(run_dir: epath.Path, config, label: str, prepared) -> tuple[dict | None, object]:
  """(eval_results of the run in `run_dir`, trained or reused; None when a signal stopped it), and
  the task's prepared data (read once for all its runs)."""
  saved, current = fingerprint.read(run_dir), fingerprint.of_run(config)
  said = fingerprint.differences(saved, current) if saved is not None else []
  results = job.read_results(run_dir)
  if results is not None and saved is not None and not said:
    log.info("%s: reusing its complete run (the same inputs)", label)
    return results, prepared
  stale = bool(said) or (results is not None and saved is None)  # a result of other (or unknown) inputs
  if stale:
    why = "; ".join(said) if said else "no record of its inputs"
    log.info("%s: training again, its earlier run was of other inputs (%s)", label, why)
  prepared = prepared or run_lib.prepare(config)  # the data depends on neither seed nor rate
  if job.finetune(config, run_dir, prepared, overwrite=stale, inputs=current).stopped_by:
    return None, prepared
  return job.read_results(run_dir), prepared


def run_suite(
  spec: str,
  overrides,
  *,
  init: str,
  data: str,
  workdir,
  task_names: list[str],
  seeds: int,
  lrs: list[float | None] = (None,),
) -> dict | None:
  """Fine-tune every task with every learning rate of `lrs` and seeds 0..seeds-1, select the
  rate on the dev set and write the results; None when a signal stopped a run (its checkpoint is
  saved: the same command resumes)."""
  if seeds < 1:
    raise BertjaxError(f"--seeds {seeds}: give at least 1")
  for name in task_names:
    sources.glue_task_folder(data, name)  # a missing task fails before any run starts
  workdir = epath.Path(workdir)
  grid: dict[str, dict] = {}
  for name in task_names:
    prepared, started = None, time.perf_counter()
    for lr in lrs:
      rate = [f"optim.lr={lr}"] if lr is not None else []
      for seed in range(seeds):
        config = init_lib.load_config(
          spec,
          [*overrides, *rate, f"finetune.glue_task={name}", f"finetune.data={data}", f"train.seed={seed}"],
          task="classification",
          init=init,
        )
        label = f"{name} lr {config.optim.lr:g} seed {seed}"
        results, prepared = _results(_run_dir(workdir, name, lr, seed), config, label, prepared)
        if results is None:
          return None
        values = grid.setdefault(name, {}).setdefault(config.optim.lr, {})
        for metric in tasks.metric_names(tasks.glue_spec(name)):
          values.setdefault(metric, []).append(float(results[metric]))
    log.info("%s: %d run(s) in %.0f s", name, len(lrs) * seeds, time.perf_counter() - started)
  summary = summarise(grid)
  atomic.write_text(workdir / RESULTS_JSON, json.dumps(summary, indent=1) + "\n")
  atomic.write_text(workdir / RESULTS_MD, format_table(summary, seeds))
  return summary


def _stats(values: list[float]) -> dict:
  return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(grid: dict[str, dict[float, dict[str, list[float]]]]) -> dict:
  """task -> {learning_rate, metrics, grid}: the rate with the highest median task score over the
  seeds, its metrics' values, median, min and max, and every rate's; and the average of the
  selected median scores."""
  summary: dict = {}
  scores = {}
  for name, by_lr in grid.items():
    rows = {}
    for lr, metrics in by_lr.items():
      stats = {metric: _stats(v) for metric, v in metrics.items()}
      per_seed = [statistics.mean(run) for run in zip(*metrics.values(), strict=True)]  # each run's task score
      rows[lr] = {"metrics": stats, "score": statistics.median(per_seed)}
    best = max(rows, key=lambda lr: rows[lr]["score"])
    summary[name] = {
      "learning_rate": best,
      "metrics": rows[best]["metrics"],
      "grid": {f"{lr:g}": row for lr, row in rows.items()},
    }
    scores[name] = rows[best]["score"]
  averaged = [name for name in scores if name not in tasks.GLUE_AVERAGE_EXCLUDES]
  if averaged:
    summary["average"] = {"score": {"median": statistics.mean(scores[n] for n in averaged), "tasks": averaged}}
  return summary


def format_table(summary: dict, seeds: int) -> str:
  """The results as a Markdown table, in percent: the selected learning rate's median and
  (min-max) over the seeds."""
  lines = [
    f"GLUE dev results, {seeds} seed(s) per learning rate: the rate selected on dev, median (lowest-highest), "
    "in percent",
    "",
    "| task | learning rate | metric | median | spread | per seed |",
    "|---|---:|---|---:|---:|---|",
  ]
  for name, entry in summary.items():
    if name == "average":
      continue
    grid = f" (of {', '.join(entry['grid'])})" if len(entry["grid"]) > 1 else ""
    for metric, stats in entry["metrics"].items():
      per_seed = " / ".join(f"{100 * v:.1f}" for v in stats["values"])
      spread = f"{100 * stats['min']:.1f}-{100 * stats['max']:.1f}"
      lr = f"{entry['learning_rate']:g}{grid}"
      lines.append(f"| {name} | {lr} | {metric} | {100 * stats['median']:.1f} | {spread} | {per_seed} |")
  if "average" in summary:
    average = summary["average"]["score"]
    left_out = [n for n in summary if n in tasks.GLUE_AVERAGE_EXCLUDES]
    label = "average" + (f" (without {', '.join(left_out)})" if left_out else "")
    lines.append(f"| {label} | | task scores | {100 * average['median']:.1f} | | |")
  return "\n".join(lines) + "\n"
