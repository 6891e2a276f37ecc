"""The pretraining loop: set up a run, train, evaluate, log.

    prepare_data(config, workdir)  tokenizer and tokenised cache, before JAX touches a device
    setup(config, workdir, data)   model config, mesh, compiled steps, this process's rows
    train(config, workdir)         resume, warm-start or init; step; log every train.log_every,
                                   evaluate every train.eval_every, checkpoint every
                                   checkpoint.every_steps and at the end or on SIGTERM/SIGINT

Every process runs this; each feeds only the rows of the global batch its devices hold, and only
process 0 writes logs and metrics. Metrics are read back one step late: the host fetches step
s-1's numbers while the device runs step s, so it never waits on the device.
"""

import contextlib
import dataclasses
import logging
import operator
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from bertjax import config as config_lib
from bertjax import checkpoint, losses, metrics, optim, sharding
from bertjax import train as train_lib
from bertjax.data import pipeline as pipeline_lib
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.model import BertConfig, resolve_config
from bertjax.preemption import PreemptionGuard

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything a run is made of, before any step."""

  config: Any
  workdir: epath.Path
  tokenizer: Any
  pipeline: Any
  model_config: BertConfig
  steps: train_lib.CompiledSteps
  rows: np.ndarray  # the global batch rows this process materialises

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0

  def held_out(self) -> tuple[list[dict[str, jax.Array]], dict[str, float]]:
    """The fixed eval batches on the mesh, and the baselines over all their rows."""
    local = self.pipeline.eval_batches(self.rows)
    every_row = len(self.rows) == self.config.train.batch_size  # one process: already all rows
    return [self.global_batch(b) for b in local], baselines(local if every_row else self.pipeline.eval_batches())

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per field, sharded over the mesh."""
    size = self.config.train.batch_size
    return {k: jax.make_array_from_process_local_data(self.steps.batch_sharding, v, (size, *v.shape[1:]))
            for k, v in local.items()}


def check_workdir(workdir: epath.Path) -> None:
  """Fail before any training when the workdir cannot be written."""
  probe = workdir / f".write-probe-{socket.gethostname()}-{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise BertjaxError(f"--workdir {workdir}: cannot write there ({e.strerror or e}); "
                       "choose a writable folder with free space") from None


@dataclasses.dataclass(frozen=True)
class Data:
  tokenizer: Any
  pipeline: Any


def prepare_data(config, workdir) -> Data:
  """The run's tokenizer and input pipeline, trained and tokenised on first use.

  Call it before JAX starts its backend or joins a job: tokenising forks worker processes, which
  is safe only while no runtime threads exist. Every process may call it at once: the tokenizer
  and the cache are written under temporary names and the first complete one wins.
  """
  config_lib.validate(config)
  workdir = epath.Path(workdir)
  check_workdir(workdir)
  init_tokenizer = epath.Path(config.train.init_from) / "tokenizer" if config.train.init_from else None
  if not config.data.tokenizer and init_tokenizer is not None and init_tokenizer.exists():
    config.data.tokenizer = str(init_tokenizer)  # a warm start keeps the vocabulary it was trained with
  tokenizer = tokenizer_lib.tokenizer_for_run(config, workdir)
  return Data(tokenizer, pipeline_lib.make_pipeline(config, tokenizer, workdir))


