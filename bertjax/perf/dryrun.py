"""`bertjax train --dry-run`: what a run would use on a mesh, computed without any device.

    describe(config, device_count=None, device_kind=None, topology=None, compile_step=False, estimate=True) -> dict
    format_report(figures) -> str          the figures, for people (`--json` prints the dict)

The mesh may be larger than this machine (64 devices for a v5p-128, from a laptop): the train
state's shardings come from `bertjax.train.steps.compile_steps` over an *abstract* mesh of the resolved shape,
and each leaf's bytes on one device are computed from its PartitionSpec and that shape. The
expected step time is the FLOP model (`bertjax.metrics.flops`) over the chips' datasheet
peak at an assumed MFU, not a measurement.

With `compile_step` (`--compile`), the train step itself is compiled for the target
(`bertjax.perf.aot`: a TPU slice through libtpu, from any machine, or this machine's GPUs), and
the report adds what XLA says: memory per chip against its HBM, the collectives of a step, and the
cost model's step time, with the tokens/s and MFU it implies.
"""

import math
import time
from typing import Any

import jax
from jax.sharding import PartitionSpec

from bertjax.config.validation import validate_for_devices
from bertjax.errors import BertjaxError
from bertjax.metrics import flops as flops_lib
from bertjax.model.config import BertConfig, resolve_config
from bertjax.parallel import mesh as mesh_lib
from bertjax.parallel import rules
from bertjax.parallel.layout import MESH_AXES
from bertjax.perf import aot
from bertjax.perf import tpu as tpu_lib
from bertjax.train import steps as steps_lib
from bertjax.train.pretraining import Pretraining

# Model FLOP utilisation the expected step time assumes. Well-tuned BERT pretraining in JAX and
# PyTorch reports roughly 40-60% on TPUs and H100s; 50% is a planning figure, not a promise.
ASSUMED_MFU = 0.5

_GPU_KINDS = ("a100", "h100", "h200", "nvidia", "gpu")


