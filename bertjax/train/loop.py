"""The pretraining loop: resume, warm-start or initialise; step, log, evaluate, checkpoint.

    train(config, workdir)   to train.steps: log every train.log_every, evaluate every
                             train.eval_every, checkpoint every checkpoint.every_steps and at the
                             end or on SIGTERM/SIGINT

Every process runs this; each feeds only the rows of the global batch its devices hold, and only
process 0 writes logs and metrics. Metrics are read back one step late: the host fetches step
s-1's numbers while the device runs step s, so it never waits on the device.

A run holds its workdir (train/lock.py) before it writes anything there. No periodic checkpoint
is saved while steps are being skipped for a non-finite gradient, so when the guard stops the run
the newest checkpoint is from before the first skipped step.
"""

import contextlib
import dataclasses
import functools
import logging
import time

import jax
from etils import epath

from bertjax.config import loading as config_loading
from bertjax.metrics import flops as flops_lib
from bertjax.metrics.progress import ProgressBar
from bertjax.metrics.writer import MetricsWriter
from bertjax.parallel.layout import MESH_AXES
from bertjax.train import checkpoint, compatibility, lock, optim, save_failures, saving
from bertjax.train import steps as steps_lib
from bertjax.train.preemption import PreemptionGuard
from bertjax.train.run import Data, Run, evaluate, setup

log = logging.getLogger(__name__)


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
class TrainResult:
  """What `train` returns: the final held-out metrics and train state."""

  final: dict[str, float]  # held-out metrics at the end, with the baselines ({} if stopped early)
  state: steps_lib.TrainState
  stopped_by: str | None = None  # the signal that stopped the run early, after saving


def _checkpoint_meta(run: Run, step: int) -> dict:
  return {
    "data": run.pipeline.state_for(step),
    "config": config_loading.to_dict(run.config),
    "model": compatibility.model_sizes(run.model_config),
    "tokenizer_fingerprint": run.tokenizer.fingerprint,
    "mesh": dict(zip(MESH_AXES, run.steps.mesh.devices.shape)),
    "process_count": jax.process_count(),
  }


def initial_state(run: Run, checkpoints: checkpoint.Checkpoints, step: int | None = None):
  """(state, data position or None): resume this workdir, warm-start from another, or init.

  Args:
    run: the run's `setup` result.
    checkpoints: this workdir's checkpoints; any step there (or a damaged one) means resume.
    step: the step to resume from; None takes the newest restorable one.
  Returns:
    (state, data position): the TrainState on the run's mesh, and the checkpoint meta's `data`
    (`pipeline.state_for`'s dict) when resumed, else None.
  Raises:
    BertjaxError: a checkpoint (or `train.init_from`) that cannot be restored or does not fit this run.
  """
  t = run.config.train
  if checkpoints.steps() or checkpoints.damaged() or step is not None:
    state, meta = checkpoints.restore(
      run.steps.abstract_state(),
      step,
      check=lambda meta: compatibility.check_compatible(
        meta, run.model_config, run.tokenizer.fingerprint, f"--workdir {run.workdir}"
      ),
    )
    log.info("resumed from checkpoint step %d in %s", meta["step"], checkpoints.dir)
    return state, meta.get("data")
  if t.init_from:
    state = compatibility.warm_start(
      t.init_from,
      run.steps,
      run.model_config,
      params_only=t.init_params_only,
      seed=t.seed,
      tokenizer_fingerprint=run.tokenizer.fingerprint,
    )
    log.info(
      "started from %s at step %d (%s)",
      t.init_from,
      int(state.step),
      "parameters only" if t.init_params_only else "parameters, optimizer state and step",
    )
    return state, None
  return run.steps.init(t.seed), None


