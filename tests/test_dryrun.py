"""The mesh by name (mesh.parallelism, mesh.dcn_data) and `train --dry-run`'s figures.

Memory figures are checked against a hand computation: BERT's parameters grouped by which mesh
axes shard them under sharding.RULES, divided by those axes' sizes.
"""

import dataclasses

import jax
import pytest

from bertjax import config as config_lib
from bertjax import dryrun, metrics, sharding
from bertjax.errors import BertjaxError
from configs import common

BERT_VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary; 30592 once padded to a multiple of 128
PADDED_VOCAB = 30592
# The optimizer's scalars, replicated on every device: apply_if_finite's notfinite_count (int32),
# last_finite (bool) and total_notfinite (int32), and the learning-rate schedule's count (int32).
OPT_SCALAR_BYTES = 4 + 1 + 4 + 4


def _mesh(**keys):
  m = common.get_config().mesh
  m.update(keys)
  return m


@pytest.mark.parametrize("keys, devices, shape", [
    (dict(), 8, (8, 1, 1)),  # the default: data fills
    (dict(parallelism="data"), 64, (64, 1, 1)),
    (dict(parallelism="fsdp"), 64, (1, 64, 1)),
    (dict(parallelism="fsdp_tensor", tensor=4), 64, (1, 16, 4)),
    (dict(parallelism="fsdp", dcn_data=8), 64, (8, 8, 1)),  # 8 nodes x 8 GPUs: FSDP inside a node
    (dict(parallelism="fsdp_tensor", tensor=8, dcn_data=2), 64, (2, 4, 8)),
    (dict(parallelism="data", dcn_data=4), 64, (64, 1, 1)),
    (dict(data=4, fsdp=-1, dcn_data=2), 64, (4, 16, 1)),  # sizes by hand, slices inside data
])
def test_a_named_layout_fills_the_devices(keys, devices, shape):
  assert sharding.mesh_shape(_mesh(**keys), devices) == shape


@pytest.mark.parametrize("keys, devices, message", [
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
])
def test_a_bad_mesh_config_names_the_key_and_the_fix(keys, devices, message):
  with pytest.raises(BertjaxError, match=message):
    sharding.mesh_shape(_mesh(**keys), devices)


def test_the_mesh_keys_are_checked_without_a_device_count():
  sharding.check_mesh_config(_mesh(parallelism="fsdp_tensor", tensor=4, dcn_data=2))
  with pytest.raises(BertjaxError, match="mesh.parallelism='tp' is not a layout"):
    sharding.check_mesh_config(_mesh(parallelism="tp"))


def test_a_config_from_before_the_named_layouts_still_resolves():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)


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
  grid = sharding.device_grid(_mesh(parallelism="fsdp", dcn_data=2), devices)
  assert grid.shape == (2, 4, 1)
  assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]


