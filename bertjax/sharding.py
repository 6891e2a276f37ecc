"""Logical axis names -> mesh axes: the one RULES table, and activation constraints.

The model names every parameter and activation dimension with a logical axis (DESIGN.md,
"Logical axes"); this table alone decides where each lands on the `data` x `fsdp` x `tensor`
mesh, so changing parallelism is changing config, never model code.
"""

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

from bertjax.errors import BertjaxError

MESH_AXES = ("data", "fsdp", "tensor")

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


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from the `mesh` config; one -1 fills with the remaining devices."""
  sizes = [mesh_cfg[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise BertjaxError(f"config mesh.{axis}={size} is not a size; use a positive size, or -1 to fill")
  if sizes.count(-1) > 1:
    raise BertjaxError("config mesh: more than one axis is -1; leave at most one axis to fill")
  fixed = 1
  for size in sizes:
    fixed *= size if size != -1 else 1
  if -1 in sizes:
    if device_count % fixed:
      raise BertjaxError(f"config mesh: {device_count} devices do not divide by the fixed axes' product {fixed}; "
                         "choose mesh sizes whose product divides the device count")
    sizes[sizes.index(-1)] = device_count // fixed
  elif fixed != device_count:
    shape = "x".join(str(s) for s in sizes)
    raise BertjaxError(f"config mesh: data x fsdp x tensor = {shape} = {fixed} devices, but {device_count} are present; "
                       "make the product match or set one axis to -1")
  return tuple(sizes)
