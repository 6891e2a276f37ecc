"""`train --dry-run`'s figures: mesh, per-device batch and memory, expected step time.

Memory figures are checked against a hand computation: BERT's parameters grouped by which mesh
axes shard them under bertjax.parallel.rules.RULES, divided by those axes' sizes.
"""

import jax
import pytest

from bertjax.config import loading as config_lib
from bertjax.errors import BertjaxError
from bertjax.metrics import flops as flops_lib
from bertjax.perf import dryrun

BERT_VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary; 30592 once padded to a multiple of 128
PADDED_VOCAB = 30592
# The optimizer's scalars, replicated on every device: apply_if_finite's notfinite_count (int32),
# last_finite (bool) and total_notfinite (int32), and the learning-rate schedule's count (int32).
OPT_SCALAR_BYTES = 4 + 1 + 4 + 4


def _bert_parameter_groups(layers, hidden, intermediate, vocab=PADDED_VOCAB, positions=512, segments=2):
  """BERT's parameter counts by the mesh axes that shard them (bertjax.parallel.rules.RULES):
  `embed` -> fsdp, `vocab`/`heads`/`mlp`/`embed_out` -> tensor."""
  h, i, n = hidden, intermediate, layers
  fsdp_only = (
    2 * h
    + positions * h
    + segments * h  # embedding LayerNorm, position and segment tables
    + n * (h + 2 * h + h + 2 * h)  # attention output bias and LayerNorm, FFN output bias, LayerNorm
    + 2 * h
  )  # MLM transform LayerNorm
  tensor_only = (
    n * 3 * h
    + n * i  # QKV bias [qkv, heads, kv], FFN input bias [mlp]
    + vocab
    + h
    + h  # MLM output bias [vocab], transform bias [embed_out], pooler bias
    + h * 2
  )  # NSP kernel [H, 2]: its hidden axis is named for tensor
  both = vocab * h + n * (3 * h * h + h * h + 2 * h * i) + h * h + h * h  # word table, kernels, transform, pooler
  replicated = 2  # NSP bias
  return fsdp_only, tensor_only, both, replicated


def _hand_param_bytes(groups, fsdp, tensor):
  fsdp_only, tensor_only, both, replicated = groups
  return 4 * (fsdp_only // fsdp + tensor_only // tensor + both // (fsdp * tensor) + replicated)


@pytest.mark.parametrize(
  "config_file, layers, hidden, overrides, devices, kind, fsdp, tensor",
  [
    # BERT-base on a v5p-128 (64 chips), pure FSDP.
    ("configs/base.py", 12, 768, ["mesh.parallelism=fsdp"], 64, "TPU v5p", 64, 1),
    # BERT-large on a v5p-128, pure FSDP (docs/scaling.md's table).
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp"], 64, "TPU v5p", 64, 1),
    # BERT-large on 8 nodes x 8 H100: FSDP inside a node, data-parallel across nodes.
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp", "mesh.dcn_data=8"], 64, "H100", 8, 1),
    # BERT-large on a v5p-128 with FSDP x tensor 4.
    ("configs/large.py", 24, 1024, ["mesh.parallelism=fsdp_tensor", "mesh.tensor=4"], 64, "TPU v5p", 16, 4),
  ],
)
def test_dry_run_memory_matches_a_hand_computation(config_file, layers, hidden, overrides, devices, kind, fsdp, tensor):
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
  flops = flops_lib.flops_per_sequence(model_cfg, 128, 20) * 256
  assert figures["flops_per_step"] == flops
  assert figures["step_time_s_at_peak"] == pytest.approx(flops / (64 * 459e12))
  assert figures["step_time_s"] == pytest.approx(flops / (64 * 459e12 * dryrun.ASSUMED_MFU))
  assert figures["tokens_per_s"] == pytest.approx(256 * 128 / figures["step_time_s"])
  assert figures["per_device_batch"] == 4 and figures["model"]["dtype"] == "bfloat16"


def test_the_report_names_mesh_batch_memory_and_time():
  config = config_lib.load_config(
    "configs/base.py", [f"data.vocab_size={BERT_VOCAB}", "mesh.parallelism=fsdp", "train.grad_accum=2"]
  )
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


@pytest.mark.parametrize("name", ["base", "large", "mini", "small", "medium"])
def test_berts_configs_plan_with_berts_vocabulary(name):
  """Dry runs and `bertjax bench` (which reads data.vocab_size) size the MLM head as a real BERT's."""
  config = config_lib.load_config(f"configs/{name}.py:phase=2", ["mesh.parallelism=fsdp"])
  assert config.data.vocab_size == BERT_VOCAB
  model = dryrun.describe(config, device_count=64, device_kind="TPU v5p")["model"]
  assert (model["variant"], model["vocab_size"], model["padded_vocab_size"]) == (name, BERT_VOCAB, PADDED_VOCAB)
