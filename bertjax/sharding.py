"""The device mesh, the one logical-axis RULES table, and the shardings derived from them.

The model names every parameter and activation dimension with a logical axis (DESIGN.md,
"Logical axes"); this table alone decides where each lands on the `data` x `fsdp` x `tensor`
mesh, so changing parallelism is changing config, never model code.
"""

from collections.abc import Sequence

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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
  """(data, fsdp, tensor) sizes from the `mesh` config for `device_count` devices.

  `mesh.parallelism` names a layout that fills the devices (`data`, `fsdp`, `fsdp_tensor` with
  `mesh.tensor` as the tensor size); empty uses mesh.data/fsdp/tensor as given, where one -1 fills
  with the remaining devices. `mesh.dcn_data` slices (or nodes) are data-parallel: the `data` axis
  is the only one that crosses the slow network between them (see `device_grid`).
  """
  check_mesh_config(mesh_cfg)
  slices = _config_value(mesh_cfg, "dcn_data", 1)
  if device_count % slices:
    raise BertjaxError(f"config mesh.dcn_data={slices}: {device_count} devices do not split into {slices} equal "
                       "slices; set mesh.dcn_data to the number of slices (TPU) or nodes (GPU)")
  parallelism = _config_value(mesh_cfg, "parallelism", "")
  if parallelism:
    return _named_mesh_shape(parallelism, mesh_cfg["tensor"], device_count, slices)
  data, fsdp, tensor = _given_mesh_shape(mesh_cfg, device_count)
  if data % slices:
    raise BertjaxError(f"config mesh.data={data} is not a multiple of mesh.dcn_data={slices}: slices are "
                       "data-parallel, so set mesh.data to a multiple of the slice count (or -1)")
  return data, fsdp, tensor


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The `data` x `fsdp` x `tensor` mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: placement follows the logical rules and GSPMD propagation (NOTES: make_mesh
  # defaults to Explicit axes in current JAX).
  return Mesh(device_grid(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
      tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of the global batch split over `data` and `fsdp`; sequence and features whole."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",), mesh_axis_names=mesh.axis_names))


# -- Helpers of mesh_shape: the mesh by name, and slices (multislice TPU, multi-node GPU). --

PARALLELISMS = ("", "data", "fsdp", "fsdp_tensor")


def _config_value(mesh_cfg, key: str, default):
  # Configs written before a key existed (an older WORKDIR/config.json) still resolve.
  return mesh_cfg[key] if key in mesh_cfg else default


def check_mesh_config(mesh_cfg) -> None:
  """Every `mesh` value that can be checked without knowing the device count."""
  for axis in MESH_AXES:
    size = mesh_cfg[axis]
    if size == 0 or size < -1:
      raise BertjaxError(f"config mesh.{axis}={size} is not a size; use a positive size, or -1 to fill")
  slices = _config_value(mesh_cfg, "dcn_data", 1)
  if slices < 1:
    raise BertjaxError(f"config mesh.dcn_data={slices} is not a slice count; use 1 (one slice or node) or more")
  parallelism = _config_value(mesh_cfg, "parallelism", "")
  if parallelism not in PARALLELISMS:
    raise BertjaxError(f"config mesh.parallelism={parallelism!r} is not a layout; choose data, fsdp, fsdp_tensor, "
                       "or '' to give mesh.data/fsdp/tensor by hand")
  if not parallelism:
    if [mesh_cfg[axis] for axis in MESH_AXES].count(-1) > 1:
      raise BertjaxError("config mesh: more than one axis is -1; leave at most one axis to fill")
    return
  # A named layout sizes data and fsdp itself: a hand-given size there would be silently ignored.
  for axis, default in (("data", -1), ("fsdp", 1)):
    if mesh_cfg[axis] != default:
      raise BertjaxError(f"config mesh.{axis}={mesh_cfg[axis]} conflicts with mesh.parallelism={parallelism}, which "
                         f"sizes the mesh itself; leave mesh.{axis}={default} or set mesh.parallelism='' to size it by hand")
  if parallelism == "fsdp_tensor" and mesh_cfg["tensor"] == -1:
    raise BertjaxError("config mesh.tensor=-1 with mesh.parallelism=fsdp_tensor: give the tensor-parallel size, "
                       "e.g. --config.mesh.tensor=4")
  if parallelism != "fsdp_tensor" and mesh_cfg["tensor"] != 1:
    raise BertjaxError(f"config mesh.tensor={mesh_cfg['tensor']} is read only by mesh.parallelism=fsdp_tensor; "
                       f"set mesh.parallelism=fsdp_tensor or mesh.tensor=1")


