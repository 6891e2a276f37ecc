"""The pure fine-tuning train and eval steps and their losses, jitted once over the mesh.

    train_step(state, batch) -> (state, metrics)   one optimizer step; pure, no host sync
    eval_step(params, batch) -> outputs            logits (and loss sums, with labels)
    compile_steps(...)                             both, with init, as bertjax.train.steps.CompiledSteps

The state, optimizer (BERT's AdamW and schedule), shardings and RNG handling are pretraining's
(bertjax.train.steps, bertjax.train.optim, bertjax.parallel.rules): only the model and the loss
differ. Losses are sums over the real rows of a batch (`weights` 1; padding rows 0) divided by
the batch's real-row count, so a padded last batch and gradient accumulation give the mean over
the examples. Classification: softmax cross-entropy; regression: squared error (the one output is
the prediction); QA: the mean of the start and end positions' cross-entropies, as BERT.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from bertjax.finetune import heads
from bertjax.finetune.tasks import TaskSpec
from bertjax.model.config import BertConfig
from bertjax.train import optim
from bertjax.train.steps import CompiledSteps, TrainState, fresh_state, jit_steps

Batch = dict[str, jax.Array]
# What the device sees of a batch (features hold more: offsets for decoding, example indices).
INPUTS = ("input_ids", "segment_ids", "attention_mask", "weights")
LABELS = {"classification": ("labels",), "qa": ("start_positions", "end_positions")}
_PARAMS_STREAM = 0  # the stream of train.seed that initialises parameters, as in pretraining


def _outputs(graphdef, params, batch: Batch, dropout_key):
  model = nnx.merge(graphdef, params)
  return model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"], dropout_key=dropout_key)


def loss_sums(spec: TaskSpec, outputs, batch: Batch) -> dict[str, jax.Array]:
  """Loss (and for classification, correct-prediction) sums over the batch's real rows.

  Args:
    spec: the task.
    outputs: the model's: logits [B, C] (classification and regression), or (start, end) logits
      [B, L] (QA).
    batch: `weights` [B] (1 real row, 0 padding) and the labels: `labels` [B] (class ids, or floats
      for regression), or `start_positions` and `end_positions` [B].
  Returns:
    float32 scalars `loss_sum` and `weight_sum`, and for classification `correct_sum`.
  """
  w_B = batch["weights"].astype(jnp.float32)
  if spec.kind == "qa":
    start_BxL, end_BxL = outputs
    per_row = 0.5 * (
      optax.softmax_cross_entropy_with_integer_labels(start_BxL, batch["start_positions"])
      + optax.softmax_cross_entropy_with_integer_labels(end_BxL, batch["end_positions"])
    )
    return {"loss_sum": jnp.sum(per_row * w_B), "weight_sum": jnp.sum(w_B)}
  if spec.regression:
    per_row = jnp.square(outputs[:, 0] - batch["labels"].astype(jnp.float32))
    return {"loss_sum": jnp.sum(per_row * w_B), "weight_sum": jnp.sum(w_B)}
  per_row = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["labels"])
  correct = (jnp.argmax(outputs, -1) == batch["labels"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(per_row * w_B), "weight_sum": jnp.sum(w_B), "correct_sum": jnp.sum(correct * w_B)}


def _microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ... (pretraining's strided split)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(
  state: TrainState, batch: Batch, *, graphdef, tx, schedule, spec: TaskSpec, grad_accum: int
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch, accumulating `grad_accum` microbatches."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  total = jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1.0)

  def grads_and_sums(params, micro: Batch, index):
    def objective(p):
      sums = loss_sums(spec, _outputs(graphdef, p, micro, jax.random.fold_in(key, index)), micro)
      return sums["loss_sum"] / total, sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums

  if grad_accum == 1:
    grads, sums = grads_and_sums(state.params, batch, 0)
  else:

    def accumulate(carry, micro_and_index):
      return jax.tree.map(jnp.add, carry, grads_and_sums(state.params, *micro_and_index)), None

    first = jax.tree.map(lambda x: x[: x.shape[0] // grad_accum], batch)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_sums, state.params, first, 0))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (_microbatches(batch, grad_accum), jnp.arange(grad_accum)))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  consecutive, skipped = optim.nonfinite_counts(opt_state)
  metrics = {
    "loss": sums["loss_sum"] / total,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": schedule(state.step),
    "nonfinite_consecutive": consecutive,
    "skipped_steps": skipped,
    "examples": sums["weight_sum"],
    "tokens": (batch["attention_mask"].astype(jnp.float32) * batch["weights"][:, None]).sum(),
  }
  if "correct_sum" in sums:
    metrics["accuracy"] = sums["correct_sum"] / total
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, graphdef, spec: TaskSpec) -> dict[str, jax.Array]:
  """The outputs on one batch, deterministic: `logits` [B, C], or `start_logits` and
  `end_logits` [B, L]; with classification labels also the loss sums."""
  outputs = _outputs(graphdef, params, batch, None)
  if spec.kind == "qa":
    return {"start_logits": outputs[0], "end_logits": outputs[1]}
  return {"logits": outputs, **loss_sums(spec, outputs, batch)}


def _init_state(cfg: BertConfig, spec: TaskSpec, head_dropout: float, tx, seed) -> TrainState:
  rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), _PARAMS_STREAM))
  model = heads.build(cfg, spec, head_dropout, rngs)
  return fresh_state(nnx.state(model, nnx.Param).to_pure_dict(), tx, seed)


def compile_steps(
  cfg: BertConfig, spec: TaskSpec, head_dropout: float, optim_cfg, total_steps: int, grad_accum: int, mesh: Mesh
) -> CompiledSteps:
  """Shardings from the model's logical axes, then jitted init / train / eval over `mesh`.

  `optim_cfg` is the run's optimizer section with the fine-tuning warmup in it; the schedule
  decays to `end_lr` at `total_steps`. Nothing is compiled until first called. Runs that differ
  only in their seed (the GLUE suite's), or a run and its resumption in one process, get the same
  jitted functions, so they compile once.

  Args:
    cfg: the body's resolved BertConfig.
    spec: the task (the head and the loss).
    head_dropout: `finetune.head_dropout`.
    optim_cfg: the optimizer section, warmup included.
    total_steps: the schedule's length.
    grad_accum: microbatches accumulated into one step.
    mesh: the device mesh.
  Returns:
    CompiledSteps, as pretraining's `compile_steps`.
  """
  optim_values = tuple(sorted(optim_cfg.items()))
  return _compile_steps(cfg, spec, head_dropout, optim_values, total_steps, grad_accum, mesh)


@functools.lru_cache(maxsize=8)
def _compile_steps(cfg, spec, head_dropout, optim_values, total_steps, grad_accum, mesh) -> CompiledSteps:
  optim_cfg = ml_collections.ConfigDict(dict(optim_values))
  tx = optim.build_optimizer(optim_cfg, total_steps)
  schedule = optim.learning_rate_schedule(optim_cfg, total_steps)
  return jit_steps(
    heads.abstract(cfg, spec, head_dropout),
    functools.partial(_init_state, cfg, spec, head_dropout, tx),
    lambda graphdef: functools.partial(
      train_step, graphdef=graphdef, tx=tx, schedule=schedule, spec=spec, grad_accum=grad_accum
    ),
    lambda graphdef: functools.partial(eval_step, graphdef=graphdef, spec=spec),
    tx,
    schedule,
    mesh,
  )


def device_keys(spec: TaskSpec, with_labels: bool) -> tuple[str, ...]:
  """The batch arrays the steps read."""
  return INPUTS + (LABELS[spec.kind] if with_labels else ())
