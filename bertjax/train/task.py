"""What a task gives the one trainer: its model, its losses as sums, its metrics.

Pretraining (`bertjax.train.pretraining`) and every fine-tuning task (`bertjax.finetune.task`)
are a `Task`; the step (`bertjax.train.steps`), the loop (`bertjax.train.loop`), checkpoints and
the optimizer are shared. A step computes a task's `sums` on each microbatch, adds them up, and
divides by the task's `totals` over the whole batch, so k microbatches give the gradient of one
step on the whole batch whatever the task.

A task is a frozen dataclass: it is hashable, so steps compiled for it are reused by every run in
a process that asks for the same task, model and optimizer.
"""

from typing import Protocol

import jax
from flax import nnx

from bertjax.model.config import BertConfig

Batch = dict[str, jax.Array]


class Task(Protocol):
  """The task-specific half of a train and eval step; everything else is shared."""

  def build(self, cfg: BertConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The task's model, its parameters drawn from `rngs` (logical axis names on each)."""
    ...

  def sums(self, model: nnx.Module, batch: Batch, dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """Loss sums (float32 scalars) of one (micro)batch; `dropout_key=None` is deterministic."""
    ...

  def totals(self, batch: Batch) -> dict[str, jax.Array]:
    """The denominators of the objective over the whole global batch (masked tokens, real rows)."""
    ...

  def objective(self, sums: dict[str, jax.Array], totals: dict[str, jax.Array]) -> jax.Array:
    """The scalar the step differentiates, from a microbatch's sums and the batch's totals."""
    ...

  def metrics(self, sums: dict[str, jax.Array], totals: dict[str, jax.Array], batch: Batch) -> dict[str, jax.Array]:
    """What a train step reports from the batch's accumulated sums; includes `tokens` (real tokens)
    and `examples` (real rows), which the loop turns into rates."""
    ...

  def evaluate(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """An eval step's outputs on one batch: scalar sums to add over batches, [B, ...] arrays per row."""
    ...