def describe(
  config,
  device_count: int | None = None,
  device_kind: str | None = None,
  vocab_size: int | None = None,
  *,
  topology: str | None = None,
  compile_step: bool = False,
  estimate: bool = True,
) -> dict[str, Any]:
  """The resolved mesh, per-device batch and memory, and expected step time of `config`.

  `device_count` and `device_kind` name the hardware (default: what this process sees), or
  `topology` names one TPU slice (v5p-128; `mesh.dcn_data` of them); `vocab_size` the
  tokenizer's size (default: `data.tokenizer`'s if given, else data.vocab_size). `compile_step`
  adds the compiled step's figures (`_compiled_figures`); without `estimate`, memory and fit only.
  """
  slices = config.mesh.dcn_data
  if topology and device_kind:
    raise BertjaxError(f"--device-kind {device_kind!r}: --topology {topology} names the chip already; give one of them")
  tpu = tpu_lib.parse_topology(topology) if topology else None
  kind_given = device_kind is not None
  device_count, device_kind = _hardware(device_count, device_kind, tpu, slices)
  peak = _peak_flops(device_kind, config.metrics.peak_tflops)
  mesh_shape = validate_for_devices(config, device_count)
  model_config = resolve_config(
    config.model, vocab_size or _vocab_size(config), backend=_backend(device_kind), seq_len=config.data.seq_len
  )
  state = abstract_train_state(model_config, config, mesh_shape)
  data, fsdp, _ = mesh_shape
  t, d = config.train, config.data
  flops_per_step = flops_lib.flops_per_sequence(model_config, d.seq_len, d.max_predictions) * t.batch_size
  figures = {
    "device_count": device_count,
    "device_kind": device_kind,
    "peak_tflops_per_device": peak / 1e12 if peak else None,
    "mesh": dict(zip(MESH_AXES, mesh_shape)),
    "parallelism": config.mesh.parallelism or "by hand",
    "dcn_data": config.mesh.dcn_data,
    "batch_size": t.batch_size,
    "per_device_batch": t.batch_size // (data * fsdp),
    "grad_accum": t.grad_accum,
    "per_device_microbatch": t.batch_size // (data * fsdp * t.grad_accum),
    "seq_len": d.seq_len,
    "max_predictions": d.max_predictions,
    "model": _model_summary(config.model.variant, model_config),
    "parameter_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
    "param_bytes_per_device": tree_bytes_per_device(state.params),
    "opt_state_bytes_per_device": tree_bytes_per_device(state.opt_state),
    "flops_per_step": flops_per_step,
    "train_steps": t.steps,
    **_expected_speed(flops_per_step, device_count, peak, t.batch_size * d.seq_len, t.steps),
  }
  if compile_step:
    start = time.perf_counter()
    if tpu is None and kind_given:  # a TPU named by --devices and --device-kind: its slices' shape
      tpu = tpu_lib.tpu_slice(device_kind, device_count // slices)
    report = aot.compile_report(
      config, model_config, aot.target(device_count, device_kind, tpu, slices), estimate=estimate
    )
    figures.update(_compiled_figures(report, flops_per_step, device_count, peak, t.batch_size * d.seq_len))
    figures["compile_s"] = time.perf_counter() - start
  return figures


def _compiled_figures(
  report: dict, flops_per_step: float, device_count: int, peak: float | None, tokens_per_step: int
) -> dict[str, Any]:
  """`aot.compile_report`'s figures for the report and the JSON line; the estimate only where XLA gave one."""
  estimate = report["estimate"] or {}
  step_s = estimate.get("step_s")
  usable = step_s is not None and step_s > 0  # a loop's cost (or no cost model) gives none, or a negative one
  total, hbm = report["memory_bytes"].get("total"), report["hbm_bytes"]
  return {
    "compiled_for": report["compiled_for"],
    "memory_bytes": report["memory_bytes"],
    "memory_per_device_gib": None if total is None else total / 2**30,
    "hbm_gib": None if hbm is None else round(hbm / 2**30, 2),
    "fits": report["fits"],
    "out_of_memory": report["out_of_memory"],
    "estimate_method": estimate.get("method"),
    "xla_step_s": step_s,
    "estimated_step_s": step_s if usable else None,
    "estimated_flops_per_device": estimate.get("flops"),
    "estimated_tokens_per_s": tokens_per_step / step_s if usable else None,
    "estimated_mfu": flops_per_step / (step_s * device_count * peak) if usable and peak else None,
    **_scheduled_figures(estimate, flops_per_step, device_count, peak, tokens_per_step),
    "collectives": estimate.get("collectives", {}),
    "kernels": estimate.get("kernels", {}),
  }


def _scheduled_figures(
  estimate: dict, flops_per_step: float, device_count: int, peak: float | None, tokens_per_step: int
) -> dict[str, Any]:
  """The step at libtpu's per-instruction cycle estimates (`aot`'s scheduled time); None off a TPU."""
  step_s, matmul_s = estimate.get("scheduled_s"), estimate.get("scheduled_matmul_s")
  if not step_s or step_s <= 0:
    return dict.fromkeys(("scheduled_step_s", "scheduled_tokens_per_s", "scheduled_mfu", "scheduled_matmul_share"))
  return {
    "scheduled_step_s": step_s,
    "scheduled_tokens_per_s": tokens_per_step / step_s,
    "scheduled_mfu": flops_per_step / (step_s * device_count * peak) if peak else None,
    "scheduled_matmul_share": matmul_s / step_s,
  }


def abstract_train_state(model_config: BertConfig, config, mesh_shape: tuple[int, int, int]) -> steps_lib.TrainState:
  """Shapes, dtypes and shardings of the train state on a mesh of `mesh_shape`, with no devices."""
  mesh = mesh_lib.abstract_mesh(mesh_shape)
  t = config.train
  return steps_lib.compile_steps(
    Pretraining(), model_config, config.optim, t.steps, t.grad_accum, mesh, rules.from_config(config.mesh)
  ).abstract_state()


def bytes_per_device(leaf: jax.ShapeDtypeStruct) -> int:
  """Bytes of the largest shard of `leaf` under its NamedSharding (uneven splits round up, as XLA pads)."""
  axis_sizes = dict(leaf.sharding.mesh.shape)
  spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
  shard = [-(-dim // _shard_count(entry, axis_sizes)) for dim, entry in zip(leaf.shape, spec)]
  return math.prod(shard) * leaf.dtype.itemsize


def tree_bytes_per_device(tree) -> int:
  return sum(bytes_per_device(leaf) for leaf in jax.tree.leaves(tree))


def _shard_count(entry, axis_sizes: dict[str, int]) -> int:
  axes = () if entry is None or entry is PartitionSpec.UNCONSTRAINED else (entry,) if isinstance(entry, str) else entry
  return math.prod(axis_sizes[a] for a in axes)


def _hardware(
  device_count: int | None, device_kind: str | None, tpu: tpu_lib.TpuSlice | None, slices: int
) -> tuple[int, str]:
  if device_count is not None and device_count < 1:
    raise BertjaxError(f"--devices {device_count}: give the number of devices (chips) the run will use, e.g. 64")
  if tpu is not None:
    chips = tpu.chips * slices
    if device_count not in (None, chips):
      raise BertjaxError(
        f"--devices {device_count}: {slices} x {tpu.name} has {chips} chips; leave --devices out with --topology"
      )
    return chips, tpu.generation.device_kind
  if device_count is None:
    device_count = jax.device_count()
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  return device_count, device_kind


def _peak_flops(device_kind: str, override_tflops: float) -> float | None:
  peak = flops_lib.peak_flops_per_device(device_kind, override_tflops)
  if peak is None and _backend(device_kind) != "cpu":
    known = ", ".join(flops_lib.PEAK_TFLOPS)
    raise BertjaxError(
      f"--device-kind {device_kind!r}: no datasheet peak is known for it; name one of {known}, "
      "or give the chip's dense bf16 peak with --config.metrics.peak_tflops=N"
    )
  return peak


def _backend(device_kind: str) -> str:
  """The platform of a device kind, for resolving `auto` dtypes as that hardware would."""
  kind = device_kind.lower()
  if "tpu" in kind:
    return "tpu"
  if any(name in kind for name in _GPU_KINDS):
    return "gpu"
  return "cpu"


def _vocab_size(config) -> int:
  if config.data.tokenizer:
    from bertjax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.load_tokenizer(config.data.tokenizer).vocab_size
  return config.data.vocab_size


def _model_summary(variant: str, cfg: BertConfig) -> dict[str, Any]:
  return {
    "variant": variant,
    "num_layers": cfg.num_layers,
    "hidden_size": cfg.hidden_size,
    "num_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "vocab_size": cfg.vocab_size,
    "padded_vocab_size": cfg.padded_vocab_size,
    "dtype": cfg.dtype,
  }


def _expected_speed(
  flops_per_step: float, device_count: int, peak: float | None, tokens_per_step: int, steps: int
) -> dict[str, float | None]:
  """Step time, tokens/s and run length at 100% MFU and at ASSUMED_MFU (None without a known peak)."""
  if not peak:
    return {
      "assumed_mfu": ASSUMED_MFU,
      "step_time_s_at_peak": None,
      "step_time_s": None,
      "tokens_per_s": None,
      "train_hours": None,
    }
  at_peak = flops_per_step / (device_count * peak)
  step_time = at_peak / ASSUMED_MFU
  return {
    "assumed_mfu": ASSUMED_MFU,
    "step_time_s_at_peak": at_peak,
    "step_time_s": step_time,
    "tokens_per_s": tokens_per_step / step_time,
    "train_hours": steps * step_time / 3600,
  }


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _flops(n: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if n >= scale:
      return f"{n / scale:,.1f} {unit}"
  return f"{n / 1e6:,.1f} MFLOP"


def format_report(d: dict[str, Any]) -> str:
  """The figures of `describe` as a few lines for a terminal."""
  m, model = d["mesh"], d["model"]
  peak = f" ({d['peak_tflops_per_device']:g} TFLOP/s dense bf16 peak each)" if d["peak_tflops_per_device"] else ""
  params, opt = d["param_bytes_per_device"], d["opt_state_bytes_per_device"]
  lines = [
    "bertjax train --dry-run (nothing is trained)",
    f"hardware    {d['device_count']} x {d['device_kind']}{peak}",
    f"mesh        data {m['data']} x fsdp {m['fsdp']} x tensor {m['tensor']} "
    f"(mesh.parallelism: {d['parallelism']}, mesh.dcn_data={d['dcn_data']})",
    f"batch       {d['batch_size']} sequences global, {d['per_device_batch']} per device "
    f"({d['per_device_microbatch']} per microbatch x {d['grad_accum']}), seq {d['seq_len']}, "
    f"{d['max_predictions']} predictions",
    f"model       {model['variant']}: L{model['num_layers']} H{model['hidden_size']} A{model['num_heads']} "
    f"I{model['intermediate_size']}, vocab {model['vocab_size']} ({model['padded_vocab_size']} padded), "
    f"compute {model['dtype']}",
    f"parameters  {d['parameter_count']:,} (float32)",
    f"memory      per device: parameters {_mib(params)} + optimizer state {_mib(opt)} = {_mib(params + opt)} "
    "(gradients, activations and XLA buffers come on top)",
    f"FLOPs       {_flops(d['flops_per_step'])} per step (the model's, bertjax.metrics.flops)",
  ]
  if d["step_time_s"] is None:
    lines.append(
      "step time   unknown: no peak FLOP/s for this device; name the chip with --device-kind "
      "or set --config.metrics.peak_tflops"
    )
  else:
    lines += [
      f"step time   {d['step_time_s'] * 1e3:,.1f} ms at {d['assumed_mfu']:.0%} MFU (assumed), "
      f"{d['step_time_s_at_peak'] * 1e3:,.1f} ms at 100%",
      f"throughput  {d['tokens_per_s']:,.0f} tokens/s at {d['assumed_mfu']:.0%} MFU "
      f"({d['tokens_per_s'] / d['device_count']:,.0f} per device)",
      f"run         {d['step_time_s'] * 1e5 / 3600:,.1f} h per 100,000 steps; all of train.steps={d['train_steps']:,} "
      f"from step 0: {d['train_hours']:,.1f} h",
    ]
  if "compiled_for" in d:
    lines += _compiled_lines(d)
  return "\n".join(lines)


def _compiled_lines(d: dict[str, Any]) -> list[str]:
  """The compiled step's figures (`_compiled_figures`), per chip."""
  m, hbm = d["memory_bytes"], d["hbm_gib"]
  of_hbm = f" of {hbm:,.2f} GiB HBM" if hbm else " (HBM unknown)"
  verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[d["fits"]]
  lines = [f"compiled    the train step for {d['compiled_for']}: {d['compile_s']:,.0f} s"]
  if d["out_of_memory"]:
    needed = f"needs {_mib(m['total'])}{of_hbm}: " if m.get("total") else ""
    lines.append(f"memory      per chip: {needed}{verdict} (XLA: {d['out_of_memory']})")
  else:
    lines.append(
      f"memory      per chip: arguments {_mib(m['arguments'])} + outputs {_mib(m['outputs'] - m['aliased'])} "
      f"(besides the donated state) + temporaries {_mib(m['temporaries'])} + code {_mib(m['code'])} "
      f"= {_mib(m['total'])}{of_hbm}: {verdict}"
    )
  if d["estimated_step_s"] is not None:
    mfu = f", {d['estimated_mfu']:.0%} MFU" if d["estimated_mfu"] is not None else ""
    lines += [
      f"estimate    {d['estimated_step_s'] * 1e3:,.2f} ms a step (XLA's cost model: the roofline), "
      f"{d['estimated_tokens_per_s']:,.0f} tokens/s ({d['estimated_tokens_per_s'] / d['device_count']:,.0f} per chip)"
      f"{mfu}; from {d['estimate_method']}",
    ]
  elif d["fits"] is not False:
    lines.append(f"estimate    none ({d['estimate_method']}; XLA's cost model gave {d['xla_step_s']} s)")
  if d["scheduled_step_s"] is not None:
    mfu = f", {d['scheduled_mfu']:.0%} MFU" if d["scheduled_mfu"] is not None else ""
    lines.append(
      f"scheduled   {d['scheduled_step_s'] * 1e3:,.2f} ms a step (libtpu's per-instruction cycle estimates, "
      f"collectives apart), {d['scheduled_tokens_per_s'] / d['device_count']:,.0f} tokens/s per chip{mfu}; "
      f"matmul fusions {d['scheduled_matmul_share']:.0%} of it"
    )
  if d["collectives"]:
    listed = ", ".join(f"{k} {v['count']} x ({_mib(v['bytes'])} in all)" for k, v in d["collectives"].items())
    lines.append(f"collectives per step and chip: {listed}")
  elif d["estimate_method"]:
    lines.append("collectives none")
  if d.get("kernels"):
    listed = ", ".join(
      f"{k} {v['count']} x ({v['flops'] / 1e9:,.1f} GFLOP, {_mib(v['bytes'])} in all)" for k, v in d["kernels"].items()
    )
    lines.append(
      f"kernels     per step and chip: {listed}; as declared: the roofline prices them so, the scheduled time "
      "leaves them out"
    )
  return lines
