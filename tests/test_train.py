"""The sharded train step: partition specs, mesh equivalence, accumulation, learning, the guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bertjax import sharding
from bertjax import train as train_lib
from configs import common
from tests.conftest import micro_bert, synthetic_batch

MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2), "fsdp+data": (2, 4, 1)}


def _optim(**changes):
  c = common.get_config().optim
  c.update({"lr": 1e-3, "warmup_steps": 0, **changes})
  return c


def _steps(mesh_shape, cfg=None, grad_accum=1, devices=None, **optim_changes):
  mesh_cfg = dict(zip(sharding.MESH_AXES, mesh_shape))
  devices = jax.devices()[: int(np.prod(mesh_shape))] if devices is None else devices
  mesh = sharding.make_mesh(mesh_cfg, devices)
  return train_lib.compile_steps(cfg or micro_bert(dropout=0.0, attention_dropout=0.0), _optim(**optim_changes),
                                 100, grad_accum, mesh)


def _specs(steps) -> dict[str, P]:
  flat = jax.tree_util.tree_leaves_with_path(steps.state_shardings.params)
  return {"/".join(str(k.key) for k in path): s.spec for path, s in flat}


@pytest.mark.parametrize("name", MESHES)
def test_every_parameter_gets_its_expected_partition_spec(name):
  specs = _specs(_steps(MESHES[name], cfg=micro_bert(hidden_size=64, num_heads=8, intermediate_size=128)))
  mesh_axes = dict(zip(sharding.MESH_AXES, MESHES[name]))
  # What RULES says, written out: embed over fsdp; heads, mlp, vocab and embed_out over tensor.
  expected = {
      "embeddings/word": P("tensor", "fsdp"),
      "embeddings/position": P(None, "fsdp"),
      "embeddings/segment": P(None, "fsdp"),
      "embeddings/norm/scale": P("fsdp"),
      "encoder/layers/attention/qkv_kernel": P(None, "fsdp", None, "tensor", None),
      "encoder/layers/attention/qkv_bias": P(None, None, "tensor", None),
      "encoder/layers/attention/out_kernel": P(None, "tensor", None, "fsdp"),
      "encoder/layers/attention/out_bias": P(None, "fsdp"),
      "encoder/layers/feed_forward/in_kernel": P(None, "fsdp", "tensor"),
      "encoder/layers/feed_forward/in_bias": P(None, "tensor"),
      "encoder/layers/feed_forward/out_kernel": P(None, "tensor", "fsdp"),
      "encoder/layers/output_norm/scale": P(None, "fsdp"),
      "pooler/kernel": P("fsdp", "tensor"),
      "mlm_head/transform_kernel": P("fsdp", "tensor"),
      "mlm_head/output_bias": P("tensor"),
      "nsp_head/kernel": P("tensor", None),
      "nsp_head/bias": P(None),
  }
  for path, spec in expected.items():
    assert specs[path] == spec, (path, specs[path])
  assert len(specs) == 26
  del mesh_axes


def test_batch_rows_split_over_data_and_fsdp():
  steps = _steps((2, 2, 2))
  assert steps.batch_sharding.spec == P(("data", "fsdp"))


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