def _named_mesh_shape(parallelism: str, tensor: int, device_count: int, slices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) of a named layout; slices are always data-parallel."""
  if parallelism == "data":
    return device_count, 1, 1
  per_slice = device_count // slices
  if parallelism == "fsdp":
    return slices, per_slice, 1
  if per_slice % tensor:
    raise BertjaxError(f"config mesh.tensor={tensor} does not divide the {per_slice} devices of a slice; "
                       "choose a tensor size that divides the devices per slice (or node), e.g. 4 or 8")
  return slices, per_slice // tensor, tensor


def _given_mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  """mesh.data x mesh.fsdp x mesh.tensor as written; one -1 fills with the remaining devices."""
  sizes = [mesh_cfg[axis] for axis in MESH_AXES]
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


def device_grid(mesh_cfg, devices: Sequence):
  """`devices` arranged as the (data, fsdp, tensor) mesh, with only `data` crossing slices.

  With mesh.dcn_data = S > 1, the devices are grouped into S slices (TPU devices carry a
  `slice_index`; elsewhere consecutive processes form a group, e.g. the GPUs of one node under
  SLURM's block placement), each slice becomes a (data / S, fsdp, tensor) grid laid out for its
  fast interconnect, and the slices are stacked along `data`: FSDP and tensor collectives stay
  inside a slice, only the gradient all-reduce of data parallelism crosses the slow network.
  Returns an object array of devices for `jax.sharding.Mesh(grid, MESH_AXES, axis_types=...)`.
  """
  import numpy as np
  from jax.experimental import mesh_utils

  data, fsdp, tensor = mesh_shape(mesh_cfg, len(devices))
  slices = _config_value(mesh_cfg, "dcn_data", 1)
  groups = _slice_groups(list(devices), slices)
  per_slice = [mesh_utils.create_device_mesh((data // slices, fsdp, tensor), group, allow_split_physical_axes=True)
               for group in groups]
  return np.concatenate(per_slice, axis=0)


def _slice_groups(devices: list, slices: int) -> list[list]:
  """The devices of each slice (or node), in slice order."""
  if hasattr(devices[0], "slice_index"):
    keys = sorted({d.slice_index for d in devices})
    if slices == 1 and len(keys) > 1:  # a multislice job run as one slice: every collective on DCN
      raise BertjaxError(f"config mesh.dcn_data=1, but the devices form {len(keys)} slices; "
                         f"set --config.mesh.dcn_data={len(keys)}")
    groups = [[d for d in devices if d.slice_index == key] for key in keys]
  elif slices == 1:
    return [devices]
  else:
    processes = sorted({d.process_index for d in devices})
    if len(processes) % slices:
      raise BertjaxError(f"config mesh.dcn_data={slices}: {len(processes)} processes do not split into {slices} "
                         "equal nodes; set mesh.dcn_data to the number of nodes")
    node_of = {p: i * slices // len(processes) for i, p in enumerate(processes)}
    groups = [[d for d in devices if node_of[d.process_index] == node] for node in range(slices)]
  if len(groups) != slices or len({len(g) for g in groups}) != 1:
    sizes = ", ".join(str(len(g)) for g in groups)
    raise BertjaxError(f"config mesh.dcn_data={slices}, but the devices form {len(groups)} slice(s) of sizes {sizes}; "
                       "set mesh.dcn_data to the number of slices in the job")
  return [sorted(g, key=lambda d: d.id) for g in groups]