def train(config, workdir, *, data: Data | None = None, state=None, step: int | None = None) -> TrainResult:
  """Train to train.steps: resume WORKDIR's newest good checkpoint (or `step`), or warm-start
  from train.init_from, or start fresh; `state` overrides all three."""
  t = config.train
  with contextlib.ExitStack() as stack:
    workdir_lock = stack.enter_context(lock.hold(workdir))  # before anything is written there
    run = setup(config, workdir, data)
    save_failures.check_room(run.workdir, run.steps.abstract_state())
    checkpoints = stack.enter_context(checkpoint.Checkpoints(run.workdir, config.checkpoint))
    data_position = None
    if state is None:
      state, data_position = initial_state(run, checkpoints, step)
    start = int(jax.device_get(state.step))
    if start >= t.steps:  # nothing left to train: report where the run stands
      log.info(
        "the run in %s is already at step %d of train.steps=%d; raise train.steps to train further",
        run.workdir,
        start,
        t.steps,
      )
      eval_batches, reference = run.held_out()
      final = evaluate(run, state.params, eval_batches)
      return TrainResult({**final, **reference} if final else {}, state)
    guard = stack.enter_context(PreemptionGuard(sync_point=checkpoints.reached_preemption, start=start))
    saver = saving.Saver(checkpoints, workdir_lock, run.workdir, functools.partial(_checkpoint_meta, run))
    result = _loop(run, state, start, data_position, saver, guard, stack)
  return result


def _loop(run: Run, state, start: int, data_position, saver: saving.Saver, guard, stack) -> TrainResult:
  config, t = run.config, run.config.train
  eval_batches, reference = run.held_out()
  flops = flops_lib.flops_per_sequence(run.model_config, config.data.seq_len, config.data.max_predictions)
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.peak_tflops)
  throughput = flops_lib.Throughput(flops, jax.device_count(), peak)
  profiler = _Profiler(t.profile_steps, run.workdir)
  writer = stack.enter_context(
    MetricsWriter(run.workdir, enabled=run.is_primary, upload_every_s=run.config.metrics.upload_every_s)
  )
  progress = ProgressBar(t.steps, start, enabled=run.is_primary)
  stack.callback(progress.close)
  if data_position is not None:
    batches = stack.enter_context(run.pipeline.iterator_from_state(data_position, run.rows))
  else:
    batches = stack.enter_context(run.pipeline.iterator(start, run.rows))
  out = _Outputs(writer, progress, throughput, _Window(time.perf_counter()), saver)
  pending = None
  for step in range(start, t.steps):
    batch_step, local = next(batches)
    assert batch_step == step, (batch_step, step)
    profiler.before(step)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):  # a profile shows each step
      state, step_metrics = run.steps.train(state, run.global_batch(local))
    profiler.after(step, state)
    if pending is not None:
      _after_step(run, *pending, out)
    pending = (step, step_metrics)
    done = step + 1
    if guard.should_stop(done):
      _after_step(run, *pending, out)
      saver.save(state, done, wait=True)
      return TrainResult({}, state, stopped_by=guard.received)
    if done % config.checkpoint.every_steps == 0 and done < t.steps:
      saver.periodic(state, done, step_metrics)
    if done % t.eval_every == 0 and done < t.steps:
      _after_step(run, *pending, out)
      pending = None
      writer.write(done, {**evaluate(run, state.params, eval_batches), **reference}, split="eval")
  if pending is not None:
    _after_step(run, *pending, out)
  saver.save(state, t.steps, wait=True)
  final = evaluate(run, state.params, eval_batches)
  if final:
    final.update(reference)
    writer.write(t.steps, final, split="eval")
  return TrainResult(final, state)


@dataclasses.dataclass
class _Window:
  """Host time and tokens since the last log line."""

  start: float
  tokens: float = 0.0
  steps: int = 0


@dataclasses.dataclass
class _Outputs:
  writer: MetricsWriter
  progress: ProgressBar
  throughput: flops_lib.Throughput
  window: _Window
  saver: saving.Saver


def _after_step(run: Run, step: int, step_metrics, out: _Outputs) -> None:
  t = run.config.train
  consecutive, tokens = (
    int(x) if i == 0 else float(x)
    for i, x in enumerate(jax.device_get((step_metrics["nonfinite_consecutive"], step_metrics["tokens"])))
  )
  optim.check_nonfinite(consecutive, run.config.optim.max_nonfinite, step + 1, out.saver.newest())
  window = out.window
  window.tokens += tokens
  window.steps += 1
  if (step + 1) % t.log_every and step + 1 != t.steps:
    return
  now = time.perf_counter()
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "nonfinite_consecutive"}
  values.pop("tokens")
  values["epoch"] = float(run.pipeline.epoch_of(step + 1))
  values.update(out.throughput.update(step + 1, window.steps * t.batch_size, window.tokens, now - window.start))
  out.writer.write(step + 1, values, split="train")
  out.progress.update(step + 1, values)
  window.start, window.tokens, window.steps = now, 0.0, 0