def test_without_slice_indices_consecutive_processes_form_a_node():
  # 4 processes of 2 GPUs each = 2 nodes of 4 (SLURM places tasks node by node).
  devices = [FakeDevice(id=i, process_index=i // 2) for i in range(8)]
  grid = sharding.device_grid(_mesh(parallelism="fsdp", dcn_data=2), devices)
  assert [[d.id for d in grid[i].ravel()] for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_multislice_job_configured_as_one_slice_is_refused():
  devices = [FakeSliceDevice(id=i, process_index=i, slice_index=i // 4) for i in range(8)]
  with pytest.raises(BertjaxError, match="the devices form 2 slices; set --config.mesh.dcn_data=2"):
    sharding.device_grid(_mesh(parallelism="fsdp"), devices)


def test_one_slice_of_real_devices_is_the_plain_mesh():
  grid = sharding.device_grid(_mesh(parallelism="fsdp_tensor", tensor=2), jax.devices())
  mesh = jax.sharding.Mesh(grid, sharding.MESH_AXES)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert sorted(d.id for d in grid.ravel()) == sorted(d.id for d in jax.devices())


def _bert_parameter_groups(layers, hidden, intermediate, vocab=PADDED_VOCAB, positions=512, segments=2):
  """BERT's parameter counts by the mesh axes that shard them (sharding.RULES):
  `embed` -> fsdp, `vocab`/`heads`/`mlp`/`embed_out` -> tensor."""
  h, i, n = hidden, intermediate, layers
  fsdp_only = (2 * h + positions * h + segments * h  # embedding LayerNorm, position and segment tables
               + n * (h + 2 * h + h + 2 * h)  # attention output bias and LayerNorm, FFN output bias, LayerNorm
               + 2 * h)  # MLM transform LayerNorm
  tensor_only = (n * 3 * h + n * i  # QKV bias [qkv, heads, kv], FFN input bias [mlp]
                 + vocab + h + h  # MLM output bias [vocab], transform bias [embed_out], pooler bias
                 + h * 2)  # NSP kernel [H, 2]: its hidden axis is named for tensor
  both = vocab * h + n * (3 * h * h + h * h + 2 * h * i) + h * h + h * h  # word table, kernels, transform, pooler
  replicated = 2  # NSP bias
  return fsdp_only, tensor_only, both, replicated


def _hand_param_bytes(groups, fsdp, tensor):
  fsdp_only, tensor_only, both, replicated = groups
  return 4 * (fsdp_only // fsdp + tensor_only // tensor + both // (fsdp * tensor) + replicated)


@pytest.mark.parametrize("config_file, layers, hidden, overrides, devices, kind, fsdp, tensor", [
    # BERT-base on a v5p-128 (64 chips), pure FSDP.
    ("configs/base.py", 12, 768, ["mesh.parallelism=fsdp"], 64, "TPU v5p", 64, 1),
    # BERT-large on a v5p-128, pure FSDP (docs/scaling.md's table).
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp"], 64, "TPU v5p", 64, 1),
    # BERT-large on 8 nodes x 8 H100: FSDP inside a node, data-parallel across nodes.
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp", "mesh.dcn_data=8"], 64, "H100", 8, 1),
    # BERT-large on a v5p-128 with FSDP x tensor 4.
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp_tensor", "mesh.tensor=4"], 64, "TPU v5p", 16, 4),
])
def test_dry_run_memory_matches_a_hand_computation(config_file, layers, hidden, overrides, devices, kind, fsdp,
                                                   tensor):
  config = config_lib.load_config(config_file, [f"data.vocab_size={BERT_VOCAB}", *overrides])
  figures = dryrun.describe(config, device_count=devices, device_kind=kind)
  groups = _bert_parameter_groups(layers, hidden, 4 * hidden)
  assert figures["parameter_count"] == sum(groups)
  assert figures["mesh"]["fsdp"] == fsdp and figures["mesh"]["tensor"] == tensor
  param_bytes = _hand_param_bytes(groups, fsdp, tensor)
  assert figures["param_bytes_per_device"] == param_bytes
  # AdamW keeps two float32 moments sharded like the parameters, plus replicated counters.
  assert figures["opt_state_bytes_per_device"] == 2 * param_bytes + OPT_SCALAR_BYTES


def test_the_hand_computation_counts_berts_parameters():
  # transformers' BertForPreTraining with bert-base-uncased's and bert-large-uncased's configs.
  assert sum(_bert_parameter_groups(12, 768, 3072, vocab=BERT_VOCAB)) == 110_106_428
  assert sum(_bert_parameter_groups(24, 1024, 4096, vocab=BERT_VOCAB)) == 336_226_108


def test_expected_step_time_is_the_flop_model_over_the_peak():
  config = config_lib.load_config("configs/large.py", [f"data.vocab_size={BERT_VOCAB}", "mesh.parallelism=fsdp"])
  figures = dryrun.describe(config, device_count=64, device_kind="TPU v5p")
  model_cfg = dryrun.resolve_config(config.model, BERT_VOCAB, backend="tpu")
  flops = metrics.flops_per_sequence(model_cfg, 128, 20) * 256
  assert figures["flops_per_step"] == flops
  assert figures["step_time_s_at_peak"] == pytest.approx(flops / (64 * 459e12))
  assert figures["step_time_s"] == pytest.approx(flops / (64 * 459e12 * dryrun.ASSUMED_MFU))
  assert figures["tokens_per_s"] == pytest.approx(256 * 128 / figures["step_time_s"])
  assert figures["per_device_batch"] == 4 and figures["model"]["dtype"] == "bfloat16"


def test_the_report_names_mesh_batch_memory_and_time():
  config = config_lib.load_config("configs/base.py", [f"data.vocab_size={BERT_VOCAB}", "mesh.parallelism=fsdp",
                                                      "train.grad_accum=2"])
  report = dryrun.format_report(dryrun.describe(config, device_count=64, device_kind="TPU v5 "))  # v5p's own spelling
  assert "hardware    64 x TPU v5  (459 TFLOP/s dense bf16 peak each)" in report
  assert "mesh        data 1 x fsdp 64 x tensor 1 (mesh.parallelism: fsdp, mesh.dcn_data=1)" in report
  assert "batch       256 sequences global, 4 per device (2 per microbatch x 2), seq 128, 20 predictions" in report
  assert "parameters  110,160,258 (float32)" in report
  assert "memory      per device: parameters 6.9 MiB + optimizer state 13.9 MiB = 20.8 MiB" in report
  assert "at 50% MFU (assumed)" in report and "h per 100,000 steps; all of train.steps=900,000 from step 0:" in report


def test_a_mesh_larger_than_the_batch_or_an_unknown_chip_is_refused():
  config = config_lib.load_config("configs/base.py", ["mesh.parallelism=fsdp"])
  with pytest.raises(BertjaxError, match=r"train.batch_size=256 does not split over mesh data\*fsdp=512"):
    dryrun.describe(config, device_count=512, device_kind="TPU v5p")
  with pytest.raises(BertjaxError, match="--device-kind 'TPU v9': no datasheet peak is known"):
    dryrun.describe(config, device_count=8, device_kind="TPU v9")
  with pytest.raises(BertjaxError, match="--devices 0: give the number of devices"):
    dryrun.describe(config, device_count=0)


def test_without_a_known_peak_the_step_time_is_left_out():
  config = config_lib.load_config("configs/tiny.py", [])
  figures = dryrun.describe(config)  # this machine: 8 fake CPU devices
  assert figures["device_count"] == jax.device_count() and figures["step_time_s"] is None
  assert "step time   unknown" in dryrun.format_report(figures)
  assert figures["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # the default: pure data parallelism
  assert figures["param_bytes_per_device"] == 4 * figures["parameter_count"]  # ... replicates every parameter
