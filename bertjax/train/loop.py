"""The one training loop, for pretraining and every fine-tuning task: step, log, evaluate, save.

    open_workdir(stack, workdir, config, setup)   hold the workdir, assemble the run, open its checkpoints
    run_facts(config, model_config, tokenizer, mesh)   what every checkpoint records
    fit(job, state, checkpoints, workdir_lock, stack) -> Result
                               from `state` to `job.total_steps`: log every train.log_every,
                               evaluate when `job.eval_due`, checkpoint every
                               checkpoint.every_steps and at the end or on SIGTERM/SIGINT

What a run differs in (its batches, its evaluation, its checkpoint metadata, what it writes when
complete) comes in a `Job`; the step is `bertjax.train.steps`'. Every process runs this; each
feeds only the rows of the global batch its devices hold, and only process 0 writes logs and
metrics. Metrics are read back one step late: the host fetches step s-1's numbers while the device
runs step s, so it never waits on the device.

A run holds its workdir (train/lock.py) before it writes anything there. No periodic checkpoint is
saved while steps are being skipped for a non-finite gradient, so when the guard stops the run the
newest checkpoint is from before the first skipped step.
"""

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import jax
from etils import epath

from bertjax.config import loading as config_loading
from bertjax.metrics import flops as flops_lib
from bertjax.metrics.progress import ProgressBar
from bertjax.metrics.writer import MetricsWriter
from bertjax.parallel.layout import MESH_AXES
from bertjax.train import checkpoint, compatibility, lock, optim, save_failures, saving
from bertjax.train.preemption import PreemptionGuard
from bertjax.train.steps import CompiledSteps, TrainState

log = logging.getLogger(__name__)
# Step metrics the loop consumes itself rather than logging them.
_CONSUMED = ("nonfinite_consecutive", "tokens", "examples")


@dataclasses.dataclass
class Job:
  """What one run gives the loop."""

  config: Any  # the validated run config: train.*, checkpoint.*, optim.max_nonfinite, metrics.*
  workdir: epath.Path
  steps: CompiledSteps
  total_steps: int
  # start step -> the global batches of steps start, start + 1, ... (closed when the loop ends)
  batches: Callable[[int], AbstractContextManager[Iterator[dict[str, jax.Array]]]]
  evaluate: Callable[[Any], dict[str, float]]  # params -> held-out metrics; {} when there are none
  eval_due: Callable[[int], bool]  # after `done` steps (the end is always evaluated)
  checkpoint_meta: Callable[[int], dict]  # step -> what a checkpoint of it records beside the state
  epoch_of: Callable[[int], float]  # done steps -> epochs of the training data
  flops_per_sequence: float
  finish: Callable[[int, dict[str, float]], None] = lambda step, final: None  # once complete (process 0 writes)

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0


@dataclasses.dataclass
class Result:
  """What a run returns: the final held-out metrics and train state."""

  final: dict[str, float]  # held-out metrics at the end ({} when stopped early)
  state: TrainState
  stopped_by: str | None = None  # the signal that stopped the run early, after saving


def open_workdir(stack: contextlib.ExitStack, workdir, config, setup: Callable[[], Any]):
  """(run, the workdir's lock, its checkpoints): the lease is held before anything is written
  there, and a local disk without room for one checkpoint fails before any step."""
  workdir_lock = stack.enter_context(lock.hold(workdir))
  run = setup()
  save_failures.check_room(run.workdir, run.steps.abstract_state())
  checkpoints = stack.enter_context(checkpoint.Checkpoints(run.workdir, config.checkpoint))
  return run, workdir_lock, checkpoints


def run_facts(config, model_config, tokenizer, mesh) -> dict:
  """What every checkpoint records beside the state: the config, the model's sizes and tokenizer
  (a resume or warm start checks them), and the job's shape (mesh, processes)."""
  return {
    "config": config_loading.to_dict(config),
    "model": compatibility.model_sizes(model_config),
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "mesh": dict(zip(MESH_AXES, mesh.devices.shape)),
    "process_count": jax.process_count(),
  }


def _profile_window(spec: str) -> tuple[int, int] | None:
  """`train.profile_steps` "START:STOP" (checked by config.validate) as numbers."""
  if not spec:
    return None
  start, _, stop = spec.partition(":")
  return int(start), int(stop)