def setup(config, workdir, data: Data | None = None, *, write_config: bool = True) -> Run:
  data = prepare_data(config, workdir) if data is None else data
  config_lib.validate(config, device_count=jax.device_count())
  workdir = epath.Path(workdir)
  if jax.process_index() != 0:
    logging.getLogger("bertjax").setLevel(logging.WARNING)
  elif write_config:
    config_lib.write_config(config, workdir)
  tokenizer, pipeline = data.tokenizer, data.pipeline
  model_config = resolve_config(config.model, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  steps = train_lib.compile_steps(model_config, config.optim, config.train.steps, config.train.grad_accum, mesh)
  rows = pipeline_lib.rows_for_sharding(steps.batch_sharding, config.train.batch_size)
  return Run(config, workdir, tokenizer, pipeline, model_config, steps, rows)


def baselines(eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """What a model that learned nothing scores on the held-out batches (all rows, on the host).

  The MLM baseline always predicts the most frequent masked token; the NSP baseline always
  predicts the majority label.
  """
  if not eval_batches:
    return {}
  masked = np.concatenate([b["masked_ids"][b["masked_weights"] > 0] for b in eval_batches])
  labels = np.concatenate([b["nsp_labels"] for b in eval_batches])
  return {"mlm_baseline_accuracy": float(np.bincount(masked).max() / max(len(masked), 1)),
          "nsp_baseline_accuracy": float(max(labels.mean(), 1 - labels.mean()))}


def evaluate(run: Run, params, eval_batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Held-out MLM and NSP losses and accuracies (sums over all batches, then ratios)."""
  if not eval_batches:
    return {}
  sums = None
  for batch in eval_batches:
    batch_sums = run.steps.eval(params, batch)
    sums = batch_sums if sums is None else jax.tree.map(operator.add, sums, batch_sums)
  return {k: float(v) for k, v in jax.device_get(losses.from_sums(sums)).items()}


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
  final: dict[str, float]  # held-out metrics at the end, with the baselines ({} if stopped early)
  state: train_lib.TrainState
  stopped_by: str | None = None  # the signal that stopped the run early, after saving


def _checkpoint_meta(run: Run, step: int) -> dict:
  return {"data": run.pipeline.state_for(step), "config": config_lib.to_dict(run.config),
          "model": checkpoint.model_sizes(run.model_config), "tokenizer_fingerprint": run.tokenizer.fingerprint,
          "mesh": dict(zip(sharding.MESH_AXES, run.steps.mesh.devices.shape)),
          "process_count": jax.process_count()}


def initial_state(run: Run, checkpoints: checkpoint.Checkpoints, step: int | None = None):
  """(state, data position or None): resume this workdir, warm-start from another, or init."""
  t = run.config.train
  if checkpoints.steps() or step is not None:
    state, meta = checkpoints.restore(run.steps.abstract_state(), step, check=lambda meta: checkpoint.check_compatible(
        meta, run.model_config, run.tokenizer.fingerprint, f"--workdir {run.workdir}"))
    log.info("resumed from checkpoint step %d in %s", meta["step"], checkpoints.dir)
    return state, meta.get("data")
  if t.init_from:
    state = checkpoint.warm_start(t.init_from, run.steps, run.model_config, params_only=t.init_params_only,
                                  seed=t.seed, tokenizer_fingerprint=run.tokenizer.fingerprint)
    log.info("started from %s at step %d (%s)", t.init_from, int(state.step),
             "parameters only" if t.init_params_only else "parameters, optimizer state and step")
    return state, None
  return run.steps.init(t.seed), None


def train(config, workdir, *, data: Data | None = None, state=None, step: int | None = None) -> TrainResult:
  """Train to train.steps: resume WORKDIR's newest good checkpoint (or `step`), or warm-start
  from train.init_from, or start fresh; `state` overrides all three."""
  run = setup(config, workdir, data)
  t = config.train
  with contextlib.ExitStack() as stack:
    checkpoint.check_room(run.workdir, run.steps.abstract_state())
    checkpoints = stack.enter_context(checkpoint.Checkpoints(run.workdir, config.checkpoint))
    data_position = None
    if state is None:
      state, data_position = initial_state(run, checkpoints, step)
    start = int(jax.device_get(state.step))
    if start >= t.steps:  # nothing left to train: report where the run stands
      log.info("the run in %s is already at step %d of train.steps=%d; raise train.steps to train further",
               run.workdir, start, t.steps)
      eval_batches, reference = run.held_out()
      final = evaluate(run, state.params, eval_batches)
      return TrainResult({**final, **reference} if final else {}, state)
    guard = stack.enter_context(PreemptionGuard(sync_point=checkpoints.reached_preemption, start=start))
    result = _loop(run, state, start, data_position, checkpoints, guard, stack)
  return result


def _loop(run: Run, state, start: int, data_position, checkpoints, guard, stack) -> TrainResult:
  config, t = run.config, run.config.train
  eval_batches, reference = run.held_out()
  flops = metrics.flops_per_sequence(run.model_config, config.data.seq_len, config.data.max_predictions)
  peak = metrics.peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.peak_tflops)
  throughput = metrics.Throughput(flops, jax.device_count(), peak)
  profiler = _Profiler(t.profile_steps, run.workdir)
  writer = stack.enter_context(metrics.MetricsWriter(run.workdir, enabled=run.is_primary))
  progress = metrics.ProgressBar(t.steps, start, enabled=run.is_primary)
  stack.callback(progress.close)
  if data_position is not None:
    batches = stack.enter_context(run.pipeline.iterator_from_state(data_position, run.rows))
  else:
    batches = stack.enter_context(run.pipeline.iterator(start, run.rows))
  window = _Window(time.perf_counter())
  pending = None
  for step in range(start, t.steps):
    batch_step, local = next(batches)
    assert batch_step == step, (batch_step, step)
    profiler.before(step)
    state, step_metrics = run.steps.train(state, run.global_batch(local))
    profiler.after(step, state)
    if pending is not None:
      _after_step(run, *pending, writer, progress, throughput, window)
    pending = (step, step_metrics)
    done = step + 1
    if guard.should_stop(done):
      _after_step(run, *pending, writer, progress, throughput, window)
      checkpoints.save(state, _checkpoint_meta(run, done), wait=True)
      return TrainResult({}, state, stopped_by=guard.received)
    if done % config.checkpoint.every_steps == 0 and done < t.steps:
      checkpoints.save(state, _checkpoint_meta(run, done))
    if done % t.eval_every == 0 and done < t.steps:
      _after_step(run, *pending, writer, progress, throughput, window)
      pending = None
      writer.write(done, {**evaluate(run, state.params, eval_batches), **reference}, split="eval")
  if pending is not None:
    _after_step(run, *pending, writer, progress, throughput, window)
  checkpoints.save(state, _checkpoint_meta(run, t.steps), wait=True)
  final = evaluate(run, state.params, eval_batches)
  if final:
    final.update(reference)
    writer.write(t.steps, final, split="eval")
  return TrainResult(final, state)


def evaluate_checkpoint(config, workdir, *, data: Data | None = None, step: int | None = None) -> dict:
  """Held-out metrics of a saved step (default: the newest good one), as `bertjax eval` prints."""
  run = setup(config, workdir, data, write_config=False)
  with checkpoint.Checkpoints(run.workdir, read_only=True) as checkpoints:
    if not checkpoints.steps():
      raise BertjaxError(f"--workdir {workdir}: no checkpoints there; train first")
    params, meta = checkpoints.restore_params(
        run.steps.abstract_state().params, step,
        check=lambda meta: checkpoint.check_compatible(meta, run.model_config, run.tokenizer.fingerprint,
                                                       f"--workdir {workdir}"))
  eval_batches, reference = run.held_out()
  return {"step": meta["step"], **evaluate(run, params, eval_batches), **reference}


@dataclasses.dataclass
class _Window:
  """Host time and tokens since the last log line."""

  start: float
  tokens: float = 0.0
  steps: int = 0


def _after_step(run: Run, step: int, step_metrics, writer, progress, throughput, window: _Window) -> None:
  t = run.config.train
  consecutive, tokens = (int(x) if i == 0 else float(x) for i, x in
                         enumerate(jax.device_get((step_metrics["nonfinite_consecutive"], step_metrics["tokens"]))))
  optim.check_nonfinite(consecutive, run.config.optim.max_nonfinite, step + 1)
  window.tokens += tokens
  window.steps += 1
  if (step + 1) % t.log_every and step + 1 != t.steps:
    return
  now = time.perf_counter()
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "nonfinite_consecutive"}
  values.pop("tokens")
  values["epoch"] = float(run.pipeline.epoch_of(step + 1))
  values.update(throughput.update(step + 1, window.steps * t.batch_size, window.tokens, now - window.start))
  writer.write(step + 1, values, split="train")
  progress.update(step + 1, values)
  window.start, window.tokens, window.steps = now, 0.0, 0
