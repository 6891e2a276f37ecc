"""The fine-tuning loop: resume or start from --init; step, log, evaluate every epoch, checkpoint.

    finetune(config, workdir, data)    to finetune.epochs epochs, evaluating on the dev split(s)
                                       at the end of each; checkpoints every
                                       checkpoint.every_steps, at the end and on SIGTERM/SIGINT
                                       (the same command resumes)
    evaluate_checkpoint(config, workdir, step)   what `bertjax eval` prints for a fine-tune run

It keeps pretraining's conventions and reuses its parts: orbax checkpoints with manifests
(bertjax.train.checkpoint), the workdir's lease (one run per workdir), the preemption guard,
metrics.jsonl and TensorBoard, the progress line; no periodic checkpoint is saved while steps are
skipped for a non-finite gradient. Metrics are read back one step late, so the host never waits
on the device. At the end, process 0 writes WORKDIR/eval_results.json (the last dev metrics)
and, for QA, WORKDIR/predictions.json (question id -> answer, the official scripts' input) and
for SQuAD 2.0 null_odds.json; each is written whole or not at all, and only once the run is
complete.
"""

import contextlib
import dataclasses
import json
import logging
import time

import jax
from etils import epath

from bertjax import atomic
from bertjax.config import loading as config_loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune import run as run_lib
from bertjax.metrics.progress import ProgressBar
from bertjax.metrics.writer import MetricsWriter
from bertjax.parallel.layout import MESH_AXES
from bertjax.train import checkpoint, compatibility, lock, optim, save_failures, saving
from bertjax.train.preemption import PreemptionGuard
from bertjax.train.steps import TrainState

log = logging.getLogger(__name__)
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.json"
NULL_ODDS_FILE = "null_odds.json"


@dataclasses.dataclass
class Result:
  """What `finetune` returns: the final dev metrics and train state."""

  final: dict[str, float]  # the dev metrics at the end ({} when stopped early)
  state: TrainState
  stopped_by: str | None = None  # the signal that stopped the run, after saving


def _task_meta(run: run_lib.Run) -> dict:
  spec = run.data.spec
  return {"kind": spec.kind, "name": spec.name, "labels": list(spec.labels), "regression": spec.regression}


def _checkpoint_meta(run: run_lib.Run) -> dict:
  return {
    "config": config_loading.to_dict(run.config),
    "model": compatibility.model_sizes(run.model_config),
    "tokenizer_fingerprint": run.data.tokenizer.fingerprint,
    "task": _task_meta(run),
    "mesh": dict(zip(MESH_AXES, run.steps.mesh.devices.shape)),
    "process_count": jax.process_count(),
  }


def _describe(task: dict) -> str:
  if task.get("regression"):
    return f"{task.get('name')} (a regression)"
  return f"{task.get('name')} (classes {', '.join(task.get('labels', []))})" if task.get("labels") else str(task)


def _check_resumable(run: run_lib.Run, source: str):
  def check(meta: dict) -> None:
    compatibility.check_compatible(meta, run.model_config, run.data.tokenizer.fingerprint, source)
    saved, current = meta.get("task", {}), _task_meta(run)
    if saved != current:
      raise BertjaxError(
        f"{source} holds a fine-tune of {_describe(saved)}, not of {_describe(current)}; use a new workdir"
      )

  return check


