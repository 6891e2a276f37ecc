"""`train --dry-run --compile`: the real train step compiled for a TPU slice through libtpu, on this CPU.

The compiling tests need libtpu (`pip install -e '.[tpu]'`). libtpu has wheels for Linux on
x86-64 only: elsewhere they are skipped with that reason, and under `make test`
(BERTJAX_REQUIRE_EXTRAS=1) on Linux x86-64 a missing libtpu fails them.
"""

import importlib.util
import json
import os
import platform
import sys

import pytest

from bertjax.cli import main as cli
from bertjax.config import loading
from bertjax.parallel import mesh as mesh_lib
from bertjax.perf import aot, dryrun, hlo
from bertjax.perf import tpu as tpu_lib
from tests.support.runs import MICRO_OVERRIDES, launch

MICRO_6_LAYERS = [o for o in MICRO_OVERRIDES if not o.startswith("model.num_layers")] + ["model.num_layers=6"]
WHERE_LIBTPU_INSTALLS = sys.platform == "linux" and platform.machine() == "x86_64"


def _require_libtpu():
  if importlib.util.find_spec("libtpu") is not None:
    return
  reason = f"libtpu is not installed: {tpu_lib.INSTALL_HINT}"
  if not WHERE_LIBTPU_INSTALLS:
    pytest.skip(f"libtpu has no wheel for {sys.platform} {platform.machine()}; {reason}")
  if os.environ.get("BERTJAX_REQUIRE_EXTRAS") == "1":
    pytest.fail(reason, pytrace=False)
  pytest.skip(reason)


HLO = """
ENTRY %main (p0: f32[1024,768]) -> f32[1024,768] {
  %all-reduce.1 = (f32[64,32]{1,0:T(8,128)}, /*index=1*/bf16[2,3]{1,0}) all-reduce(%a, %b), channel_id=1, to_apply=%add
  %all-gather-start.2 = (bf16[8,768]{1,0}, bf16[64,768]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done.2 = bf16[64,768]{1,0} all-gather-done(%all-gather-start.2)
  %fusion.3 = f32[64,32]{1,0} fusion(%all-reduce.1), kind=kLoop, calls=%fused
  ROOT %reduce-scatter.4 = f32[128]{0} reduce-scatter(%d), dimensions={0}, metadata={op_name="all-reduce(x)"}
}
"""


def test_collectives_are_counted_once_with_their_result_bytes():
  assert hlo.collectives(HLO) == {
    "all-reduce": {"count": 1, "bytes": 64 * 32 * 4 + 2 * 3 * 2},
    "all-gather": {"count": 1, "bytes": 64 * 768 * 2},  # the -start/-done pair is one, the result's bytes
    "reduce-scatter": {"count": 1, "bytes": 128 * 4},
  }


SCHEDULED_HLO = """
%fused_inner (p: bf16[8,8]) -> bf16[8,8] {
  ROOT %convolution.1 = bf16[8,8]{1,0} convolution(%p, %p), dim_labels=bf_io->bf
}

%fused_dot (p: bf16[8,8]) -> bf16[8,8] {
  ROOT %fusion.9 = bf16[8,8]{1,0} fusion(%p), kind=kOutput, calls=%fused_inner
}

%fused_add (p: bf16[8,8]) -> bf16[8,8] {
  ROOT %add.1 = bf16[8,8]{1,0} add(%p, %p)
}

ENTRY %main (p0: bf16[8,8]) -> bf16[8,8] {
  %fusion.1 = bf16[8,8]{1,0} fusion(%p0), kind=kOutput, calls=%fused_dot, backend_config={"estimated_cycles":"700"}
  %fusion.2 = bf16[8,8]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_add, backend_config={"estimated_cycles":"300"}
  %all-reduce-start.3 = bf16[8,8]{1,0} all-reduce-start(%fusion.2), backend_config={"estimated_cycles":"999"}
  %all-reduce.3 = bf16[8,8]{1,0} all-reduce-done(%all-reduce-start.3)
  ROOT %copy.4 = bf16[8,8]{1,0} copy(%all-reduce.3), backend_config={"estimated_cycles":"20"}
}
"""


