"""Pretraining as a task of the one trainer: BERT's masked-LM and next-sentence objectives.

The objective is normalised by the whole batch's masked weights and pair count (real pairs, not
rows, when the batch is packed), so k microbatches give the gradient of one step on the whole
batch. The eval step returns the loss and accuracy sums; add them over batches, then
`losses.from_sums`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from bertjax.model.bert import BertForPreTraining
from bertjax.model.config import BertConfig
from bertjax.train import losses
from bertjax.train.task import Batch

# A packed batch (data.pack_pairs) carries these too: per-pair positions, pair ids (attention stays
# within a pair) and each pair's [CLS]; NSP labels and weights are then [B, K], one per pair slot.
PACKING_ARRAYS = ("position_ids", "pair_ids", "nsp_positions")


def pair_count(batch: Batch) -> jax.Array:
  """Real NSP pairs in a batch: one a row, or with packing the weighted pair slots."""
  if "nsp_weights" in batch:
    return batch["nsp_weights"].astype(jnp.float32).sum()
  return jnp.float32(batch["nsp_labels"].size)


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """BertForPreTraining on the input pipeline's batches (`bertjax.data`)."""

  def build(self, cfg: BertConfig, rngs: nnx.Rngs) -> BertForPreTraining:
    return BertForPreTraining(cfg, rngs=rngs)

  def sums(self, model: BertForPreTraining, batch: Batch, dropout_key) -> dict[str, jax.Array]:
    mlm, nsp = model(
      batch["input_ids"],
      batch["segment_ids"],
      batch["attention_mask"],
      batch["masked_positions"],
      **{k: batch[k] for k in PACKING_ARRAYS if k in batch},
      dropout_key=dropout_key,
    )
    return losses.pretraining_sums(mlm, nsp, batch)

  def totals(self, batch: Batch) -> dict[str, jax.Array]:
    return {
      "masked": jnp.maximum(batch["masked_weights"].astype(jnp.float32).sum(), 1e-8),
      "pairs": jnp.maximum(pair_count(batch), 1.0),
    }

  def objective(self, sums, totals) -> jax.Array:
    return sums["mlm_loss_sum"] / totals["masked"] + sums["nsp_loss_sum"] / totals["pairs"]

  def metrics(self, sums, totals, batch: Batch) -> dict[str, jax.Array]:
    real_BxL = batch["attention_mask"].astype(jnp.float32)
    return {
      **losses.from_sums(sums),
      "tokens": real_BxL.sum(),  # non-padding: the loop's tokens/s counts these
      "examples": jnp.float32(real_BxL.shape[0]),
      "padding_fraction": 1.0 - real_BxL.mean(),
      "pairs_per_row": pair_count(batch) / real_BxL.shape[0],
    }

  def evaluate(self, model: BertForPreTraining, batch: Batch) -> dict[str, jax.Array]:
    return self.sums(model, batch, None)
