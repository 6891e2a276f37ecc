"""A fine-tuning task as a task of the one trainer: its head's model, losses and eval outputs.

    Finetune(spec, head_dropout)   the `bertjax.train.task.Task` of a classification, regression,
                                   extractive-QA, token-classification or multiple-choice run;
                                   compile it with `bertjax.train.steps.compile_steps`
    device_keys(spec, with_labels) the batch arrays its steps read

Losses are sums over the real rows of a batch (`weights` 1; padding rows 0) divided by the batch's
real-row count, so a padded last batch and gradient accumulation give the mean over the examples.
Classification: softmax cross-entropy; regression: squared error (the one output is the
prediction); QA: the mean of the start and end positions' cross-entropies, as BERT; multiple
choice: softmax cross-entropy over the choices' scores. NER: softmax cross-entropy of each word's
first sub-token (`label_weights` 1; other sub-tokens, special tokens and padding 0), summed and
divided by the batch's labelled tokens, so a batch's loss is the mean over its words.
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
LABELS = {
  "classification": ("labels",),
  "qa": ("start_positions", "end_positions"),
  "ner": ("tag_ids", "label_weights"),  # label_weights: 1 on each word's first sub-token
  "multiple_choice": ("labels",),
}


def _sums(per_item, weights, correct=None) -> dict[str, jax.Array]:
  w = weights.astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(per_item * w), "weight_sum": jnp.sum(w)}
  if correct is not None:
    sums["correct_sum"] = jnp.sum(correct.astype(jnp.float32) * w)
  return sums


def _span_sums(outputs, batch: Batch) -> dict[str, jax.Array]:
  start_BxL, end_BxL = outputs
  per_row = 0.5 * (
    optax.softmax_cross_entropy_with_integer_labels(start_BxL, batch["start_positions"])
    + optax.softmax_cross_entropy_with_integer_labels(end_BxL, batch["end_positions"])
  )
  return _sums(per_row, batch["weights"])


def _token_sums(logits_BxLxC, batch: Batch) -> dict[str, jax.Array]:
  """Over the labelled tokens of the real rows: a padding row's tokens weigh 0 too."""
  w_BxL = batch["label_weights"].astype(jnp.float32) * batch["weights"].astype(jnp.float32)[:, None]
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxC, batch["tag_ids"])
  return _sums(per_token, w_BxL, jnp.argmax(logits_BxLxC, -1) == batch["tag_ids"])


def _class_sums(logits_BxC, batch: Batch) -> dict[str, jax.Array]:
  """Softmax cross-entropy over classes, or over the choices of a multiple-choice row."""
  per_row = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
  return _sums(per_row, batch["weights"], jnp.argmax(logits_BxC, -1) == batch["labels"])


def loss_sums(spec: TaskSpec, outputs, batch: Batch) -> dict[str, jax.Array]:
  """Loss (and, but for QA and regression, correct-prediction) sums over the batch's real rows.

  Args:
    spec: the task.
    outputs: the model's: logits [B, C] (classification, regression; multiple choice: C choices),
      (start, end) logits [B, L] (QA), or logits [B, L, C] (NER: C tags).
    batch: `weights` [B] (1 real row, 0 padding) and the labels: `labels` [B] (class or choice
      ids, or floats for regression), `start_positions` and `end_positions` [B], or `tag_ids`
      and `label_weights` [B, L] (NER: 1 on the tokens that carry a word's tag).
  Returns:
    float32 scalars `loss_sum` and `weight_sum` (rows; NER: labelled tokens), and `correct_sum`.
  """
  if spec.kind == "qa":
    return _span_sums(outputs, batch)
  if spec.kind == "ner":
    return _token_sums(outputs, batch)
  if spec.regression:
    return _sums(jnp.square(outputs[:, 0] - batch["labels"].astype(jnp.float32)), batch["weights"])
  return _class_sums(outputs, batch)


@dataclasses.dataclass(frozen=True)
class Finetune:
  """A fine-tuning head on BERT's body, trained on the task's labelled rows."""

  spec: TaskSpec
  head_dropout: float  # finetune.head_dropout: before the output layer (every head but QA's)

  def build(self, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
    return heads.build(cfg, self.spec, self.head_dropout, rngs)

  def sums(self, model, batch: Batch, dropout_key) -> dict[str, jax.Array]:
    return loss_sums(self.spec, _outputs(model, batch, dropout_key), batch)

  def totals(self, batch: Batch) -> dict[str, jax.Array]:
    """Real rows, and for NER the labelled tokens of real rows: the loss is a mean over those."""
    w_B = batch["weights"].astype(jnp.float32)
    totals = {"rows": jnp.maximum(w_B.sum(), 1.0)}
    if self.spec.kind == "ner":
      totals["labelled"] = jnp.maximum((batch["label_weights"].astype(jnp.float32) * w_B[:, None]).sum(), 1.0)
    return totals

  def objective(self, sums, totals) -> jax.Array:
    return sums["loss_sum"] / totals[_denominator(self.spec)]

  def metrics(self, sums, totals, batch: Batch) -> dict[str, jax.Array]:
    w_B = batch["weights"].astype(jnp.float32)
    mask = batch["attention_mask"].astype(jnp.float32)  # [B, L], or [B, C, L] for multiple choice
    metrics = {
      "loss": sums["loss_sum"] / totals[_denominator(self.spec)],
      "examples": w_B.sum(),
      "tokens": (mask * w_B.reshape(w_B.shape + (1,) * (mask.ndim - 1))).sum(),
    }
    if "correct_sum" in sums:  # NER: token accuracy over the labelled tokens
      metrics["accuracy"] = sums["correct_sum"] / totals[_denominator(self.spec)]
    return metrics

  def evaluate(self, model, batch: Batch) -> dict[str, jax.Array]:
    """`logits` [B, C] (classification, multiple choice), `start_logits` and `end_logits` [B, L]
    (QA), or the argmax tag ids `predictions` [B, L] (NER); but for QA also the loss sums."""
    outputs = _outputs(model, batch, None)
    if self.spec.kind == "qa":
      return {"start_logits": outputs[0], "end_logits": outputs[1]}
    if self.spec.kind == "ner":  # the argmax only: a [B, L, C] transfer is C times larger
      return {"predictions": jnp.argmax(outputs, -1).astype(jnp.int32), **loss_sums(self.spec, outputs, batch)}
    return {"logits": outputs, **loss_sums(self.spec, outputs, batch)}


def _outputs(model, batch: Batch, dropout_key):
  return model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"], dropout_key=dropout_key)


def _denominator(spec: TaskSpec) -> str:
  return "labelled" if spec.kind == "ner" else "rows"


def device_keys(spec: TaskSpec, with_labels: bool) -> tuple[str, ...]:
  """The batch arrays the steps read."""
  return INPUTS + (LABELS[spec.kind] if with_labels else ())
