"""The real train step compiled ahead of time for a target: a TPU slice from any machine, or this machine's GPUs.

    target(device_count, device_kind, tpu, slices) -> Target   the devices to compile for
    compile_report(config, model_config, target) -> dict   per-chip memory, collectives, XLA's estimate
    program_cost(compiled, clock_hz) -> dict   one loop-free program's two step times, FLOPs, bytes

With libtpu installed, JAX compiles for a TPU topology on a machine without TPUs:
`bertjax.perf.tpu` gives compile-only devices of a slice, a mesh over them
takes `bertjax.train.steps.compile_steps` (the run's own step), and `.lower(...).compile()` on
abstract inputs gives the program the run would execute. From it: `memory_analysis()` (bytes per
chip), the optimised HLO (`as_text()`, whose collectives are counted) and two estimates of the
step time on that chip:

- the roofline: `cost_analysis()`'s `optimal_seconds`, each op at the chip's peak FLOP/s or HBM
  bandwidth, whichever binds. It does not see the vector units' work: a threefry dropout mask,
  20 rounds of integer ops an element pair, costs what a copy of the same bytes costs.
- the scheduled time: libtpu's code generator estimates the cycles of every instruction it
  schedules (`hlo.scheduled_cycles`), which counts that work; summed over the step and divided by
  the chip's clock. Collectives are not among the cycles counted (they are listed with their bytes).

XLA's cost analysis counts a `while` loop's body once: a scanned encoder's estimate is
meaningless (for BERT-base on TPU it even comes out negative), and so is a gradient-accumulation
loop's. The estimate is therefore taken from loop-free programs: the run's own when it has no loop
(`model.scan_layers=False`, `train.grad_accum=1`), else the same step with its layers unrolled on
one microbatch (at 3 and 4 layers, scaled linearly to a deeper model's depth: each layer is the
same program), times the microbatches, less the optimizer update the extra microbatches do not run.
"""

import dataclasses
import importlib.metadata
import importlib.util
import re

import jax
import optax

from bertjax.data.synthetic import synthetic_batch
from bertjax.errors import BertjaxError
from bertjax.model.config import BertConfig
from bertjax.parallel import mesh as mesh_lib
from bertjax.parallel import rules
from bertjax.perf import hlo
from bertjax.perf import tpu as tpu_lib
from bertjax.train import steps as steps_lib
from bertjax.train.pretraining import Pretraining


@dataclasses.dataclass(frozen=True)
class Target:
  devices: list  # one per chip: compile-only TPU devices, or this machine's
  device_kind: str  # for the peak FLOP/s
  hbm_bytes: int | None  # per device, None where unknown
  label: str  # what was compiled for, for the report
  clock_hz: float | None = None  # a TPU's, for its per-instruction cycle estimates


def target(device_count: int, device_kind: str, tpu: tpu_lib.TpuSlice | None, slices: int) -> Target:
  """The devices to compile for: `slices` x `tpu` through libtpu, else this machine's accelerators."""
  if tpu is not None:
    devices = tpu_lib.compile_only_devices(tpu, slices)
    label = f"{tpu.name} ({tpu.topology}, {tpu.chips} chips)" + (f" x {slices} slices" if slices > 1 else "")
    label += f", libtpu {importlib.metadata.version('libtpu')}" if importlib.util.find_spec("libtpu") else ""
    gen = tpu.generation
    return Target(devices, gen.device_kind, int(gen.hbm_gib * 2**30), label, gen.clock_ghz * 1e9)
  local = jax.devices()
  if local[0].platform == "cpu":
    raise BertjaxError(
      f"--compile for {device_kind!r}: ahead-of-time compilation without the hardware works for TPUs "
      "(name one: --topology v5p-128, or --device-kind 'TPU v5p' --devices 64); a GPU must be on this machine"
    )
  if device_count > len(local):
    raise BertjaxError(f"--devices {device_count}: this machine has {len(local)}; compiling for GPUs needs them here")
  if device_kind.lower() not in local[0].device_kind.lower():
    raise BertjaxError(
      f"--device-kind {device_kind!r}: this machine has {local[0].device_kind}; --compile uses the GPUs it has"
    )
  stats = local[0].memory_stats() or {}
  return Target(local[:device_count], local[0].device_kind, stats.get("bytes_limit"), f"this machine's {device_kind}")


