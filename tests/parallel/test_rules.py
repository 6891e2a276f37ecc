"""The RULES table: every parameter's partition spec on each mesh, and the batch's."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from bertjax.parallel.layout import MESH_AXES
from tests.support.micro import compiled_steps as _steps
from tests.support.micro import micro_bert

MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2), "fsdp+data": (2, 4, 1)}


def _specs(steps) -> dict[str, P]:
  flat = jax.tree_util.tree_leaves_with_path(steps.state_shardings.params)
  return {"/".join(str(k.key) for k in path): s.spec for path, s in flat}


@pytest.mark.parametrize("name", MESHES)
def test_every_parameter_gets_its_expected_partition_spec(name):
  specs = _specs(_steps(MESHES[name], cfg=micro_bert(hidden_size=64, num_heads=8, intermediate_size=128)))
  mesh_axes = dict(zip(MESH_AXES, MESHES[name]))
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