def test_scheduled_cycles_sum_the_entry_instructions_and_find_matmuls_in_nested_fusions():
  # The collective's cycles are left out: collectives are reported apart, with their bytes.
  assert hlo.scheduled_cycles(SCHEDULED_HLO) == {"matmul": 700, "other": 320}
  assert hlo.scheduled_cycles(HLO) is None  # no cycle estimates: a GPU's program


_DECLARED = '"cost_estimate":{"flops":"1000","transcendentals":"10","bytes_accessed":"4096"'
_MOSAIC = 'custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"x"'
KERNEL_HLO = f"""
ENTRY %main (p0: bf16[8,128]) -> bf16[8,128] {{
  %attend_forward.1 = bf16[8,128]{{1,0}} custom-call(%p0), {_MOSAIC},{_DECLARED}}}}}
  %attend_forward.2 = bf16[8,128]{{1,0}} custom-call(%attend_forward.1), {_MOSAIC},{_DECLARED}}}}}
  %plain = bf16[8,128]{{1,0}} custom-call(%attend_forward.2), {_MOSAIC}}}}}
  ROOT %other = bf16[8,128]{{1,0}} custom-call(%plain), custom_call_target="Sharding"
}}
"""


def test_kernels_are_counted_by_name_with_the_cost_they_declare():
  assert hlo.kernels(KERNEL_HLO) == {
    "attend_forward": {"count": 2, "flops": 2000, "bytes": 8192},
    "plain": {"count": 1, "flops": 0, "bytes": 0},  # declares nothing
  }


def test_the_mosaic_attention_kernel_compiles_into_the_train_step_for_a_tpu():
  """`model.attention_impl=pallas` on a TPU: the micro model's two layers call the forward and
  backward Mosaic kernels once each, and the roofline counts the FLOPs they declare."""
  _require_libtpu()
  overrides = [*MICRO_OVERRIDES, "model.scan_layers=false"]
  fused, written_out = (
    dryrun.describe(
      loading.load_config("configs/tiny.py", [*overrides, f"model.attention_impl={impl}"]),
      topology="v5p-8",
      compile_step=True,
    )
    for impl in ("pallas", "xla")
  )
  assert fused["fits"] and fused["kernels"].keys() == {
    "bert_attention_dropout_forward_tpu",
    "bert_attention_dropout_backward_tpu",
  }
  assert {k["count"] for k in fused["kernels"].values()} == {2}
  # 2 sequences a chip, 32 tokens, 32 features (2 heads of 16): 2 matmuls forward, 5 backward.
  assert fused["kernels"]["bert_attention_dropout_forward_tpu"]["flops"] == 2 * 2 * 2 * 2 * 32 * 32 * 32
  assert fused["kernels"]["bert_attention_dropout_backward_tpu"]["flops"] == 2 * 5 * 2 * 2 * 32 * 32 * 32
  assert written_out["kernels"] == {}
  assert "kernels     per step and chip: bert_attention_dropout_forward_tpu 2 x" in dryrun.format_report(fused)


