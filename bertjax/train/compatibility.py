"""Whether a checkpoint fits a run, and a new run started from another run's checkpoint.

model_sizes(model_config)          the sizes a checkpoint's meta records under `model`
check_compatible(meta, ...)        refuse a checkpoint whose arrays or tokenizer do not fit
warm_start(init_from, steps, ...)  a TrainState from another run's newest good step
"""

import dataclasses

from bertjax.errors import BertjaxError
from bertjax.train.checkpoint import Checkpoints

# Sizes that must match for a checkpoint's parameters to fit the model (dtype, dropout, remat
# and attention kernel may change between runs; the arrays do not).
STRUCTURAL_KEYS = (
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
)


def model_sizes(model_config) -> dict:
  """The BertConfig's STRUCTURAL_KEYS, the sizes a checkpoint's meta records under `model`."""
  sizes = dataclasses.asdict(model_config)
  return {k: sizes[k] for k in STRUCTURAL_KEYS}


def check_compatible(meta: dict, model_config, tokenizer_fingerprint: str | None, source: str) -> None:
  """Refuse a checkpoint whose parameters or tokenizer do not fit this run.

  Args:
    meta: the checkpoint's meta (`model` sizes, `tokenizer_fingerprint`).
    model_config: this run's resolved BertConfig.
    tokenizer_fingerprint: this run's tokenizer's; None (or a meta without one) skips that check.
    source: the input the message names (`--workdir ...`, `train.init_from=...`).
  Raises:
    BertjaxError: a structural size or the tokenizer differs.
  """
  saved, current = meta.get("model", {}), model_sizes(model_config)
  differing = [f"{k} {saved.get(k)} -> {current[k]}" for k in STRUCTURAL_KEYS if saved.get(k) != current[k]]
  if differing:
    raise BertjaxError(
      f"{source}: the model differs from the checkpoint's ({', '.join(differing)}); "
      "use the checkpoint's model config or a new workdir"
    )
  saved_tokenizer = meta.get("tokenizer_fingerprint")
  if tokenizer_fingerprint and saved_tokenizer and saved_tokenizer != tokenizer_fingerprint:
    raise BertjaxError(
      f"{source}: the tokenizer ({tokenizer_fingerprint}) differs from the one the checkpoint "
      f"was trained with ({saved_tokenizer}); use that tokenizer or a new workdir"
    )


def warm_start(init_from, steps, model_config, *, params_only: bool, seed: int, tokenizer_fingerprint=None):
  """A TrainState for a new run from another run's newest good checkpoint.

  By default the parameters, optimizer state and global step carry over (phase 2 continues
  phase 1's learning-rate schedule); with `params_only`, only the parameters do, and the
  optimizer starts afresh at step 0 (fine-tuning, a new optimizer). `steps` is the new run's
  CompiledSteps: the state lands on its mesh.

  Args:
    init_from: the source run folder (`train.init_from`).
    steps: the new run's CompiledSteps.
    model_config: the new run's BertConfig; its structural sizes must match the checkpoint's.
    params_only: carry over the parameters alone, with a fresh optimizer state and rng from `seed`.
    seed: `train.seed`, used only with `params_only`.
    tokenizer_fingerprint: the new run's tokenizer's, checked against the checkpoint's if given.
  Raises:
    BertjaxError: `init_from` has no checkpoints, or its model or tokenizer does not fit.
    CheckpointError: no step there can be restored.
  """
  with Checkpoints(init_from, read_only=True) as source:
    if not source.steps():
      raise BertjaxError(f"train.init_from={init_from}: no checkpoints there; point it at a bertjax run folder")

    def check(meta):
      check_compatible(meta, model_config, tokenizer_fingerprint, f"train.init_from={init_from}")

    if params_only:
      params, _ = source.restore_params(steps.abstract_state().params, check=check)
      return steps.init(seed).replace(params=params)
    state, _ = source.restore(steps.abstract_state(), check=check)
    return state
