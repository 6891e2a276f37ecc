"""TrainState and the pure train and eval steps of any task, jitted once over the mesh.

    compile_steps(task, cfg, optim_cfg, total_steps, grad_accum, mesh) -> CompiledSteps
    train_step(state, batch) -> (state, metrics)   pure: no logging, no host sync
    eval_step(params, batch) -> the task's eval outputs

A task (`bertjax.train.task.Task`: pretraining, or a fine-tuning head) supplies the model and its
losses; the state, optimizer, microbatching and gradient accumulation, shardings and RNG handling
are the same for all. Both steps are compiled once with explicit in/out shardings derived from the
model's logical axes (`bertjax.parallel.rules`), and the train state is donated. Dropout keys are
`fold_in(state.rng, state.step)` (then the microbatch index): nothing random is stored in a module.
The loop that drives them is `bertjax.train.loop`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from bertjax.model import bert
from bertjax.model.config import BertConfig
from bertjax.parallel import rules
from bertjax.parallel.layout import RULES, Rules
from bertjax.train import optim
from bertjax.train.task import Batch, Task


@flax.struct.dataclass
class TrainState:
  """What a train step carries and a checkpoint holds: step, parameters, optimizer state, dropout key."""

  step: jax.Array  # int32 scalar: the global step, which the learning-rate schedule follows
  params: Any  # plain nested dict of float32 arrays (nnx.State.to_pure_dict layout)
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so checkpoints hold plain arrays


# Streams of the run's root key `train.seed`: parameter initialisation, and dropout.
_PARAMS_STREAM, _DROPOUT_STREAM = 0, 1


def fresh_state(params, tx: optax.GradientTransformation, seed) -> TrainState:
  """A step-0 train state around `params`: a new optimizer state and the seed's dropout key.

  Args:
    params: a parameter pure dict (`nnx.State.to_pure_dict` layout).
    tx: the optimizer, whose state is initialised for `params`.
    seed: `train.seed`; works traced (inside jit) or as a Python int.
  """
  rng = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(rng)
  )


def _init_state(task: Task, cfg: BertConfig, tx: optax.GradientTransformation, seed) -> TrainState:
  model = task.build(cfg, nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), _PARAMS_STREAM)))
  return fresh_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), tx, seed)


def microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ...: every device keeps its rows."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _grads_and_sums(task: Task, graphdef, params, batch: Batch, totals, key, grad_accum: int):
  """The objective's gradient and the task's sums over the batch, accumulated over microbatches."""

  def one(params, micro: Batch, index):
    def objective(p):
      sums = task.sums(nnx.merge(graphdef, p), micro, jax.random.fold_in(key, index))
      return task.objective(sums, totals), sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums

  if grad_accum == 1:
    return one(params, batch, 0)

  def accumulate(carry, micro_and_index):
    return jax.tree.map(jnp.add, carry, one(params, *micro_and_index)), None

  first = jax.tree.map(lambda x: x[: x.shape[0] // grad_accum], batch)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, params, first, 0))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (microbatches(batch, grad_accum), jnp.arange(grad_accum)))
  return grads, sums


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  task: Task,
  graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch, accumulating `grad_accum` microbatches.

  The task's objective is divided by its totals over the whole batch, so k microbatches give the
  gradient of one step on the whole batch.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  totals = task.totals(batch)
  grads, sums = _grads_and_sums(task, graphdef, state.params, batch, totals, key, grad_accum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  consecutive, skipped = optim.nonfinite_counts(opt_state)
  metrics = {
    **task.metrics(sums, totals, batch),
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": schedule(state.step),
    "nonfinite_consecutive": consecutive,
    "skipped_steps": skipped,
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, task: Task, graphdef) -> dict[str, jax.Array]:
  """The task's eval outputs on one batch, deterministic (no dropout)."""
  return task.evaluate(nnx.merge(graphdef, params), batch)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """What a run needs from this module, built once per (model, optimizer, mesh).

  `init`, `train` and `eval` trace and run under the mesh, so the model's activation
  constraints see it; `jitted` holds the bare jitted functions (for `.lower`, `eval_shape`).
  """

  mesh: Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  batch_sharding: NamedSharding
  jitted: dict[str, Callable]

  def init(self, seed: int) -> TrainState:
    with jax.set_mesh(self.mesh):
      return self.jitted["init"](seed)

  def train(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    with jax.set_mesh(self.mesh):
      return self.jitted["train"](state, batch)

  def eval(self, params, batch: Batch) -> dict:
    with jax.set_mesh(self.mesh):
      return self.jitted["eval"](params, batch)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state (restore targets, compile inputs),
    allocating nothing; works on an abstract mesh too."""
    # The shapes of the jitted init do not depend on the devices, so an abstract mesh (no
    # devices to set) traces it the same way.
    context = jax.sharding.use_abstract_mesh if isinstance(self.mesh, AbstractMesh) else jax.set_mesh
    with context(self.mesh):
      shapes = jax.eval_shape(self.jitted["init"], 0)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings)


def compile_steps(
  task: Task,
  cfg: BertConfig,
  optim_cfg,
  total_steps: int,
  grad_accum: int,
  mesh: Mesh | AbstractMesh,
  axis_rules: Rules = RULES,
) -> CompiledSteps:
  """Shardings from the model's logical axes, then jitted init / train / eval over `mesh`.

  Runs that ask for the same task, model, optimizer, mesh and rules (the seeds of a GLUE suite, a
  run and its resumption in one process) get the same jitted functions, so they compile once.

  Args:
    task: what is trained (`bertjax.train.pretraining.Pretraining`, a fine-tuning task).
    cfg: the resolved model config.
    optim_cfg: the run config's `optim` section (a fine-tune's with its warmup in it).
    total_steps: the schedule's length unless `optim.schedule_steps` is set.
    grad_accum: microbatches accumulated into one step.
    mesh: the device mesh, or an abstract one to plan and lower without devices.
    axis_rules: the logical-axis rules (`mesh.rules`: `bertjax.parallel.rules.from_config`) that
      place parameters, optimizer state, batch and activations.
  Returns:
    The jitted functions with their shardings. Nothing is compiled until first called or lowered.
  Raises:
    BertjaxError: the rules leave a large parameter unsplit over a mesh axis they promise it
      (`rules.check_sharded`).
  """
  optim_values = tuple(sorted(optim_cfg.items()))
  return _compile_steps(task, cfg, optim_values, total_steps, grad_accum, mesh, axis_rules)


@functools.lru_cache(maxsize=8)
def _compile_steps(task, cfg, optim_values, total_steps: int, grad_accum: int, mesh, axis_rules) -> CompiledSteps:
  optim_cfg = ml_collections.ConfigDict(dict(optim_values))
  tx = optim.build_optimizer(optim_cfg, total_steps)
  schedule = optim.learning_rate_schedule(optim_cfg, total_steps)
  abstract = bert.abstract(task.build, cfg)
  graphdef, abstract_params = nnx.graphdef(abstract), nnx.state(abstract, nnx.Param)
  param_shardings = rules.named(mesh, rules.param_specs(abstract_params, axis_rules))
  rules.check_sharded(abstract_params, param_shardings, axis_rules)  # a table that leaves FSDP undone fails here
  init = rules.traced_under(axis_rules, functools.partial(_init_state, task, cfg, tx))
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shardings = TrainState(
    step=replicated,
    params=param_shardings,
    rng=replicated,
    opt_state=rules.optimizer_shardings(tx, jax.eval_shape(init, 0).opt_state, param_shardings, mesh),
  )
  batch_sharding = rules.batch_sharding(mesh, axis_rules)
  train_fn = functools.partial(
    train_step, task=task, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=grad_accum
  )
  train = jax.jit(
    rules.traced_under(axis_rules, train_fn),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  evaluate = jax.jit(
    rules.traced_under(axis_rules, functools.partial(eval_step, task=task, graphdef=graphdef)),
    in_shardings=(param_shardings, batch_sharding),
    out_shardings=replicated,
  )
  return CompiledSteps(
    mesh=mesh,
    graphdef=graphdef,
    tx=tx,
    schedule=schedule,
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    # The init is jitted with the final out-shardings: no device ever holds all the parameters.
    jitted={"init": jax.jit(init, out_shardings=state_shardings), "train": train, "eval": evaluate},
  )