def test_compiled_for_the_smallest_v5p_slice_the_report_has_memory_collectives_and_an_estimate():
  """The micro model (6 layers, scanned) on v5p-8: 4 chips, data-parallel."""
  _require_libtpu()
  config = loading.load_config("configs/tiny.py", MICRO_6_LAYERS)
  init_args = os.environ.get("LIBTPU_INIT_ARGS")
  scanned = dryrun.describe(config, topology="v5p-8", compile_step=True)
  assert os.environ.get("LIBTPU_INIT_ARGS") == init_args  # libtpu's settings are put back once it has started
  assert scanned["device_count"] == 4 and scanned["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert scanned["hbm_gib"] == 95.74 and scanned["fits"] is True
  assert 0 < scanned["memory_per_device_gib"] < scanned["hbm_gib"]
  m = scanned["memory_bytes"]
  assert m["arguments"] > 0 and m["temporaries"] > 0
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
  assert scanned["estimated_step_s"] > 0 and 0 < scanned["estimated_mfu"] < 1
  assert scanned["estimated_tokens_per_s"] == pytest.approx(8 * 32 / scanned["estimated_step_s"])
  assert scanned["estimate_method"] == "per-layer cost of unrolled 3- and 4-layer programs, scaled to 6 layers"
  # Data parallelism all-reduces the gradients: at least the parameters' float32 bytes... in bf16 or f32.
  assert scanned["collectives"]["all-reduce"]["count"] > 0
  assert scanned["collectives"]["all-reduce"]["bytes"] >= 2 * scanned["parameter_count"]
  report = dryrun.format_report(scanned)
  assert "compiled    the train step for v5p-8 (v5p:2x2x1, 4 chips), libtpu" in report
  assert "GiB HBM: fits" in report and "ms a step (XLA's cost model: the roofline)" in report
  assert "all-reduce" in report and "ms a step (libtpu's per-instruction cycle estimates" in report
  # The scheduled time counts the vector units' work the roofline leaves out: here, on a tiny
  # model, it is the longer of the two; most of a step is matmul fusions even so.
  assert scanned["scheduled_step_s"] > scanned["estimated_step_s"] and 0 < scanned["scheduled_mfu"] < 1
  assert 0.2 < scanned["scheduled_matmul_share"] < 1

  # The same step with its layers unrolled is estimated from its own program: the two agree.
  unrolled = dryrun.describe(
    loading.load_config("configs/tiny.py", [*MICRO_6_LAYERS, "model.scan_layers=false"]),
    topology="v5p-8",
    compile_step=True,
  )
  assert unrolled["estimate_method"] == "the run's program (layers unrolled, one batch: no loops)"
  assert scanned["estimated_step_s"] == pytest.approx(unrolled["estimated_step_s"], rel=0.05)
  assert scanned["estimated_flops_per_device"] == pytest.approx(unrolled["estimated_flops_per_device"], rel=0.02)
  assert scanned["scheduled_step_s"] == pytest.approx(unrolled["scheduled_step_s"], rel=0.05)


@pytest.mark.slow
def test_gradient_accumulation_is_estimated_per_microbatch_with_one_optimizer_update():
  """16 rows as 2 microbatches of 8 against 16 rows at once: the same FLOPs (within the second
  microbatch's small extras), and each microbatch all-reduces its gradients, as XLA compiles it."""
  _require_libtpu()
  rows = [o for o in MICRO_OVERRIDES if not o.startswith("train.batch_size")] + ["train.batch_size=16"]
  once, twice = (
    dryrun.describe(
      loading.load_config("configs/tiny.py", [*rows, "model.scan_layers=false", f"train.grad_accum={k}"]),
      topology="v5p-8",
      compile_step=True,
    )
    for k in (1, 2)
  )
  assert twice["estimate_method"] == (
    "the step with its 2 layers unrolled, on one microbatch, times 2 microbatches with one optimizer update"
  )
  assert twice["scheduled_step_s"] > once["scheduled_step_s"] > 0
  assert twice["estimated_flops_per_device"] == pytest.approx(once["estimated_flops_per_device"], rel=0.02)
  assert twice["estimated_step_s"] > once["estimated_step_s"] > 0  # each microbatch reads the weights again
  assert twice["collectives"]["all-reduce"]["count"] == 2 * once["collectives"]["all-reduce"]["count"]


def test_a_step_that_does_not_fit_says_so_with_what_it_needs():
  _require_libtpu()
  huge = ["train.batch_size=65536", "data.seq_len=512", "model.max_position_embeddings=512"]
  config = loading.load_config("configs/tiny.py", [*MICRO_OVERRIDES, *huge])
  figures = dryrun.describe(config, topology="v5e-1", compile_step=True)
  assert figures["fits"] is False and figures["estimated_step_s"] is None and figures["collectives"] == {}
  assert figures["memory_per_device_gib"] > figures["hbm_gib"] == 15.75
  assert "DOES NOT FIT (XLA: RESOURCE_EXHAUSTED" in dryrun.format_report(figures)


def test_the_json_line_carries_the_compiled_figures(tmp_path):
  """The CLI end to end, on the smallest slice (v5e-1), layers unrolled: one compile.

  With BERT's vocabulary, v5e's program joins the embedding gradient's prefetched slices with
  ConcatBitcasts, which libtpu's cost model prices at -1 s each (its raw figure here is -2.9993 s):
  the estimate must not count them.
  """
  _require_libtpu()
  overrides = [f"--config.{o}" for o in [*MICRO_OVERRIDES, "model.scan_layers=false", "data.vocab_size=30522"]]
  args = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--dry-run", "--compile"]
  proc = launch([*args, "--topology", "v5e-1", "--json", *overrides], devices=1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  figures = json.loads(out.strip().splitlines()[-1])
  for key in ("estimated_step_s", "estimated_mfu", "memory_per_device_gib", "hbm_gib", "fits", "collectives"):
    assert key in figures
  assert figures["fits"] is True and figures["hbm_gib"] == 15.75 and 0 < figures["estimated_step_s"] < 0.1
  assert figures["collectives"] == {}  # one chip talks to no one
  assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_without_the_estimate_one_compile_gives_memory_and_fit(monkeypatch):
  """`--no-estimate`, for a search of the largest batch that fits: the scanned step is compiled once."""
  _require_libtpu()
  compiled = []
  compile_ = aot._compile
  monkeypatch.setattr(aot, "_compile", lambda *a: compiled.append(a) or compile_(*a))
  config = loading.load_config("configs/tiny.py", MICRO_OVERRIDES)
  figures = dryrun.describe(config, topology="v5e-1", compile_step=True, estimate=False)
  assert len(compiled) == 1 and figures["fits"] is True and 0 < figures["memory_per_device_gib"] < 15.75
  assert figures["estimate_method"] is None and figures["estimated_step_s"] is None and figures["collectives"] == {}


def test_slices_of_a_multislice_target_are_the_data_axis():
  """2 x v5e-4 with FSDP: each slice holds one FSDP group; only data parallelism crosses slices."""
  _require_libtpu()
  config = loading.load_config("configs/tiny.py", [*MICRO_OVERRIDES, "mesh.parallelism=fsdp", "mesh.dcn_data=2"])
  assert dryrun.describe(config, topology="v5e-4")["device_count"] == 8
  target = aot.target(8, "TPU v5e", tpu_lib.parse_topology("v5e-4"), slices=2)
  assert "v5e-4 (v5e:2x2, 4 chips) x 2 slices" in target.label and target.hbm_bytes == int(15.75 * 2**30)
  mesh = mesh_lib.make_mesh(config.mesh, target.devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]


def _one_line_error(argv, capsys) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("bertjax: error: ") and err.count("\n") == 1 and "Traceback" not in err
  return err


DRY_RUN = ["train", "--config", "configs/base.py", "--workdir", "w", "--dry-run"]


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--topology", "v9-8"], "--topology 'v9-8': not a TPU slice"),
    (["--topology", "v5p-8", "--devices", "8"], "--devices 8: 1 x v5p-8 has 4 chips"),
    (["--topology", "v5p-8", "--device-kind", "TPU v4"], "--topology v5p-8 names the chip already"),
    (["--compile", "--devices", "48", "--device-kind", "TPU v5p", "--config.train.batch_size=384"], "--devices 48"),
    (["--compile"], "ahead-of-time compilation without the hardware works for TPUs"),
    (["--no-estimate"], "--no-estimate leaves out --compile's estimate; add --compile"),
  ],
)
def test_bad_targets_are_one_line_and_exit_2(extra, message, capsys):
  assert message in _one_line_error([*DRY_RUN, *extra], capsys)


def test_compile_flags_need_the_dry_run(capsys):
  err = _one_line_error(["train", "--config", "configs/tiny.py", "--workdir", "w", "--compile"], capsys)
  assert "--compile, --no-estimate and --json describe a --dry-run; add --dry-run" in err


def test_without_libtpu_compiling_for_a_tpu_says_how_to_get_it(monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  err = _one_line_error([*DRY_RUN, "--compile", "--topology", "v5p-8"], capsys)
  assert "--compile for v5p-8: compiling for a TPU needs libtpu; pip install -e '.[tpu]'" in err
