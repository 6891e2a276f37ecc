"""The fine-tuning steps on any mesh: the heads' parameters are placed by the one RULES table,
and the models on a data x fsdp x tensor mesh compute what they compute data-parallel (the train
step is jitted over the same shardings)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bertjax import tasks
from bertjax.finetune.task import Finetune
from bertjax.parallel import mesh as mesh_lib
from bertjax.train import steps
from tests.support.micro import micro_bert, optim_config

CLASSIFIER = tasks.TaskSpec("classification", "custom", ("a", "b", "c"))
SPANS = tasks.TaskSpec("qa", "squad")


def _steps(spec, shape, grad_accum=1, head_dropout=0.0):
  mesh = mesh_lib.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[: int(np.prod(shape))])
  model = micro_bert(dropout=0.0, attention_dropout=0.0)
  return steps.compile_steps(Finetune(spec, head_dropout), model, optim_config(), 10, grad_accum, mesh)


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


def test_accumulated_microbatches_take_the_step_of_the_whole_padded_batch():
  """The loss is divided by the whole batch's real rows, so 2 microbatches (one holding the
  padding row) give the step of one batch of 8."""
  for spec in (CLASSIFIER, SPANS):
    batch = _batch(spec, np.random.default_rng(1))
    whole, halves = _steps(spec, (2, 1, 1)), _steps(spec, (2, 1, 1), grad_accum=2)
    state = whole.init(0)
    (after_whole, m_whole), (after_halves, m_halves) = whole.train(state, batch), halves.train(whole.init(0), batch)
    assert float(m_halves["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-5)
    assert float(m_halves["examples"]) == float(m_whole["examples"]) == 7.0
    for a, b in zip(jax.tree.leaves(after_whole.params), jax.tree.leaves(after_halves.params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_classifier_drops_the_pooled_output_with_the_models_dropout():
  """Head dropout (the model's `dropout`, its `dropout_impl` mask) is on in a train step: with the
  body's dropout off, a step with head dropout computes another loss than one without."""
  batch = _batch(CLASSIFIER, np.random.default_rng(2))
  plain, dropped = _steps(CLASSIFIER, (1, 1, 1)), _steps(CLASSIFIER, (1, 1, 1), head_dropout=0.5)
  _, without = plain.train(plain.init(0), batch)
  _, with_dropout = dropped.train(dropped.init(0), batch)
  assert float(without["loss"]) != float(with_dropout["loss"])
