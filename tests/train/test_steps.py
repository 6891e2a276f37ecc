"""The sharded train step: mesh equivalence, accumulation, learning, donation, the guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.support.micro import compiled_steps as _steps
from tests.support.micro import micro_bert, synthetic_batch


def _one_step(mesh_shape, batch, grad_accum=1, cfg=None, **optim_changes):
  steps = _steps(mesh_shape, cfg=cfg, grad_accum=grad_accum, **optim_changes)
  state = steps.init(0)
  global_batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
  state, metrics = steps.train(state, global_batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_one_step_is_the_same_on_every_mesh():
  batch = synthetic_batch(batch_size=16)
  reference_params, reference = _one_step((1, 1, 1), batch)
  for name, shape in [("data", (8, 1, 1)), ("fsdp+data", (2, 4, 1)), ("mixed", (2, 2, 2))]:
    params, metrics = _one_step(shape, batch)
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(metrics["grad_norm"], reference["grad_norm"], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(a, b, atol=2e-6, err_msg=name)


def test_dropout_masks_do_not_depend_on_the_mesh():
  batch = synthetic_batch(batch_size=16)
  with_dropout = micro_bert()
  _, one = _one_step((1, 1, 1), batch, cfg=with_dropout)
  _, eight = _one_step((2, 2, 2), batch, cfg=with_dropout)
  np.testing.assert_allclose(one["loss"], eight["loss"], rtol=1e-6)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_one_big_step(k):
  batch = synthetic_batch(batch_size=16)
  whole_params, whole = _one_step((2, 2, 1), batch)
  accum_params, accum = _one_step((2, 2, 1), batch, grad_accum=k)
  for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "grad_norm"):
    np.testing.assert_allclose(accum[key], whole[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(whole_params)):
    np.testing.assert_allclose(a, b, atol=3e-6)


def test_overfitting_one_batch_drives_mlm_accuracy_up():
  steps = _steps((2, 1, 1), lr=3e-3)
  state = steps.init(0)
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in synthetic_batch(batch_size=8).items()}
  for _ in range(150):
    state, metrics = steps.train(state, batch)
  metrics = jax.device_get(metrics)
  assert metrics["mlm_accuracy"] > 0.9, metrics
  assert metrics["nsp_accuracy"] == 1.0, metrics


def test_state_is_created_sharded_and_donated():
  steps = _steps((1, 8, 1))
  state = steps.init(0)
  word = state.params["embeddings"]["word"]
  assert word.sharding.spec == P(None, "fsdp") or word.sharding.spec == P("tensor", "fsdp")
  # No device holds the whole table: each holds 1/8 of the embed columns.
  assert {s.data.shape for s in word.addressable_shards} == {(word.shape[0], word.shape[1] // 8)}
  mu_word = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "sharding"))
  assert any(getattr(x, "shape", None) == word.shape and x.sharding.spec == word.sharding.spec for x in mu_word)
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in synthetic_batch(batch_size=8).items()}
  new_state, _ = steps.train(state, batch)
  assert word.is_deleted()  # donated: the old state's buffers were reused
  assert int(new_state.step) == 1


def test_abstract_state_carries_the_shardings():
  steps = _steps((2, 2, 2))
  abstract = steps.abstract_state()
  leaf = abstract.params["encoder"]["layers"]["feed_forward"]["in_kernel"]
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P(None, "fsdp", "tensor")


def test_nonfinite_gradients_skip_the_update_and_are_counted():
  steps = _steps((2, 1, 1))
  state = steps.init(0)
  before = jax.device_get(state.params)
  batch = synthetic_batch(batch_size=8)
  batch["masked_weights"] = batch["masked_weights"] * np.float32("nan")
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
  for expected in (1, 2):
    state, metrics = steps.train(state, batch)
    assert int(metrics["nonfinite_consecutive"]) == expected and int(metrics["skipped_steps"]) == expected
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2  # the global step still advances: the schedule follows it