def finetune(config, workdir, data: run_lib.Data | None = None, *, step: int | None = None) -> Result:
  """Fine-tune to finetune.epochs: resume WORKDIR's newest good checkpoint (or `step`), or start
  from finetune.init. `data` is run.prepare's (read before anything is written).

  Args:
    config: a validated fine-tuning config (`run.load_config`).
    workdir: the run folder.
    data: `run.prepare(config)`'s result; None prepares it here.
    step: the checkpoint step to resume from; None takes the newest restorable one.
  Raises:
    BertjaxError: the task's data is unusable (when `data` is None), the workdir is in use or
      unwritable, its checkpoint is of another model, tokenizer or task, or the --init run has no
      usable checkpoint.
  """
  data = run_lib.prepare(config) if data is None else data
  with contextlib.ExitStack() as stack:
    workdir_lock = stack.enter_context(lock.hold(workdir))  # one run per workdir, as pretraining
    run = run_lib.setup(config, workdir, data)
    save_failures.check_room(run.workdir, run.steps.abstract_state())
    checkpoints = stack.enter_context(checkpoint.Checkpoints(run.workdir, config.checkpoint))
    if checkpoints.steps() or step is not None:
      state, meta = checkpoints.restore(
        run.steps.abstract_state(), step, check=_check_resumable(run, f"--workdir {run.workdir}")
      )
      log.info("resumed from checkpoint step %d in %s", meta["step"], checkpoints.dir)
    else:
      state = run_lib.warm_start(run, config.finetune.init)
    run_lib.write_run_files(run)  # only once the workdir is known to hold this run (or nothing)
    start = int(jax.device_get(state.step))
    if start >= run.total_steps:  # nothing left to train: report where the run stands
      log.info("the run in %s is complete (%d steps); evaluating it", run.workdir, start)
      final, answered = run_lib.evaluate(run, state.params)
      _write_results(run, start, final, answered)
      return Result(final, state)
    guard = stack.enter_context(PreemptionGuard(sync_point=checkpoints.reached_preemption, start=start))
    saver = saving.Saver(checkpoints, workdir_lock, run.workdir, lambda step: _checkpoint_meta(run))
    return _loop(run, state, start, saver, guard, stack)


@dataclasses.dataclass
class _Window:
  """Host time, tokens and examples since the last log line."""

  start: float
  tokens: float = 0.0
  examples: float = 0.0
  steps: int = 0


def _loop(run: run_lib.Run, state, start: int, saver: saving.Saver, guard, stack) -> Result:
  config, total, per_epoch = run.config, run.total_steps, run.order.steps_per_epoch
  writer = stack.enter_context(
    MetricsWriter(run.workdir, enabled=run.is_primary, upload_every_s=run.config.metrics.upload_every_s)
  )
  progress = ProgressBar(total, start, enabled=run.is_primary)
  stack.callback(progress.close)
  window = _Window(time.perf_counter())
  pending, final, answered = None, {}, {}
  for step in range(start, total):
    with jax.profiler.StepTraceAnnotation("finetune", step_num=step):  # a profile shows each step
      state, step_metrics = run.steps.train(state, run.train_batch(step))
    if pending is not None:
      _after_step(run, *pending, writer, progress, window, saver)
    pending = (step, step_metrics)
    done = step + 1
    if done % per_epoch == 0 or done == total:  # an epoch's end: evaluate before anything else
      _after_step(run, *pending, writer, progress, window, saver)
      pending = None
      final, answered = run_lib.evaluate(run, state.params)
      writer.write(done, {**final, "epoch": done / per_epoch}, split="eval")
      log.info("epoch %d of %d: %s", done // per_epoch, config.finetune.epochs, _summary(final))
    if guard.should_stop(done):
      if pending is not None:
        _after_step(run, *pending, writer, progress, window, saver)
      saver.save(state, done, wait=True)
      return Result({}, state, stopped_by=guard.received)
    if done < total and done % config.checkpoint.every_steps == 0:
      saver.periodic(state, done, step_metrics)
  if pending is not None:
    _after_step(run, *pending, writer, progress, window, saver)
  saver.save(state, run.total_steps, wait=True)
  _write_results(run, total, final, answered)
  return Result(final, state)


def _summary(values: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


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


def _after_step(
  run: run_lib.Run, step: int, step_metrics, writer, progress, window: _Window, saver: saving.Saver
) -> None:
  consecutive, tokens, examples = jax.device_get(
    (step_metrics["nonfinite_consecutive"], step_metrics["tokens"], step_metrics["examples"])
  )
  optim.check_nonfinite(int(consecutive), run.config.optim.max_nonfinite, step + 1, saver.newest())
  window.tokens += float(tokens)
  window.examples += float(examples)
  window.steps += 1
  if (step + 1) % run.config.train.log_every and step + 1 != run.total_steps:
    return
  now = time.perf_counter()
  skip = ("nonfinite_consecutive", "tokens", "examples")
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k not in skip}
  elapsed = max(now - window.start, 1e-9)
  values.update(
    epoch=(step + 1) / run.order.steps_per_epoch,
    tokens_per_s=window.tokens / elapsed,
    examples_per_s=window.examples / elapsed,
    step_s=elapsed / window.steps,
  )
  writer.write(step + 1, values, split="train")
  progress.update(step + 1, values)
  window.start, window.tokens, window.examples, window.steps = now, 0.0, 0.0, 0


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
