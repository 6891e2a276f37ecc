"""The fine-tuning steps on any mesh: the heads' parameters are placed by the one RULES table,
and the models on a data x fsdp x tensor mesh compute what they compute data-parallel (the train
step is jitted over the same shardings)."""

import jax
import numpy as np
from jax.sharding import PartitionSpec

from bertjax.finetune import steps, tasks
from bertjax.parallel import mesh as mesh_lib
from tests.support.micro import micro_bert, optim_config

CLASSIFIER = tasks.TaskSpec("classification", "custom", ("a", "b", "c"))
SPANS = tasks.TaskSpec("qa", "squad")


def _steps(spec, shape):
  mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[: int(np.prod(shape))])
  return steps.compile_steps(micro_bert(dropout=0.0, attention_dropout=0.0), spec, 0.0, optim_config(), 10, 1, mesh)


def _batch(spec, rng):
  ids = rng.integers(5, 256, (8, 16)).astype(np.int32)
  batch = {
    "input_ids": ids,
    "segment_ids": (np.arange(16) >= 8).astype(np.int32)[None].repeat(8, 0),
    "attention_mask": np.ones_like(ids),
    "weights": np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32),  # a padding row
  }
  if spec.kind == "qa":
    batch.update(
      start_positions=rng.integers(0, 16, 8).astype(np.int32), end_positions=rng.integers(0, 16, 8).astype(np.int32)
    )
  else:
    batch["labels"] = rng.integers(0, 3, 8).astype(np.int32)
  return batch


def test_the_heads_are_placed_by_the_rules_table():
  shardings = _steps(CLASSIFIER, (2, 2, 2)).state_shardings.params
  assert shardings["classifier"]["kernel"].spec == PartitionSpec("tensor", None)  # embed_out, classes
  assert shardings["pooler"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  shardings = _steps(SPANS, (2, 2, 2)).state_shardings.params
  assert shardings["qa_outputs"]["kernel"].spec == PartitionSpec("fsdp", None)  # embed, classes
  assert "pooler" not in shardings


def test_the_heads_compute_the_same_on_a_data_fsdp_tensor_mesh_as_data_parallel():
  for spec in (CLASSIFIER, SPANS):
    batch = _batch(spec, np.random.default_rng(0))
    data_parallel, mixed = _steps(spec, (8, 1, 1)), _steps(spec, (2, 2, 2))
    params = data_parallel.init(0).params
    placed = jax.device_put(params, mixed.state_shardings.params)
    expected, got = jax.device_get((data_parallel.eval(params, batch), mixed.eval(placed, batch)))
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
