"""A fine-tuning task as a task of the one trainer: its head's model, losses and eval outputs.

    Finetune(spec, head_dropout)   the `bertjax.train.task.Task` of a classification, regression or
                                   extractive-QA run; compile it with `bertjax.train.steps.compile_steps`
    device_keys(spec, with_labels) the batch arrays its steps read

Losses are sums over the real rows of a batch (`weights` 1; padding rows 0) divided by the batch's
real-row count, so a padded last batch and gradient accumulation give the mean over the examples.
Classification: softmax cross-entropy; regression: squared error (the one output is the
prediction); QA: the mean of the start and end positions' cross-entropies, as BERT.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bertjax.finetune import heads
from bertjax.model.config import BertConfig
from bertjax.tasks import TaskSpec
from bertjax.train.task import Batch

# What the device sees of a batch (features hold more: offsets for decoding, example indices).
INPUTS = ("input_ids", "segment_ids", "attention_mask", "weights")
LABELS = {"classification": ("labels",), "qa": ("start_positions", "end_positions")}


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


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tuning head on BERT's body, trained on the task's labelled rows."""

  spec: TaskSpec
  head_dropout: float  # finetune.head_dropout: on the pooled output (classification)

  def build(self, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
    return heads.build(cfg, self.spec, self.head_dropout, rngs)

  def sums(self, model, batch: Batch, dropout_key) -> dict[str, jax.Array]:
    return loss_sums(self.spec, _outputs(model, batch, dropout_key), batch)

  def totals(self, batch: Batch) -> dict[str, jax.Array]:
    return {"rows": jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1.0)}

  def objective(self, sums, totals) -> jax.Array:
    return sums["loss_sum"] / totals["rows"]

  def metrics(self, sums, totals, batch: Batch) -> dict[str, jax.Array]:
    metrics = {
      "loss": sums["loss_sum"] / totals["rows"],
      "examples": sums["weight_sum"],
      "tokens": (batch["attention_mask"].astype(jnp.float32) * batch["weights"][:, None]).sum(),
    }
    if "correct_sum" in sums:
      metrics["accuracy"] = sums["correct_sum"] / totals["rows"]
    return metrics

  def evaluate(self, model, batch: Batch) -> dict[str, jax.Array]:
    """`logits` [B, C], or `start_logits` and `end_logits` [B, L]; with classification labels
    also the loss sums."""
    outputs = _outputs(model, batch, None)
    if self.spec.kind == "qa":
      return {"start_logits": outputs[0], "end_logits": outputs[1]}
    return {"logits": outputs, **loss_sums(self.spec, outputs, batch)}


def _outputs(model, batch: Batch, dropout_key):
  return model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"], dropout_key=dropout_key)


def device_keys(spec: TaskSpec, with_labels: bool) -> tuple[str, ...]:
  """The batch arrays the steps read."""
  return INPUTS + (LABELS[spec.kind] if with_labels else ())
