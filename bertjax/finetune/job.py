"""A fine-tuning run: resume or start from --init, then the one loop; its results once complete.

    finetune(config, workdir, data)    to finetune.epochs epochs, evaluating on the dev split(s)
                                       at the end of each; checkpoints every
                                       checkpoint.every_steps, at the end and on SIGTERM/SIGINT
                                       (the same command resumes)
    evaluate_checkpoint(config, workdir, step)   what `bertjax eval` prints for a fine-tune run

The loop, checkpoints, the workdir's lease, the preemption guard and the metrics are pretraining's
(`bertjax.train.loop`); this module says what a fine-tune puts in them: its epochs, its dev
evaluation at each epoch's end, the task in the checkpoint metadata (a resume of another task is
refused). At the end, process 0 writes WORKDIR/eval_results.json (the last dev metrics) and, for
QA, WORKDIR/predictions.json (question id -> answer, the official scripts' input) and for SQuAD
2.0 null_odds.json; each is written whole or not at all, and only once the run is complete.
"""

import contextlib
import json
import logging

from etils import epath

from bertjax import atomic
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune import fingerprint
from bertjax.finetune import init as init_lib
from bertjax.finetune import run as run_lib
from bertjax.metrics import flops as flops_lib
from bertjax.train import checkpoint, compatibility
from bertjax.train import loop as loop_lib

log = logging.getLogger(__name__)
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.json"
NULL_ODDS_FILE = "null_odds.json"


def _task_meta(run: run_lib.Run) -> dict:
  spec = run.data.spec
  return {"kind": spec.kind, "name": spec.name, "labels": list(spec.labels), "regression": spec.regression}


def _checkpoint_meta(run: run_lib.Run) -> dict:
  return {
    **loop_lib.run_facts(run.config, run.model_config, run.data.tokenizer, run.steps.mesh),
    "task": _task_meta(run),
  }


def _describe(task: dict) -> str:
  """A saved task for people: `custom (classes no, yes)`, `stsb (a regression)`, `swag (multiple_choice)`."""
  if task.get("regression"):
    return f"{task.get('name')} (a regression)"
  if task.get("labels"):
    return f"{task.get('name')} (classes {', '.join(task['labels'])})"
  return f"{task.get('name')} ({task.get('kind')})"


def _check_resumable(run: run_lib.Run, source: str):
  def check(meta: dict) -> None:
    compatibility.check_compatible(meta, run.model_config, run.data.tokenizer.fingerprint, source)
    saved, current = meta.get("task", {}), _task_meta(run)
    if saved != current:
      raise BertjaxError(
        f"{source} holds a fine-tune of {_describe(saved)}, not of {_describe(current)}; use a new workdir"
      )

  return check


def finetune(
  config,
  workdir,
  data: run_lib.Data | None = None,
  *,
  step: int | None = None,
  overwrite: bool = False,
  inputs: dict | None = None,
) -> loop_lib.Result:
  """Fine-tune to finetune.epochs: resume WORKDIR's newest good checkpoint (or `step`), or start
  from finetune.init. `data` is run.prepare's (read before anything is written).

  Args:
    config: a validated fine-tuning config (`init.load_config`).
    workdir: the run folder.
    data: `run.prepare(config)`'s result; None prepares it here.
    step: the checkpoint step to resume from; None takes the newest restorable one.
    overwrite: replace a run of other inputs (or the same) in WORKDIR instead of refusing it.
    inputs: `fingerprint.of_run(config)` when the caller has it already (it hashes the data files).
  Raises:
    BertjaxError: the task's data is unusable (when `data` is None), WORKDIR holds a run of other
      inputs (without `overwrite`), is in use or unwritable, its checkpoint is of another model,
      tokenizer or task, or the --init run has no usable checkpoint.
  """
  data = run_lib.prepare(config) if data is None else data
  current = fingerprint.of_run(config) if inputs is None else inputs
  if not overwrite:
    _check_same_inputs(workdir, current)
  run = run_lib.setup(config, workdir, data)  # writes nothing
  # A fresh run reads its --init before anything is written: a refused one leaves no trace.
  fresh = overwrite or (step is None and not _has_checkpoints(run.workdir))
  state = init_lib.warm_start(run, config.finetune.init) if fresh else None

  def held():  # the workdir's lease is held: no other run uses what is replaced here
    if overwrite:
      _remove_run(run.workdir)
    return run

  with contextlib.ExitStack() as stack:
    _, workdir_lock, checkpoints = loop_lib.open_workdir(stack, workdir, config, held)
    if state is None:
      state, meta = checkpoints.restore(
        run.steps.abstract_state(), step, check=_check_resumable(run, f"--workdir {run.workdir}")
      )
      log.info("resumed from checkpoint step %d in %s", meta["step"], checkpoints.dir)
    run_lib.write_run_files(run)  # only once the workdir is known to hold this run (or nothing)
    if run.is_primary:
      fingerprint.write(run.workdir, current)
    return loop_lib.fit(job(run), state, checkpoints, workdir_lock, stack)


