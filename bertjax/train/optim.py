"""BERT's optimizers as pure optax transformations: AdamW and LAMB, the learning-rate schedule,
the weight-decay mask, global-norm clipping and the non-finite guard.

AdamW follows google-research/bert's AdamWeightDecayOptimizer, *without* bias correction:
m and v are plain moving averages and the step is lr * (m / (sqrt(v) + eps) + wd * w). optax.adamw
divides m and v by (1 - b^t); we do not, because the recipe's lr 1e-4, warmup 10k and eps 1e-6
were tuned with Google's update, and matching it lets loss curves be compared with the original.
The two differ only early: the uncorrected step is (1 - b1^t) / sqrt(1 - b2^t) times the corrected
one, at most 6.6x (t = 12), 1.26x at t = 1000 and within 1% from t = 3925, all inside a 10k-step
warmup where the learning rate is still at most t/10k of its peak. A run without warmup (some
fine-tuning) takes larger first steps than optax.adamw would.

LAMB (You et al. 2019, as NVIDIA's and ALBERT's) keeps Adam's bias correction, then scales each
layer's update by ||w|| / ||update||. "Each layer" is literal: encoder parameters are stacked on a
leading `layers` axis (docs/architecture.md), so they get one trust ratio per slice of that axis, not one for
the stack as optax.lamb would give. Biases and LayerNorm parameters, excluded from weight decay,
are also excluded from the trust ratio (ALBERT's exclude_from_layer_adaptation, NVIDIA's default).

Non-finite gradients: everything but the learning-rate scaling sits inside optax.apply_if_finite,
so a non-finite gradient leaves parameters and moments unchanged and is counted. The schedule's
step counter sits outside it and counts every step, skipped ones included: the learning rate stays
a pure function of the global step (BERT's phase 2 resumes at step 900k of one 1M-step schedule)
as long as the optimizer state is restored with the parameters.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bertjax.errors import BertjaxError

# apply_if_finite gives up and applies a non-finite update after this many in a row; never let it:
# stopping the run is the training loop's decision (check_nonfinite).
_NEVER_GIVE_UP = 2**31 - 1

# The module holding the encoder's per-layer parameters, stacked on a leading axis.
_STACKED_LAYERS = "layers"


def learning_rate_schedule(optim_cfg: Any, train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then `decay` to `end_lr` at
  `schedule_steps` (0: `train_steps`), constant at `end_lr` after that.

  Decay starts at the end of warmup (as transformers and NVIDIA do); google-research/bert decays
  over [0, total] and lets warmup override its start, which is at most warmup/total lower.
  """
  peak, end, decay = optim_cfg.lr, optim_cfg.end_lr, optim_cfg.decay
  warmup = optim_cfg.warmup_steps
  total = optim_cfg.schedule_steps or train_steps
  power = {"linear": 1.0, "polynomial": optim_cfg.decay_power, "constant": None}[decay]

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warming = peak * step / max(warmup, 1)
    if power is None:
      return jnp.where(step < warmup, warming, peak)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decayed = end + (peak - end) * (1.0 - progress) ** power
    return jnp.where(step < warmup, warming, decayed)

  return schedule


def _names(path) -> tuple[str, ...]:
  # Dict keys only: an nnx.State path also ends in `.value`, which names no module.
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _is_decayed(names: tuple[str, ...]) -> bool:
  leaf, modules = names[-1], names[:-1]
  return not (leaf.endswith("bias") or any(m.endswith("norm") for m in modules))


def weight_decay_mask(params):
  """True where weight decay applies: everything but biases and LayerNorm parameters (Google's
  exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]); embeddings are decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_decayed(_names(path)), params)


class BertAdamState(NamedTuple):
  """Adam's first (`mu`) and second (`nu`) moments, shaped as the parameters."""

  mu: optax.Updates
  nu: optax.Updates