def compile_report(config, model_config: BertConfig, tgt: Target, *, estimate: bool = True) -> dict:
  """Compile the run's train step for `tgt`; what XLA says about it, per device.

  Returns memory (bytes by kind and in all), whether it fits the device's HBM, and, for a step
  that fits and with `estimate`, XLA's estimated step time and FLOPs and the collectives one step
  runs, with the method of the estimate (see the module's docstring). Without `estimate` the step
  is compiled once, which is what a search for the largest batch that fits needs.
  """
  mesh = mesh_lib.make_mesh(config.mesh, tgt.devices)
  t = config.train
  steps = steps_lib.compile_steps(
    Pretraining(), model_config, config.optim, t.steps, t.grad_accum, mesh, rules.from_config(config.mesh)
  )
  run, oom = _compile(steps, config.data, model_config.vocab_size, t.batch_size)
  report = {"hbm_bytes": tgt.hbm_bytes, "compiled_for": tgt.label, "out_of_memory": oom}
  if run is None:
    return {**report, "memory_bytes": _oom_memory(oom), "fits": False, "estimate": None}
  memory = _memory(run)
  fits = None if tgt.hbm_bytes is None else memory["total"] <= tgt.hbm_bytes
  report.update(memory_bytes=memory, fits=fits)
  wanted = estimate and fits is not False
  return {**report, "estimate": _estimate(config, model_config, mesh, steps, run, tgt.clock_hz) if wanted else None}


def _compile(steps: steps_lib.CompiledSteps, data_cfg, vocab_size: int, batch_size: int):
  """(the compiled train step, None), or (None, XLA's message) when it does not fit the device."""
  state = steps.abstract_state()
  rows = synthetic_batch(1, data_cfg.seq_len, data_cfg.max_predictions, vocab_size)
  batch = {
    k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=steps.batch_sharding) for k, v in rows.items()
  }
  with jax.set_mesh(steps.mesh):
    lowered = steps.jitted["train"].lower(state, batch)
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e).strip().splitlines()[0]


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  parts = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,  # outputs written over donated arguments: counted once
    "temporaries": m.temp_size_in_bytes,
    "code": m.generated_code_size_in_bytes,
  }
  total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
  return {**parts, "total": total}


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _oom_memory(message: str) -> dict[str, int]:
  """What an out-of-memory error says the program needs ('... temporaries (101.50G) exceeds ...')."""
  needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\)|Used ([\d.]+)([KMGTP]?)B? of", message)
  if not needed:
    return {}
  value, unit = (needed.group(1), needed.group(2)) if needed.group(1) else (needed.group(3), needed.group(4))
  return {"total": int(float(value) * _UNITS[unit])}


# The estimate's loop-free programs for a deep model: a layer's cost is the difference of these
# two depths. Past the first layers: at BERT-base, the 1- and 2-layer programs' roofline
# difference is 9-19% above the next layers' (the scheduled time's is steady from the first).
FIT_LAYERS = (3, 4)


def _estimate(config, model_config: BertConfig, mesh, steps, run, clock_hz: float | None) -> dict:
  """XLA's step times (roofline and scheduled), FLOPs and collectives per device, from loop-free programs."""
  k, layers = config.train.grad_accum, model_config.num_layers
  if not model_config.scan_layers and k == 1:
    return {**program_cost(run, clock_hz), "method": "the run's program (layers unrolled, one batch: no loops)"}
  micro = config.train.batch_size // k
  (low, high), whole = FIT_LAYERS, layers <= FIT_LAYERS[1]
  method = f"per-layer cost of unrolled {low}- and {high}-layer programs, scaled to {layers} layers"
  method = f"the step with its {layers} layers unrolled" if whole else method
  vocab = model_config.vocab_size
  depths = (layers,) if whole else FIT_LAYERS
  programs = [_compile(_unrolled(config, model_config, mesh, n), config.data, vocab, micro)[0] for n in depths]
  if None in programs:
    return {"method": f"none: {method} does not fit", "collectives": {}}
  costs = [program_cost(program, clock_hz) for program in programs]
  # A deep model: k * (shallow + (layers - low) * (deep - shallow)).
  terms = [(k, costs[0])] if whole else [(k * (1 + low - layers), costs[0]), (k * (layers - low), costs[1])]
  if k > 1:
    terms.append((1 - k, program_cost(_compile_optimizer(steps), clock_hz)))
    method += f", on one microbatch, times {k} microbatches with one optimizer update"
  return {**_combine(terms), "method": method}