class _Profiler:
  """A jax.profiler trace of steps [start, stop) into WORKDIR/profile, if asked for."""

  def __init__(self, spec: str, workdir: epath.Path):
    self.window = _profile_window(spec)
    self.dir = str(workdir / "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.window and step == self.window[0]:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step + 1 == self.window[1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      log.info("wrote a profile of steps %d-%d to %s", *self.window, self.dir)


@dataclasses.dataclass
class _Window:
  """Host time, real tokens and rows since the last log line."""

  start: float
  tokens: float = 0.0
  examples: float = 0.0
  steps: int = 0


@dataclasses.dataclass
class _Outputs:
  """Where the loop's numbers go, and what it needs to report them."""

  job: Job
  writer: MetricsWriter
  progress: ProgressBar
  throughput: flops_lib.Throughput
  window: _Window
  saver: saving.Saver


def fit(job: Job, state: TrainState, checkpoints, workdir_lock, stack: contextlib.ExitStack) -> Result:
  """Train `state` to `job.total_steps`; a run already there is evaluated and finished again."""
  start, total = int(jax.device_get(state.step)), job.total_steps
  if start >= total:  # nothing left to train: report where the run stands
    log.info(
      "the run in %s is already at step %d of %d; evaluating it (raise the step count to train further)",
      job.workdir,
      start,
      total,
    )
    final = job.evaluate(state.params)
    job.finish(start, final)
    return Result(final, state)
  guard = stack.enter_context(PreemptionGuard(sync_point=checkpoints.reached_preemption, start=start))
  saver = saving.Saver(checkpoints, workdir_lock, job.workdir, job.checkpoint_meta)
  writer = stack.enter_context(
    MetricsWriter(job.workdir, enabled=job.is_primary, upload_every_s=job.config.metrics.upload_every_s)
  )
  progress = ProgressBar(total, start, enabled=job.is_primary)
  stack.callback(progress.close)
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, job.config.metrics.peak_tflops)
  throughput = flops_lib.Throughput(job.flops_per_sequence, jax.device_count(), peak, start)
  out = _Outputs(job, writer, progress, throughput, _Window(time.perf_counter()), saver)
  batches = stack.enter_context(job.batches(start))
  return _steps(out, state, start, batches, guard)


def _steps(out: _Outputs, state, start: int, batches, guard) -> Result:
  job, saver = out.job, out.saver
  profiler = _Profiler(job.config.train.profile_steps, job.workdir)
  pending, final = None, {}
  for step in range(start, job.total_steps):
    profiler.before(step)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):  # a profile shows each step
      state, step_metrics = job.steps.train(state, next(batches))
    profiler.after(step, state)
    if pending is not None:
      _after_step(*pending, out)
    pending, done = (step, step_metrics), step + 1
    if done == job.total_steps or job.eval_due(done):  # evaluate before anything else
      _after_step(*pending, out)
      pending = None
      final = job.evaluate(state.params)
      if final:
        out.writer.write(done, {**final, "epoch": job.epoch_of(done)}, split="eval")
        log.info("step %d (epoch %.2f): %s", done, job.epoch_of(done), _summary(final))
    if guard.should_stop(done):
      if pending is not None:
        _after_step(*pending, out)
      saver.save(state, done, wait=True)
      return Result({}, state, stopped_by=guard.received)
    if done < job.total_steps and done % job.config.checkpoint.every_steps == 0:
      saver.periodic(state, done, step_metrics)
  saver.save(state, job.total_steps, wait=True)
  job.finish(job.total_steps, final)
  return Result(final, state)


def _summary(values: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _after_step(step: int, step_metrics, out: _Outputs) -> None:
  """Host-side work for a finished step: the non-finite guard, then (every train.log_every) a log line."""
  job, window = out.job, out.window
  consecutive, tokens, examples = jax.device_get(tuple(step_metrics[k] for k in _CONSUMED))
  optim.check_nonfinite(int(consecutive), job.config.optim.max_nonfinite, step + 1, out.saver.newest())
  window.tokens += float(tokens)
  window.examples += float(examples)
  window.steps += 1
  if (step + 1) % job.config.train.log_every and step + 1 != job.total_steps:
    return
  now = time.perf_counter()
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k not in _CONSUMED}
  values["epoch"] = float(job.epoch_of(step + 1))
  values.update(out.throughput.update(step + 1, window.examples, window.tokens, max(now - window.start, 1e-9)))
  out.writer.write(step + 1, values, split="train")
  out.progress.update(step + 1, values)
  window.start, window.tokens, window.examples, window.steps = now, 0.0, 0.0, 0