def _scale_by_bert_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's direction m / (sqrt(v) + eps) without bias correction (module docstring)."""

  def init(params):
    return BertAdamState(mu=jax.tree.map(jnp.zeros_like, params), nu=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, grads)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, BertAdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def _layer_norms(x: jax.Array, stacked: bool) -> jax.Array:
  axes = tuple(range(1, x.ndim)) if stacked else None
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _scale_by_layerwise_trust_ratio() -> optax.GradientTransformation:
  """LAMB's ||w|| / ||update||, one ratio per layer; 1 where either norm is 0 or the parameter is
  excluded from weight decay."""

  def scale(path, update, param):
    names = _names(path)
    if not _is_decayed(names):
      return update
    stacked = _STACKED_LAYERS in names
    param_norm, update_norm = _layer_norms(param, stacked), _layer_norms(update, stacked)
    usable = (param_norm > 0) & (update_norm > 0)
    ratio = jnp.where(usable, param_norm / jnp.where(usable, update_norm, 1.0), 1.0)
    return update * ratio

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("LAMB's trust ratio needs the parameters: call update(grads, state, params)")
    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _direction(optim_cfg: Any) -> list[optax.GradientTransformation]:
  """The update direction before the learning rate: Adam moments, weight decay, (LAMB) trust."""
  b1, b2, eps = optim_cfg.b1, optim_cfg.b2, optim_cfg.eps
  decay = optax.add_decayed_weights(optim_cfg.weight_decay, mask=weight_decay_mask)
  if optim_cfg.name == "adamw":
    return [_scale_by_bert_adam(b1, b2, eps), decay]
  return [optax.scale_by_adam(b1, b2, eps), decay, _scale_by_layerwise_trust_ratio()]  # lamb


def build_optimizer(optim_cfg: Any, train_steps: int) -> optax.GradientTransformation:
  """Clipping (if `clip_norm` > 0), AdamW or LAMB with the weight-decay mask, all skipped on a
  non-finite gradient; then the scheduled learning rate, whose counter counts every step."""
  clip = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm > 0 else []
  guarded = optax.apply_if_finite(optax.chain(*clip, *_direction(optim_cfg)), _NEVER_GIVE_UP)
  return optax.chain(guarded, optax.scale_by_learning_rate(learning_rate_schedule(optim_cfg, train_steps)))


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) steps skipped for a non-finite gradient; works inside jit."""
  consecutive = optax.tree_utils.tree_get(opt_state, "notfinite_count")
  total = optax.tree_utils.tree_get(opt_state, "total_notfinite")
  return consecutive, total


def check_nonfinite(consecutive: int, max_nonfinite: int, step: int, newest_checkpoint: int | None = None) -> None:
  """Stops the run (BertjaxError) once `max_nonfinite` steps in a row had a non-finite gradient,
  saying which step went non-finite first and where to resume from with what changed.

  Args:
    consecutive: the step's `nonfinite_consecutive` metric (steps skipped in a row).
    max_nonfinite: `optim.max_nonfinite`.
    step: the number of steps taken, counting this one.
    newest_checkpoint: the newest saved step, which the message offers to resume from; None if none.
  Raises:
    BertjaxError: `consecutive` >= `max_nonfinite`.
  """
  consecutive = int(consecutive)
  if consecutive >= max_nonfinite:
    first = step - consecutive + 1
    resume = (
      f"checkpoint {newest_checkpoint} is from before it: resume from there"
      if newest_checkpoint is not None
      else "start again"
    )
    raise BertjaxError(
      f"step {first} went non-finite, and so did every step to step {step}: the gradient was not finite for "
      f"{consecutive} consecutive steps (optim.max_nonfinite={max_nonfinite}); {resume} with a lower optim.lr, a "
      "longer optim.warmup_steps or optim.clip_norm > 0, or compute in float32 (model.dtype=float32) where it "
      "ran in bfloat16; or check the data"
    )
