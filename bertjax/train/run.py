"""A run, assembled: its data, model config, mesh, compiled steps and rows; and evaluation.

    prepare_data(config, workdir)   tokenizer and input pipeline, before JAX touches a device
    setup(config, workdir, data)    model config, mesh, compiled steps, this process's rows
    evaluate(run, params, batches)  held-out losses and accuracies
    evaluate_checkpoint(...)        what `bertjax eval` prints

`config` is a validated run config (`bertjax.config.load_config`, or `validate` on one built by
hand); nothing here checks it again, except what needs the device count (the mesh).
"""

import dataclasses
import logging
import operator
import os
import socket
from typing import Any

import jax
import numpy as np
from etils import epath

from bertjax.config import loading as config_loading
from bertjax.config import validation
from bertjax.data import pipeline as pipeline_lib
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.model.config import BertConfig, resolve_config
from bertjax.parallel import mesh as mesh_lib
from bertjax.parallel import rules
from bertjax.train import checkpoint, compatibility, losses
from bertjax.train import steps as steps_lib
from bertjax.train.pretraining import Pretraining
from bertjax.train.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything a run is made of, before any step."""

  config: Any
  workdir: epath.Path
  tokenizer: Any
  pipeline: Any
  model_config: BertConfig
  steps: steps_lib.CompiledSteps
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
    return global_batch(self.steps, local, self.config.train.batch_size)


def global_batch(steps: steps_lib.CompiledSteps, local: dict[str, np.ndarray], size: int) -> dict[str, jax.Array]:
  """This process's rows of a `size`-row batch -> one global array per field, sharded over the mesh."""
  return {
    k: jax.make_array_from_process_local_data(steps.batch_sharding, v, (size, *v.shape[1:])) for k, v in local.items()
  }


def compile_for(config, task: Task, model_config: BertConfig, total_steps: int, optim_cfg=None):
  """(the task's steps compiled for this job's mesh, the global batch rows this process feeds).

  Args:
    config: a validated run config; checked here against the job's device count.
    task, model_config, total_steps: as `steps.compile_steps` takes them.
    optim_cfg: the optimizer section; None is `config.optim`.
  """
  validation.validate_for_devices(config, jax.device_count())
  mesh = mesh_lib.make_mesh(config.mesh)
  t = config.train
  table = rules.from_config(config.mesh)
  steps = steps_lib.compile_steps(task, model_config, optim_cfg or config.optim, total_steps, t.grad_accum, mesh, table)
  return steps, mesh_lib.rows_for_sharding(steps.batch_sharding, t.batch_size)


def check_workdir(workdir: epath.Path) -> None:
  """Fail before any training when the workdir cannot be written."""
  probe = workdir / f".write-probe-{socket.gethostname()}-{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise BertjaxError(
      f"--workdir {workdir}: cannot write there ({e.strerror or e}); choose a writable folder with free space"
    ) from None


@dataclasses.dataclass(frozen=True)
class Data:
  """The run's tokenizer and input pipeline: `prepare_data`'s result."""

  tokenizer: Any
  pipeline: Any


def prepare_data(config, workdir) -> Data:
  """The run's tokenizer and input pipeline, trained and tokenised on first use.

  Call it before JAX starts its backend or joins a job: tokenising forks worker processes, which
  is safe only while no runtime threads exist. Every process may call it at once: the tokenizer
  and the cache are written under temporary names and the first complete one wins.
  """
  workdir = epath.Path(workdir)
  check_workdir(workdir)
  tokenizer = tokenizer_lib.tokenizer_for_run(config, workdir)
  return Data(tokenizer, pipeline_lib.make_pipeline(config, tokenizer, workdir))


def setup(config, workdir, data: Data | None = None, *, write_config: bool = True) -> Run:
  """Everything a run needs before its first step, on this process's devices.

  Args:
    config: a validated run config.
    workdir: the run folder (local or gs://).
    data: `prepare_data`'s result, when it was called before JAX started (the CLI does).
    write_config: whether process 0 writes WORKDIR/config.json (training does; eval does not).
  """
  data = prepare_data(config, workdir) if data is None else data
  workdir = epath.Path(workdir)
  model_config = resolve_config(config.model, data.tokenizer.vocab_size, seq_len=config.data.seq_len)
  steps, rows = compile_for(config, Pretraining(), model_config, config.train.steps)  # checks the devices
  if jax.process_index() != 0:
    logging.getLogger("bertjax").setLevel(logging.WARNING)
  elif write_config:  # once the config is known to fit the job
    config_loading.write_config(config, workdir)
  return Run(config, workdir, data.tokenizer, data.pipeline, model_config, steps, rows)


def baselines(eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """What a model that learned nothing scores on the held-out batches (all rows, on the host).

  The MLM baseline always predicts the most frequent masked token; the NSP baseline always
  predicts the majority label of the real pairs (with packing, the pair slots of weight 1).
  """
  if not eval_batches:
    return {}
  masked = np.concatenate([b["masked_ids"][b["masked_weights"] > 0] for b in eval_batches])
  labels = np.concatenate(
    [b["nsp_labels"][b["nsp_weights"] > 0] if "nsp_weights" in b else b["nsp_labels"] for b in eval_batches]
  )
  return {
    "mlm_baseline_accuracy": float(np.bincount(masked).max() / max(len(masked), 1)),
    "nsp_baseline_accuracy": float(max(labels.mean(), 1 - labels.mean())),
  }


def evaluate(run: Run, params, eval_batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Held-out MLM and NSP losses and accuracies (sums over all batches, then ratios).

  Args:
    run: the run's `setup` result.
    params: the parameter pure dict, sharded as `run.steps` places it.
    eval_batches: global batches on the mesh (`Run.held_out`).
  Returns:
    `losses.from_sums`'s metrics as floats; {} without batches.
  """
  if not eval_batches:
    return {}
  sums = None
  for batch in eval_batches:
    batch_sums = run.steps.eval(params, batch)
    sums = batch_sums if sums is None else jax.tree.map(operator.add, sums, batch_sums)
  return {k: float(v) for k, v in jax.device_get(losses.from_sums(sums)).items()}


def evaluate_checkpoint(config, workdir, *, data: Data | None = None, step: int | None = None) -> dict:
  """Held-out metrics of a saved step (default: the newest good one), as `bertjax eval` prints."""
  run = setup(config, workdir, data, write_config=False)
  with checkpoint.Checkpoints(run.workdir, read_only=True) as checkpoints:
    if not checkpoints.steps():
      raise BertjaxError(f"--workdir {workdir}: no checkpoints there; train first")
    params, meta = checkpoints.restore_params(
      run.steps.abstract_state().params,
      step,
      check=lambda meta: compatibility.check_compatible(
        meta, run.model_config, run.tokenizer.fingerprint, f"--workdir {workdir}"
      ),
    )
  eval_batches, reference = run.held_out()
  return {"step": meta["step"], **evaluate(run, params, eval_batches), **reference}