def _check_same_inputs(workdir, current: dict) -> None:
  """Refuse a workdir whose run was made of other inputs: its results would not be this run's."""
  saved = fingerprint.read(workdir)
  said = fingerprint.differences(saved, current) if saved is not None else []
  if said:
    raise BertjaxError(
      f"--workdir {workdir} holds a fine-tune of other inputs ({'; '.join(said)}); "
      "use a new workdir, or --overwrite to replace that run"
    )


# What a fine-tune writes into its workdir (the lease aside): what --overwrite replaces.
_RUN_FILES = ("checkpoints", "tb", "profile", "tokenizer", "metrics.jsonl", "config.json", fingerprint.FILENAME)
_RUN_PATTERNS = (RESULTS_FILE, "predictions*.json", "null_odds*.json")


def _remove_run(workdir: epath.Path) -> None:
  doomed = [workdir / name for name in _RUN_FILES]
  doomed += [path for pattern in _RUN_PATTERNS for path in workdir.glob(pattern)]
  for path in (p for p in doomed if p.exists()):
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink()
  log.info("--overwrite: removed the earlier run's files from %s", workdir)


def _has_checkpoints(workdir: epath.Path) -> bool:
  """Whether the workdir holds a checkpoint step: then the run resumes (read only)."""
  if not (workdir / checkpoint.CHECKPOINT_DIR).exists():
    return False
  with checkpoint.Checkpoints(workdir, read_only=True) as existing:
    return bool(existing.steps())


@contextlib.contextmanager
def _batches(run: run_lib.Run, start: int):
  yield (run.train_batch(step) for step in range(start, run.total_steps))


def job(run: run_lib.Run) -> loop_lib.Job:
  """What a fine-tune gives the one loop: its epochs, its dev evaluation at each epoch's end, and
  its results files once complete."""
  per_epoch = run.order.steps_per_epoch
  answered = {}

  def evaluate(params) -> dict[str, float]:
    final, found = run_lib.evaluate(run, params)
    answered.clear()
    answered.update(found)
    return final

  return loop_lib.Job(
    config=run.config,
    workdir=run.workdir,
    steps=run.steps,
    total_steps=run.total_steps,
    batches=lambda start: _batches(run, start),
    evaluate=evaluate,
    eval_due=lambda done: done % per_epoch == 0,
    checkpoint_meta=lambda step: _checkpoint_meta(run),
    epoch_of=lambda done: done / per_epoch,
    flops_per_sequence=flops_lib.flops_per_sequence(run.model_config, run.config.finetune.max_seq_len, 0),
    finish=lambda step, final: _write_results(run, step, final, answered),
  )


def _write_results(run: run_lib.Run, step: int, final: dict, answered: dict) -> None:
  """eval_results.json (and QA predictions), written whole by process 0 once the run is complete."""
  if not run.is_primary:
    return
  results = {"step": step, "task": run.data.spec.name, **final}
  atomic.write_text(run.workdir / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
  for split, found in answered.items():
    suffix = "" if split == "dev" else f"_{split}"
    atomic.write_text(
      run.workdir / PREDICTIONS_FILE.replace(".json", f"{suffix}.json"), json.dumps(found["predictions"])
    )
    if run.config.finetune.squad_v2:
      atomic.write_text(run.workdir / NULL_ODDS_FILE.replace(".json", f"{suffix}.json"), json.dumps(found["null_odds"]))


def results_files(workdir) -> list[str]:
  """The results a complete run wrote into `workdir`: eval_results.json, and for QA the predictions
  and null odds of each dev split."""
  workdir = epath.Path(workdir)
  written = [workdir / RESULTS_FILE] + [p for pattern in _RUN_PATTERNS[1:] for p in sorted(workdir.glob(pattern))]
  return [p.name for p in written if p.exists()]


def read_results(workdir) -> dict | None:
  """A complete run's eval_results.json, or None."""
  path = epath.Path(workdir) / RESULTS_FILE
  return json.loads(path.read_text()) if path.exists() else None


def evaluate_checkpoint(config, workdir, *, step: int | None = None) -> dict:
  """The dev metrics of a saved step (default: the newest good one), as `bertjax eval` prints."""
  workdir = epath.Path(workdir)
  tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
  data = run_lib.prepare(config, tokenizer, with_train=False)
  run = run_lib.setup(config, workdir, data)
  with checkpoint.Checkpoints(run.workdir, read_only=True) as checkpoints:
    if not checkpoints.steps():
      raise BertjaxError(f"--workdir {workdir}: no checkpoints there; fine-tune first")
    params, meta = checkpoints.restore_params(
      run.steps.abstract_state().params, step, check=_check_resumable(run, f"--workdir {workdir}")
    )
  final, _ = run_lib.evaluate(run, params)
  return {"step": meta["step"], "task": run.data.spec.name, **final}