def _unrolled(config, model_config: BertConfig, mesh, layers: int) -> steps_lib.CompiledSteps:
  cfg = dataclasses.replace(model_config, num_layers=layers, scan_layers=False)
  return steps_lib.compile_steps(
    Pretraining(), cfg, config.optim, config.train.steps, 1, mesh, rules.from_config(config.mesh)
  )


def _compile_optimizer(steps: steps_lib.CompiledSteps):
  """The optimizer update alone, placed as in the train step: what one more microbatch does not repeat."""

  def update(params, grads, opt_state):
    updates, opt_state = steps.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state, shardings = steps.abstract_state(), steps.state_shardings
  jitted = jax.jit(
    update,
    in_shardings=(shardings.params, shardings.params, shardings.opt_state),
    out_shardings=(shardings.params, shardings.opt_state),
    donate_argnums=(0, 2),
  )
  with jax.set_mesh(steps.mesh):
    return jitted.lower(state.params, state.params, state.opt_state).compile()


def program_cost(compiled, clock_hz: float | None) -> dict:
  """One loop-free program's cost: the roofline step time, the scheduled one (with its matmul part), FLOPs, bytes."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost  # older jax: one dict per program
  text = compiled.as_text()
  seconds = cost.get("optimal_seconds")  # absent where the backend has no cost model of time
  cycles = hlo.scheduled_cycles(text) if clock_hz else None
  return {
    "step_s": None if seconds is None else float(seconds) + _unpriced_seconds(text),
    "scheduled_s": None if cycles is None else (cycles["matmul"] + cycles["other"]) / clock_hz,
    "scheduled_matmul_s": None if cycles is None else cycles["matmul"] / clock_hz,
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "collectives": hlo.collectives(text),
    "kernels": hlo.kernels(text),
  }


def _unpriced_seconds(hlo_text: str) -> float:
  """What to add back for the ops libtpu's cost model cannot price and counts at -1 s each.

  On v5e and v6e (libtpu 0.0.42) that is every ConcatBitcast in the entry computation:
  memory-space assignment's join of adjacent prefetched slices, a bitcast that moves nothing (v5p
  programs have none). Compiled with sliced prefetch off (`xla_tpu_sliced_prefetch_max_slices=1`)
  a program has none, and its estimate agrees with the corrected one within 1%.
  """
  entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
  return float(entry.group(0).count('custom_call_target="ConcatBitcast"')) if entry else 0.0


def _combine(terms: list[tuple[int, dict]]) -> dict:
  """sum(coefficient * cost) over the terms, collectives and kernels included (None where a term has none)."""
  out = {
    key: None if any(cost[key] is None for _, cost in terms) else sum(c * cost[key] for c, cost in terms)
    for key in ("step_s", "scheduled_s", "scheduled_matmul_s", "flops", "bytes_accessed")
  }
  out["collectives"] = _combine_tallies(terms, "collectives", ("count", "bytes"))
  out["kernels"] = _combine_tallies(terms, "kernels", ("count", "flops", "bytes"))
  return out


def _combine_tallies(terms: list[tuple[int, dict]], key: str, fields: tuple[str, ...]) -> dict:
  """{name: {field: sum(coefficient * tally)}} of a per-name tally (`hlo.collectives`, `hlo.kernels`)."""
  names = sorted({name for _, cost in terms for name in cost[key]})
  return {
    name: {field: round(sum(c * cost[key].get(name, {}).get(field, 0) for c, cost in terms)) for field in fields}
    for name in names
  }
