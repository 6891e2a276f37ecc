"""`bertjax glue`: every GLUE task, several seeds each, and a results table like the paper's.

    run_suite(spec, overrides, init=..., data=..., workdir=..., task_names=..., seeds=...)

Each (task, seed) is an ordinary fine-tuning run in WORKDIR/TASK/seed-S (train.seed = S: the
head's initialisation, dropout and data order), so the suite resumes like any run: a complete one
is read back from its eval_results.json, an interrupted one continues from its checkpoint. A
task's data is read and tokenised once for all its seeds. Every task's folder is checked before
the first run starts.

The table reports, per task and metric, the median over seeds and their spread (lowest and
highest), in percent as the paper does. A task's score is the mean of its metrics (GLUE's
convention: MRPC and QQP average F1 and accuracy, STS-B Pearson and Spearman, MNLI its matched
and mismatched accuracy); the average is the mean of the tasks' median scores, WNLI left out as
in the paper. WORKDIR/glue_results.json holds task -> metric -> the values per seed and their
median (and "average"); WORKDIR/glue_results.md the table. Both are written, whole, once every
run is complete.
"""

import json
import logging
import statistics
import time

from etils import epath

from bertjax import atomic, tasks
from bertjax.errors import BertjaxError
from bertjax.finetune import init as init_lib
from bertjax.finetune import job, sources
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


def run_suite(spec: str, overrides, *, init: str, data: str, workdir, task_names: list[str], seeds: int) -> dict | None:
  """Fine-tune every task with seeds 0..seeds-1 and write the results; None when a signal
  stopped a run (its checkpoint is saved: the same command resumes)."""
  if seeds < 1:
    raise BertjaxError(f"--seeds {seeds}: give at least 1")
  for name in task_names:
    sources.glue_task_folder(data, name)  # a missing task fails before any run starts
  workdir = epath.Path(workdir)
  values: dict[str, dict[str, list[float]]] = {}
  for name in task_names:
    prepared, started = None, time.perf_counter()
    for seed in range(seeds):
      run_dir = workdir / name / f"seed-{seed}"
      results = job.read_results(run_dir)
      if results is None:
        config = init_lib.load_config(
          spec,
          [*overrides, f"finetune.glue_task={name}", f"finetune.data={data}", f"train.seed={seed}"],
          task="classification",
          init=init,
        )
        prepared = prepared or run_lib.prepare(config)  # the data does not depend on the seed
        if job.finetune(config, run_dir, prepared).stopped_by:
          return None
        results = job.read_results(run_dir)
      for metric in tasks.metric_names(tasks.glue_spec(name)):
        values.setdefault(name, {}).setdefault(metric, []).append(float(results[metric]))
    log.info("%s: %d seed(s) in %.0f s", name, seeds, time.perf_counter() - started)
  summary = summarise(values)
  atomic.write_text(workdir / RESULTS_JSON, json.dumps(summary, indent=1) + "\n")
  atomic.write_text(workdir / RESULTS_MD, format_table(summary, seeds))
  return summary


def summarise(values: dict[str, dict[str, list[float]]]) -> dict:
  """task -> metric -> {values, median, min, max}, and the average of the tasks' median scores."""
  summary: dict = {}
  scores = {}
  for name, metrics in values.items():
    summary[name] = {
      metric: {"values": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
      for metric, v in metrics.items()
    }
    scores[name] = statistics.mean(entry["median"] for entry in summary[name].values())
  averaged = [name for name in scores if name not in tasks.GLUE_AVERAGE_EXCLUDES]
  if averaged:
    summary["average"] = {"score": {"median": statistics.mean(scores[n] for n in averaged), "tasks": averaged}}
  return summary


def format_table(summary: dict, seeds: int) -> str:
  """The results as a Markdown table, in percent: median and (min-max) over the seeds."""
  lines = [
    f"GLUE dev results, {seeds} seed(s) per task: median (lowest-highest), in percent",
    "",
    "| task | metric | median | spread | per seed |",
    "|---|---|---:|---:|---|",
  ]
  for name, metrics in summary.items():
    if name == "average":
      continue
    for metric, entry in metrics.items():
      per_seed = " / ".join(f"{100 * v:.1f}" for v in entry["values"])
      spread = f"{100 * entry['min']:.1f}-{100 * entry['max']:.1f}"
      lines.append(f"| {name} | {metric} | {100 * entry['median']:.1f} | {spread} | {per_seed} |")
  if "average" in summary:
    average = summary["average"]["score"]
    left_out = [n for n in summary if n in tasks.GLUE_AVERAGE_EXCLUDES]
    label = "average" + (f" (without {', '.join(left_out)})" if left_out else "")
    lines.append(f"| {label} | task scores | {100 * average['median']:.1f} | | |")
  return "\n".join(lines) + "\n"
