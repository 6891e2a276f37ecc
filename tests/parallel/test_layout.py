"""The mesh from config: named layouts (mesh.parallelism), slices (mesh.dcn_data), the device grid."""

import dataclasses

import jax
import pytest

from bertjax.config import defaults
from bertjax.errors import BertjaxError
from bertjax.parallel import layout
from bertjax.parallel import mesh as mesh_lib


def _mesh(**keys):
  m = defaults.get_config().mesh
  m.update(keys)
  return m


def _resolve(mesh_cfg, devices):
  """What a run does: the static checks at the entry point, then the shape for the devices."""
  layout.check_mesh_config(mesh_cfg)
  return layout.mesh_shape(mesh_cfg, devices)


@pytest.mark.parametrize(
  "keys, devices, shape",
  [
    (dict(), 8, (8, 1, 1)),  # the default: data fills
    (dict(parallelism="data"), 64, (64, 1, 1)),
    (dict(parallelism="fsdp"), 64, (1, 64, 1)),
    (dict(parallelism="fsdp_tensor", tensor=4), 64, (1, 16, 4)),
    (dict(parallelism="fsdp", dcn_data=8), 64, (8, 8, 1)),  # 8 nodes x 8 GPUs: FSDP inside a node
    (dict(parallelism="fsdp_tensor", tensor=8, dcn_data=2), 64, (2, 4, 8)),
    (dict(parallelism="data", dcn_data=4), 64, (64, 1, 1)),
    (dict(data=4, fsdp=-1, dcn_data=2), 64, (4, 16, 1)),  # sizes by hand, slices inside data
  ],
)
def test_a_named_layout_fills_the_devices(keys, devices, shape):
  assert _resolve(_mesh(**keys), devices) == shape


@pytest.mark.parametrize(
  "keys, devices, message",
  [
    (dict(parallelism="zero3"), 8, r"mesh.parallelism='zero3' is not a layout; choose data, fsdp, fsdp_tensor"),
    (dict(parallelism="fsdp", fsdp=4), 8, r"mesh.fsdp=4 conflicts with mesh.parallelism=fsdp.*leave mesh.fsdp=1"),
    (dict(parallelism="data", data=8), 8, r"mesh.data=8 conflicts with mesh.parallelism=data"),
    (dict(parallelism="fsdp", tensor=2), 8, r"mesh.tensor=2 is read only by mesh.parallelism=fsdp_tensor"),
    (dict(parallelism="fsdp_tensor", tensor=-1), 8, r"mesh.tensor=-1 with mesh.parallelism=fsdp_tensor: give"),
    (dict(parallelism="fsdp_tensor", tensor=3), 8, r"mesh.tensor=3 does not divide the 8 devices of a slice"),
    (dict(parallelism="fsdp_tensor", tensor=8, dcn_data=2), 8, r"mesh.tensor=8 does not divide the 4 devices"),
    (dict(dcn_data=0), 8, r"mesh.dcn_data=0 is not a slice count"),
    (dict(dcn_data=3), 8, r"mesh.dcn_data=3: 8 devices do not split into 3 equal slices"),
    (dict(data=2, fsdp=-1, dcn_data=4), 8, r"mesh.data=2 is not a multiple of mesh.dcn_data=4"),
    (dict(fsdp=0), 8, r"mesh.fsdp=0 is not a size"),
  ],
)
def test_a_bad_mesh_config_names_the_key_and_the_fix(keys, devices, message):
  with pytest.raises(BertjaxError, match=message):
    _resolve(_mesh(**keys), devices)


def test_the_mesh_keys_are_checked_without_a_device_count():
  layout.check_mesh_config(_mesh(parallelism="fsdp_tensor", tensor=4, dcn_data=2))
  with pytest.raises(BertjaxError, match="mesh.parallelism='tp' is not a layout"):
    layout.check_mesh_config(_mesh(parallelism="tp"))


def test_a_config_from_before_the_named_layouts_still_resolves():
  assert _resolve({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeSliceDevice(FakeDevice):
  slice_index: int = 0


def test_slices_are_stacked_along_data_and_fsdp_stays_inside_a_slice():
  # Two slices of four, listed interleaved: the grid must still group each slice's devices.
  devices = [FakeSliceDevice(id=i, process_index=i // 2, slice_index=i % 2) for i in range(8)]
  grid = mesh_lib.device_grid(_mesh(parallelism="fsdp", dcn_data=2), devices)
  assert grid.shape == (2, 4, 1)
  assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]


def test_without_slice_indices_consecutive_processes_form_a_node():
  # 4 processes of 2 GPUs each = 2 nodes of 4 (SLURM places tasks node by node).
  devices = [FakeDevice(id=i, process_index=i // 2) for i in range(8)]
  grid = mesh_lib.device_grid(_mesh(parallelism="fsdp", dcn_data=2), devices)
  assert [[d.id for d in grid[i].ravel()] for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_multislice_job_configured_as_one_slice_is_refused():
  devices = [FakeSliceDevice(id=i, process_index=i, slice_index=i // 4) for i in range(8)]
  with pytest.raises(BertjaxError, match="the devices form 2 slices; set --config.mesh.dcn_data=2"):
    mesh_lib.device_grid(_mesh(parallelism="fsdp"), devices)


def test_one_slice_of_real_devices_is_the_plain_mesh():
  grid = mesh_lib.device_grid(_mesh(parallelism="fsdp_tensor", tensor=2), jax.devices())
  mesh = jax.sharding.Mesh(grid, layout.MESH_AXES)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert sorted(d.id for d in grid.ravel()) == sorted(d.id for d in jax.devices())
