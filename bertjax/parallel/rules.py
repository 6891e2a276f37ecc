"""The one logical-axis RULES table, and the shardings it gives parameters, optimizer and batch.

The model names every parameter and activation dimension with a logical axis
(docs/architecture.md, "Logical axes"); this table alone decides where each lands on the
`data` x `fsdp` x `tensor` mesh, so changing parallelism is changing config, never model code.
"""

from collections.abc import Sequence

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Parameters (no `act_` prefix) and activations (`act_`) have separate names so that the
# placement of one never constrains the other.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("embed_out", "tensor"),  # the output side of square [embed, embed] kernels (pooler, MLM transform)
  ("position", None),
  ("segment", None),
  ("qkv", None),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("classes", None),
  ("act_batch", ("data", "fsdp")),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("act_predictions", None),
)


def logical_to_spec(
  logical_axes: Sequence[str | None], rules=RULES, mesh_axis_names: Sequence[str] | None = None
) -> PartitionSpec:
  """The PartitionSpec for a tuple of logical names; a mesh axis is used at most once.

  A logical name whose mesh axes are already taken by an earlier dimension (or are not in
  `mesh_axis_names`, when given) is replicated, as in flax.linen's logical partitioning.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh_axis_names is None or a in mesh_axis_names))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh_axis_names=mesh.axis_names))


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def param_specs(abstract_params: nnx.State) -> dict:
  """Mesh PartitionSpecs for every parameter, from the logical names the model gives them."""
  logical = nnx.get_partition_spec(abstract_params).to_pure_dict()
  return jax.tree.map(lambda spec: logical_to_spec(tuple(spec)), logical, is_leaf=_is_spec)


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh: Mesh):
  """Moments are sharded like their parameters; counters and other scalars are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_utils.tree_map_params(
    tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings, transform_non_params=lambda _: replicated
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of the global batch split over `data` and `fsdp`; sequence and features whole."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",), mesh_axis_names=mesh.axis_names))
