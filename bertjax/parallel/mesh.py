"""The device mesh: the `data` x `fsdp` x `tensor` grid over every process's devices.

make_mesh          the mesh a run uses, over real devices
abstract_mesh      a mesh of a given shape with no devices (planning, AOT compilation)
device_grid        devices laid out so that only `data` crosses slices or nodes
rows_for_sharding  which rows of the global batch this process's devices hold
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from bertjax.errors import BertjaxError
from bertjax.parallel.layout import MESH_AXES, dcn_slices, mesh_shape


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The `data` x `fsdp` x `tensor` mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: placement follows the logical rules and GSPMD propagation (jax.make_mesh would
  # default to Explicit axes).
  return Mesh(device_grid(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
  """A `data` x `fsdp` x `tensor` mesh of `shape` without devices: shardings, shapes, lowering."""
  return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rows_for_sharding(sharding, batch_size: int) -> np.ndarray:
  """The global batch rows this process's devices hold under `sharding` (sorted, unique)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
    rows.update(range(*index[0].indices(batch_size)))
  return np.array(sorted(rows), np.int64)


def device_grid(mesh_cfg, devices: Sequence):
  """`devices` arranged as the (data, fsdp, tensor) mesh, with only `data` crossing slices.

  With mesh.dcn_data = S > 1, the devices are grouped into S slices (TPU devices carry a
  `slice_index`; elsewhere consecutive processes form a group, e.g. the GPUs of one node under
  SLURM's block placement), each slice becomes a (data / S, fsdp, tensor) grid laid out for its
  fast interconnect, and the slices are stacked along `data`: FSDP and tensor collectives stay
  inside a slice, only the gradient all-reduce of data parallelism crosses the slow network.
  Returns an object array of devices for `jax.sharding.Mesh(grid, MESH_AXES, axis_types=...)`.
  """
  data, fsdp, tensor = mesh_shape(mesh_cfg, len(devices))
  slices = dcn_slices(mesh_cfg)
  groups = _slice_groups(list(devices), slices)
  per_slice = [
    mesh_utils.create_device_mesh((data // slices, fsdp, tensor), group, allow_split_physical_axes=True)
    for group in groups
  ]
  return np.concatenate(per_slice, axis=0)


def _slice_groups(devices: list, slices: int) -> list[list]:
  """The devices of each slice (or node), in slice order."""
  if hasattr(devices[0], "slice_index"):
    keys = sorted({d.slice_index for d in devices})
    if slices == 1 and len(keys) > 1:  # a multislice job run as one slice: every collective on DCN
      raise BertjaxError(
        f"config mesh.dcn_data=1, but the devices form {len(keys)} slices; set --config.mesh.dcn_data={len(keys)}"
      )
    groups = [[d for d in devices if d.slice_index == key] for key in keys]
  elif slices == 1:
    return [devices]
  else:
    processes = sorted({d.process_index for d in devices})
    if len(processes) % slices:
      raise BertjaxError(
        f"config mesh.dcn_data={slices}: {len(processes)} processes do not split into {slices} "
        "equal nodes; set mesh.dcn_data to the number of nodes"
      )
    node_of = {p: i * slices // len(processes) for i, p in enumerate(processes)}
    groups = [[d for d in devices if node_of[d.process_index] == node] for node in range(slices)]
  if len(groups) != slices or len({len(g) for g in groups}) != 1:
    sizes = ", ".join(str(len(g)) for g in groups)
    raise BertjaxError(
      f"config mesh.dcn_data={slices}, but the devices form {len(groups)} slice(s) of sizes {sizes}; "
      "set mesh.dcn_data to the number of slices in the job"
    )
  return [sorted(g, key=lambda d: d.id) for g in groups]
