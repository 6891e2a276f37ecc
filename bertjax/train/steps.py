"""TrainState and the pure train and eval steps, jitted once over the mesh.

    graphdef, params = nnx.split(model)      once (NNX outside)
    train_step(state, batch) -> (state, metrics)   pure: no logging, no host sync
    eval_step(params, batch) -> loss and accuracy sums

Both steps are compiled once with explicit in/out shardings derived from the model's logical
axes (bertjax.sharding), and the train state is donated. Dropout keys are
`fold_in(state.rng, state.step)` (then the microbatch index): nothing random is stored in a module.
The pretraining loop that drives them is `bertjax.train.loop`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from bertjax.model.bert import BertForPreTraining, abstract_model
from bertjax.model.config import BertConfig
from bertjax.parallel import rules
from bertjax.train import losses, optim

Batch = dict[str, jax.Array]


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


def _init_state(cfg: BertConfig, tx: optax.GradientTransformation, seed) -> TrainState:
  model = BertForPreTraining(cfg, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), _PARAMS_STREAM)))
  return fresh_state(nnx.state(model, nnx.Param).to_pure_dict(), tx, seed)


def _microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ...: every device keeps its rows."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


# A packed batch (data.pack_pairs) carries these too: per-pair positions, pair ids (attention stays
# within a pair) and each pair's [CLS]; NSP labels and weights are then [B, K], one per pair slot.
PACKING_ARRAYS = ("position_ids", "pair_ids", "nsp_positions")


def _forward_sums(graphdef, params, batch: Batch, dropout_key) -> dict[str, jax.Array]:
  model = nnx.merge(graphdef, params)
  mlm, nsp = model(
    batch["input_ids"],
    batch["segment_ids"],
    batch["attention_mask"],
    batch["masked_positions"],
    **{k: batch[k] for k in PACKING_ARRAYS if k in batch},
    dropout_key=dropout_key,
  )
  return losses.pretraining_sums(mlm, nsp, batch)


def _pair_count(batch: Batch) -> jax.Array:
  """Real NSP pairs in a batch: one a row, or with packing the weighted pair slots."""
  if "nsp_weights" in batch:
    return batch["nsp_weights"].astype(jnp.float32).sum()
  return jnp.float32(batch["nsp_labels"].size)


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch, accumulating `grad_accum` microbatches.

  The objective is normalised by the whole batch's masked weights and pair count (real pairs, not
  rows, when the batch is packed), so k microbatches give the gradient of one step on the whole
  batch.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  mlm_total = jnp.maximum(batch["masked_weights"].astype(jnp.float32).sum(), 1e-8)
  nsp_total = jnp.maximum(_pair_count(batch), 1.0)

  def grads_and_sums(params, micro: Batch, index):
    def objective(p):
      sums = _forward_sums(graphdef, p, micro, jax.random.fold_in(key, index))
      return sums["mlm_loss_sum"] / mlm_total + sums["nsp_loss_sum"] / nsp_total, sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums

  if grad_accum == 1:
    grads, sums = grads_and_sums(state.params, batch, 0)
  else:

    def accumulate(carry, micro_and_index):
      grads, sums = grads_and_sums(state.params, *micro_and_index)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(
      jnp.zeros_like,
      jax.eval_shape(grads_and_sums, state.params, jax.tree.map(lambda x: x[: x.shape[0] // grad_accum], batch), 0),
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (_microbatches(batch, grad_accum), jnp.arange(grad_accum)))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  consecutive, total = optim.nonfinite_counts(opt_state)
  real = batch["attention_mask"].astype(jnp.float32)
  metrics = {
    **losses.from_sums(sums),
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": schedule(state.step),
    "nonfinite_consecutive": consecutive,
    "skipped_steps": total,
    "tokens": real.sum(),  # non-padding: the loop's tokens/s counts these
    "padding_fraction": 1.0 - real.mean(),
    "pairs_per_row": _pair_count(batch) / real.shape[0],
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, graphdef) -> dict[str, jax.Array]:
  """Loss and accuracy sums on one batch, deterministic; sum them over batches, then from_sums."""
  return _forward_sums(graphdef, params, batch, None)


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
  cfg: BertConfig, optim_cfg, train_steps: int, grad_accum: int, mesh: Mesh | AbstractMesh
) -> CompiledSteps:
  """Shardings from the model's logical axes, then jitted init / train / eval over `mesh`.

  Args:
    cfg: the resolved model config.
    optim_cfg: the run config's `optim` section.
    train_steps: `train.steps`, the schedule's length unless `optim.schedule_steps` is set.
    grad_accum: microbatches accumulated into one step.
    mesh: the device mesh, or an abstract one to plan and lower without devices.
  Returns:
    The jitted functions with their shardings. Nothing is compiled until first called or lowered.
  """
  tx = optim.build_optimizer(optim_cfg, train_steps)
  schedule = optim.learning_rate_schedule(optim_cfg, train_steps)
  return jit_steps(
    abstract_model(cfg),
    functools.partial(_init_state, cfg, tx),
    lambda graphdef: functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=grad_accum),
    lambda graphdef: functools.partial(eval_step, graphdef=graphdef),
    tx,
    schedule,
    mesh,
  )


def jit_steps(abstract, init, make_train, make_eval, tx, schedule, mesh: Mesh | AbstractMesh) -> CompiledSteps:
  """The state's shardings from the model's logical axes, and init / train / eval jitted with them.

  Shared by pretraining and fine-tuning, whose steps differ only in their functions.

  Args:
    abstract: the abstract model (`nnx.eval_shape`); its parameters' names give the shardings.
    init: seed -> TrainState.
    make_train, make_eval: graphdef -> the train step (state, batch) -> (state, metrics), and the
      eval step (params, batch) -> metrics.
    tx, schedule: the optimizer and its learning-rate schedule.
    mesh: the device mesh, or an abstract one.
  """
  graphdef = nnx.graphdef(abstract)
  param_shardings = rules.named(mesh, rules.param_specs(nnx.state(abstract, nnx.Param)))
  abstract_state = jax.eval_shape(init, 0)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shardings = TrainState(
    step=replicated,
    params=param_shardings,
    rng=replicated,
    opt_state=rules.optimizer_shardings(tx, abstract_state.opt_state, param_shardings, mesh),
  )
  batch_sharding = rules.batch_sharding(mesh)
  train = jax.jit(
    make_train(graphdef),
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  evaluate = jax.jit(make_eval(graphdef), in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
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
