"""The rules: every parameter's partition spec on each mesh, and the batch's; mesh.rules; the check after init."""

import math

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bertjax.config import defaults
from bertjax.errors import BertjaxError
from bertjax.model import bert
from bertjax.parallel import layout, rules
from bertjax.parallel import mesh as mesh_lib
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


# The rules themselves, apart from the steps: mesh.rules, the active table, the check after init.
SIZES = dict(hidden_size=64, num_heads=8, intermediate_size=128)


def _abstract_params():
  return nnx.state(bert.abstract_model(micro_bert(**SIZES)), nnx.Param)


def _flat(specs) -> dict[str, P]:
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return {"/".join(str(k.key) for k in path): s for path, s in flat}


def _mesh(shape):
  return mesh_lib.make_mesh(dict(zip(MESH_AXES, shape)), jax.devices()[: math.prod(shape)])


def test_the_default_mesh_rules_are_the_table():
  assert rules.from_config(defaults.get_config().mesh) == layout.RULES == rules.RULES
  assert layout.parse_rules(layout.format_rules(layout.RULES)) == layout.RULES
  assert layout.parse_rules("") == layout.RULES
  # Every logical name the model gives its parameters has a rule.
  logical = jax.tree.leaves(
    nnx.to_pure_dict(nnx.get_partition_spec(_abstract_params())), is_leaf=lambda x: isinstance(x, P)
  )
  names = {n for spec in logical for n in spec if n is not None}
  assert names <= set(layout.LOGICAL_AXES), names - set(layout.LOGICAL_AXES)


def test_the_default_rules_give_the_expected_specs_explicitly_and_by_default():
  explicit = _flat(rules.param_specs(_abstract_params(), layout.RULES))
  assert explicit == _flat(rules.param_specs(_abstract_params()))
  assert explicit["encoder/layers/feed_forward/in_kernel"] == P(None, "fsdp", "tensor")
  assert explicit["embeddings/word"] == P("tensor", "fsdp")


def test_an_entry_replaces_only_its_own_rule():
  table = layout.parse_rules(" mlp = fsdp+tensor , embed= ,act_batch=data")
  assert dict(table)["mlp"] == ("fsdp", "tensor") and dict(table)["embed"] == () and dict(table)["vocab"] == ("tensor",)
  specs = _flat(rules.param_specs(_abstract_params(), table))
  assert specs["encoder/layers/feed_forward/in_kernel"] == P(None, None, ("fsdp", "tensor"))
  assert specs["embeddings/word"] == P("tensor", None)
  assert rules.batch_sharding(_mesh((2, 2, 2)), table).spec == P("data")


@pytest.mark.parametrize(
  "text, message",
  [
    ("embedd=fsdp", "'embedd' is not a logical axis; use one of layers, vocab, embed"),
    ("embed=fdsp", "embed=fdsp names mesh axis 'fdsp'; map embed to data, fsdp, tensor joined by +"),
    ("embed", "'embed' has no '='"),
    ("embed=fsdp,embed=tensor", "embed is given twice"),
    ("mlp=tensor+tensor", "names a mesh axis twice"),
  ],
)
def test_a_bad_rule_is_one_line_naming_mesh_rules(text, message):
  with pytest.raises(BertjaxError) as e:
    layout.parse_rules(text)
  assert str(e.value).startswith("config mesh.rules: ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_constrain_places_activations_by_the_rules_its_function_was_traced_under():
  def f(x):
    return rules.constrain(x, ("act_batch", "act_mlp"))

  x = jax.numpy.ones((8, 4))
  with jax.set_mesh(_mesh((2, 2, 2))):
    default = str(jax.make_jaxpr(jax.jit(f))(x))
    configured = str(jax.make_jaxpr(jax.jit(rules.traced_under(layout.parse_rules("act_batch=data,act_mlp="), f)))(x))
  assert "spec=P(('data', 'fsdp'), 'tensor')" in default
  assert "spec=P('data', None)" in configured
  assert rules.active_rules() == layout.RULES  # the context ends with the trace


@pytest.mark.parametrize("shape", list(MESHES.values()))
def test_the_default_rules_pass_the_check_after_init(shape):
  params = _abstract_params()
  rules.check_sharded(params, rules.named(_mesh(shape), rules.param_specs(params)), min_bytes=4096)


def test_the_check_after_init_catches_a_parameter_left_whole_under_fsdp():
  params, table = _abstract_params(), layout.parse_rules("embed=")
  placed = rules.named(_mesh((1, 8, 1)), rules.param_specs(params, table))
  with pytest.raises(BertjaxError) as e:
    rules.check_sharded(params, placed, table, min_bytes=4096)
  message = str(e.value)
  assert message.startswith(
    "parameter embeddings/position [position, embed] (16 KiB), placed as P(None, None), "
    "is not split over mesh axis fsdp (size 8): mesh.rules maps none of its axes to fsdp"
  )
  assert "(position=, embed=)" in message and "--config.mesh.rules=embed=fsdp" in message and "\n" not in message
  # Small parameters may stay whole; and a data-parallel mesh promises no split.
  rules.check_sharded(params, placed, table, min_bytes=1 << 20)
  rules.check_sharded(params, rules.named(_mesh((8, 1, 1)), rules.param_specs(params, table)), table, min_bytes=4096)


def test_the_check_after_init_reads_the_arrays_shardings_and_the_rules_they_should_follow():
  params = _abstract_params()
  mesh = _mesh((1, 2, 4))
  # Placed by a table without mlp=tensor, checked against the default: the MLP kernels are not split over tensor.
  placed = rules.named(mesh, rules.param_specs(params, layout.parse_rules("mlp=")))
  arrays = jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(params), placed
  )
  with pytest.raises(
    BertjaxError, match=r"feed_forward/in_kernel \[layers, embed, mlp\].* tensor \(size 4\): mesh.rules' mlp=tensor"
  ):
    rules.check_sharded(params, arrays, min_bytes=4096)
