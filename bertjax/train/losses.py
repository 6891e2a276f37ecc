"""Pretraining losses and accuracies: MLM over gathered masked positions, NSP on pairs.

Pure functions on float32 logits. Each loss is computed from sums (loss, weight, correct), so a
step that accumulates microbatches can normalise by the whole batch's masked weights instead of
averaging per-microbatch means (which would weigh a microbatch with few masks too much).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


def mlm_sums(logits_BxPxV, masked_ids_BxP, masked_weights_BxP) -> dict[str, jax.Array]:
  """Weighted cross-entropy and correct-prediction sums; padding predictions weigh zero.

  Args:
    logits_BxPxV: MLM logits at the masked positions, any float dtype (computed in float32).
    masked_ids_BxP: the original token ids at those positions.
    masked_weights_BxP: 1 for a real prediction, 0 for a padding slot.
  Returns:
    float32 scalars `mlm_loss_sum`, `mlm_weight_sum`, `mlm_correct_sum`.
  """
  w = masked_weights_BxP.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV.astype(jnp.float32), masked_ids_BxP)
  correct = (jnp.argmax(logits_BxPxV, axis=-1) == masked_ids_BxP).astype(jnp.float32)
  return {"mlm_loss_sum": jnp.sum(ce * w), "mlm_weight_sum": jnp.sum(w), "mlm_correct_sum": jnp.sum(correct * w)}


def nsp_sums(logits_Bx2, labels_B, weights_B=None) -> dict[str, jax.Array]:
  """Cross-entropy and correct sums over sentence pairs (labels: 0 = IsNext, 1 = random).

  Args:
    logits_Bx2: NSP logits; [B, K, 2] with packing (K pair slots a row).
    labels_B: int labels, [B] or [B, K].
    weights_B: 1 for a real pair, 0 for an empty pair slot; None weighs every label 1.
  Returns:
    float32 scalars `nsp_loss_sum`, `nsp_weight_sum`, `nsp_correct_sum`.
  """
  w = jnp.ones(labels_B.shape, jnp.float32) if weights_B is None else weights_B.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_Bx2.astype(jnp.float32), labels_B)
  correct = (jnp.argmax(logits_Bx2, axis=-1) == labels_B).astype(jnp.float32)
  return {"nsp_loss_sum": jnp.sum(ce * w), "nsp_weight_sum": jnp.sum(w), "nsp_correct_sum": jnp.sum(correct * w)}


def pretraining_sums(mlm_logits, nsp_logits, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Both heads' sums for one (micro)batch in the data pipeline's array names.

  Args:
    mlm_logits: [B, P, V] (`mlm_sums`).
    nsp_logits: [B, 2] or [B, K, 2] (`nsp_sums`).
    batch: `masked_ids`, `masked_weights`, `nsp_labels` and, when packed, `nsp_weights`.
  Returns:
    The six sums of `mlm_sums` and `nsp_sums`.
  """
  return {
    **mlm_sums(mlm_logits, batch["masked_ids"], batch["masked_weights"]),
    **nsp_sums(nsp_logits, batch["nsp_labels"], batch.get("nsp_weights")),
  }


def _ratio(num, den):
  return num / jnp.maximum(den, 1e-8)


def from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Losses and accuracies from (possibly accumulated) sums; `loss` = MLM + NSP as in BERT."""
  metrics = {
    "mlm_loss": _ratio(sums["mlm_loss_sum"], sums["mlm_weight_sum"]),
    "mlm_accuracy": _ratio(sums["mlm_correct_sum"], sums["mlm_weight_sum"]),
    "nsp_loss": _ratio(sums["nsp_loss_sum"], sums["nsp_weight_sum"]),
    "nsp_accuracy": _ratio(sums["nsp_correct_sum"], sums["nsp_weight_sum"]),
  }
  metrics["loss"] = metrics["mlm_loss"] + metrics["nsp_loss"]
  return metrics
