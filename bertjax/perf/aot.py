"""The real train step compiled ahead of time for a target: a TPU slice from any machine, or this machine's GPUs.

    parse_topology(name) -> TpuSlice         'v5p-128', 'v5e-256', 'v4-64', 'v6e-16', 'v5p:4x4x12'
    tpu_slice(device_kind, chips) -> TpuSlice | None   the slice of that many chips of a TPU kind
    target(device_count, device_kind, tpu, slices) -> Target   the devices to compile for
    compile_report(config, model_cfg, target) -> dict   per-chip memory, collectives, XLA's estimate
    program_cost(compiled, clock_hz) -> dict   one loop-free program's two step times, FLOPs, bytes

With libtpu installed, JAX compiles for a TPU topology on a machine without TPUs:
`jax.experimental.topologies.get_topology_desc` gives compile-only devices, a mesh over them
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
import math
import os
import re

import jax
import optax

from bertjax.data.synthetic import synthetic_batch
from bertjax.errors import BertjaxError
from bertjax.model.config import BertConfig
from bertjax.parallel import mesh as mesh_lib
from bertjax.perf import hlo
from bertjax.train import steps as steps_lib

INSTALL_HINT = "pip install -e '.[tpu]' (libtpu matching the installed jax)"
# libtpu's compiler recurses deeply when it costs some fused convolutions (on v6e, the train step
# of BERT-base and BERT-large at sequence 512 with full rematerialisation) and overflows its compile
# threads' stack, which it sizes from the stack limit the process started with (8 MiB by default):
# the compile dies with SIGSEGV. With 64 MiB those steps compile.
COMPILER_THREAD_STACK_FLAG = "--fibers_default_thread_stack_size"
COMPILER_THREAD_STACK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # the name in Cloud TPU's accelerator types: v5p-128, v5litepod-16, ...
  device_kind: str  # bertjax.metrics.flops.PEAK_TFLOPS's name for the chip
  cores_per_chip: int  # a v4 or v5p slice's name counts TensorCores, two per chip
  dims: int  # 3: chips in a torus cube (v4, v5p); 2: a grid (v5e, v6e)
  hbm_gib: float  # HBM per chip that libtpu's compiler lets a program use
  chip_config: str  # libtpu's chip config: megacore joins a chip's two TensorCores into one device
  clock_ghz: float  # what libtpu's per-instruction cycle estimates count


# HBM as libtpu 0.0.42's compiler counts it (its out-of-memory error names the available bytes):
# a little under the datasheet's 32 / 95 / 16 / 32 GB. Clocks: the datasheet's bf16 peak over the
# chip's multiply-adds a cycle (2 FLOPs each): v4 and v5p 2 TensorCores x 4 MXUs of 128x128, v5e 1
# x 4 of 128x128, v6e 1 x 4 of 256x256.
GENERATIONS = {
  "v4": Generation("v4", "TPU v4", 2, 3, 30.75, "megacore", 1.05),  # 275 TFLOP/s
  "v5p": Generation("v5p", "TPU v5p", 2, 3, 95.74, "megacore", 1.75),  # 459 TFLOP/s
  "v5e": Generation("v5e", "TPU v5e", 1, 2, 15.75, "default", 1.5),  # 197 TFLOP/s
  "v6e": Generation("v6e", "TPU v6e", 1, 2, 31.25, "default", 1.75),  # 918 TFLOP/s
}
_NAMES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# The grid slices v5e and v6e come in (Cloud TPU's v5litepod-N and v6e-N); up to 8 chips are one host.
_GRIDS = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# `jax.Device.device_kind` and user spellings of each generation, most specific first.
_KIND_PATTERNS = (
  (r"v5 ?(lite|e)", "v5e"),
  (r"v5p?\b", "v5p"),
  (r"v6 ?(lite|e)?\b", "v6e"),
  (r"v4\b", "v4"),
)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  generation: Generation
  shape: tuple[int, ...]  # chips along each axis of the slice

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

  @property
  def topology(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along each axis: 2x2x1 (4 chips a host), or the whole of a one-host grid."""
    if self.generation.dims == 2 and self.chips <= 8:
      return (*self.shape, 1)
    return (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Target:
  devices: list  # one per chip: compile-only TPU devices, or this machine's
  device_kind: str  # for the peak FLOP/s
  hbm_bytes: int | None  # per device, None where unknown
  label: str  # what was compiled for, for the report
  clock_hz: float | None = None  # a TPU's, for its per-instruction cycle estimates


def parse_topology(name: str) -> TpuSlice:
  """A TPU slice from its accelerator type (v5p-128 = 64 chips of 2 TensorCores) or its shape (v5p:4x4x4)."""
  text = name.strip().lower()
  sized, shaped = re.fullmatch(r"([a-z0-9]+)-(\d+)", text), re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  match = sized or shaped
  if not match or match.group(1) not in _NAMES:
    raise BertjaxError(
      f"--topology {name!r}: not a TPU slice; name one as v5p-128, v5e-256 (or v5litepod-256), v6e-256, "
      "v4-64, or by its shape, e.g. v5p:4x4x12"
    )
  gen = GENERATIONS[_NAMES[match.group(1)]]
  if shaped:
    shape = tuple(int(n) for n in match.group(2).split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      example = "4x4x8" if gen.dims == 3 else "16x16"
      raise BertjaxError(
        f"--topology {name!r}: a {gen.name} slice has {gen.dims} axes of chips, e.g. {gen.name}:{example}"
      )
    return TpuSlice(gen, shape)
  cores = int(match.group(2))
  if cores % gen.cores_per_chip:
    raise BertjaxError(f"--topology {name!r}: {gen.name}-N counts TensorCores, {gen.cores_per_chip} per chip")
  found = _slice_of(gen, cores // gen.cores_per_chip)
  if found is None:
    raise BertjaxError(f"--topology {name!r}: {_slice_sizes(gen)}")
  return found


def is_tpu(device_kind: str | None) -> bool:
  """Whether `device_kind` names a TPU ("TPU v5p", "TPU v5 lite", "v6e"), known or not."""
  kind = (device_kind or "").lower()
  return "tpu" in kind or re.match(r"v\d", kind) is not None


def tpu_slice(device_kind: str, chips: int) -> TpuSlice | None:
  """The slice of `chips` chips of the TPU `device_kind` ("TPU v5p", "TPU v5 lite"); None for other chips."""
  if not is_tpu(device_kind):
    return None
  gen = next((GENERATIONS[g] for pattern, g in _KIND_PATTERNS if re.search(pattern, device_kind.lower())), None)
  if gen is None:
    raise BertjaxError(f"--device-kind {device_kind!r}: no TPU generation of that name; use TPU v4, v5e, v5p or v6e")
  found = _slice_of(gen, chips)
  if found is None:
    raise BertjaxError(
      f"--devices {chips} (per slice) --device-kind {device_kind!r}: {_slice_sizes(gen)}; "
      f"or give the shape with --topology, e.g. {gen.name}:{'4x4x12' if gen.dims == 3 else '16x16'}"
    )
  return found


def _slice_of(gen: Generation, chips: int) -> TpuSlice | None:
  if gen.dims == 2:
    return TpuSlice(gen, _GRIDS[chips]) if chips in _GRIDS else None
  if chips < 4 or chips & (chips - 1):
    return None  # other v4/v5p cubes (v5p-384 is 4x4x12) are named by shape
  dims = [1, 2, 2]
  while math.prod(dims) < chips:  # double the shortest axis: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
    dims.sort()
    dims[0] *= 2
  return TpuSlice(gen, (2, 2, 1) if chips == 4 else tuple(sorted(dims)))


def _slice_sizes(gen: Generation) -> str:
  if gen.dims == 2:
    return f"{gen.name} slices have {', '.join(map(str, _GRIDS))} chips"
  return f"{gen.name}-N is named here for N = 8, 16, 32, ... (a power of two: {gen.cores_per_chip} TensorCores a chip)"


def target(device_count: int, device_kind: str, tpu: TpuSlice | None, slices: int) -> Target:
  """The devices to compile for: `slices` x `tpu` through libtpu, else this machine's accelerators."""
  if tpu is not None:
    devices = _tpu_devices(tpu, slices)
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


def libtpu_init_args(init_args: str) -> str:
  """LIBTPU_INIT_ARGS with the compiler's thread stack raised, unless they set it themselves."""
  if any(arg.split("=")[0] == COMPILER_THREAD_STACK_FLAG for arg in init_args.split()):
    return init_args
  return f"{init_args} {COMPILER_THREAD_STACK_FLAG}={COMPILER_THREAD_STACK_BYTES}".strip()


def _tpu_devices(tpu: TpuSlice, slices: int) -> list:
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise BertjaxError(f"--compile for {tpu.name}: compiling for a TPU needs libtpu; {INSTALL_HINT}")
  from jax.experimental import topologies

  # The devices are compile-only: nothing runs on them. So libtpu takes no lock on this host's
  # chips (a training here keeps its own), and the settings it would read from a TPU VM's
  # metadata are given (without them it logs errors about the missing metadata server); its
  # compiler's threads get a deeper stack. libtpu reads them once, when it starts; they are
  # restored after.
  settings = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": tpu.name.replace("v5e-", "v5litepod-"),
  }
  before = {key: os.environ.get(key) for key in (*settings, "LIBTPU_INIT_ARGS")}
  os.environ.update({key: value for key, value in settings.items() if before[key] is None})
  os.environ["LIBTPU_INIT_ARGS"] = libtpu_init_args(before["LIBTPU_INIT_ARGS"] or "")
  try:
    return topologies.get_topology_desc(
      platform="tpu",
      topology_name=tpu.topology,
      chip_config_name=tpu.generation.chip_config,
      chips_per_host_bounds=tpu.host_bounds,
      num_slices=slices,
    ).devices
  finally:
    for key, value in before.items():
      if value is None:
        del os.environ[key]
      else:
        os.environ[key] = value


def compile_report(config, model_cfg: BertConfig, tgt: Target, *, estimate: bool = True) -> dict:
  """Compile the run's train step for `tgt`; what XLA says about it, per device.

  Returns memory (bytes by kind and in all), whether it fits the device's HBM, and, for a step
  that fits and with `estimate`, XLA's estimated step time and FLOPs and the collectives one step
  runs, with the method of the estimate (see the module's docstring). Without `estimate` the step
  is compiled once, which is what a search for the largest batch that fits needs.
  """
  mesh = mesh_lib.make_mesh(config.mesh, tgt.devices)
  t = config.train
  steps = steps_lib.compile_steps(model_cfg, config.optim, t.steps, t.grad_accum, mesh)
  run, oom = _compile(steps, config.data, model_cfg.vocab_size, t.batch_size)
  report = {"hbm_bytes": tgt.hbm_bytes, "compiled_for": tgt.label, "out_of_memory": oom}
  if run is None:
    return {**report, "memory_bytes": _oom_memory(oom), "fits": False, "estimate": None}
  memory = _memory(run)
  fits = None if tgt.hbm_bytes is None else memory["total"] <= tgt.hbm_bytes
  report.update(memory_bytes=memory, fits=fits)
  wanted = estimate and fits is not False
  return {**report, "estimate": _estimate(config, model_cfg, mesh, steps, run, tgt.clock_hz) if wanted else None}


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


def _estimate(config, model_cfg: BertConfig, mesh, steps, run, clock_hz: float | None) -> dict:
  """XLA's step times (roofline and scheduled), FLOPs and collectives per device, from loop-free programs."""
  k, layers = config.train.grad_accum, model_cfg.num_layers
  if not model_cfg.scan_layers and k == 1:
    return {**program_cost(run, clock_hz), "method": "the run's program (layers unrolled, one batch: no loops)"}
  micro = config.train.batch_size // k
  (low, high), whole = FIT_LAYERS, layers <= FIT_LAYERS[1]
  method = f"per-layer cost of unrolled {low}- and {high}-layer programs, scaled to {layers} layers"
  method = f"the step with its {layers} layers unrolled" if whole else method
  vocab = model_cfg.vocab_size
  depths = (layers,) if whole else FIT_LAYERS
  programs = [_compile(_unrolled(config, model_cfg, mesh, n), config.data, vocab, micro)[0] for n in depths]
  if None in programs:
    return {"method": f"none: {method} does not fit", "collectives": {}}
  costs = [program_cost(program, clock_hz) for program in programs]
  # A deep model: k * (shallow + (layers - low) * (deep - shallow)).
  terms = [(k, costs[0])] if whole else [(k * (1 + low - layers), costs[0]), (k * (layers - low), costs[1])]
  if k > 1:
    terms.append((1 - k, program_cost(_compile_optimizer(steps), clock_hz)))
    method += f", on one microbatch, times {k} microbatches with one optimizer update"
  return {**_combine(terms), "method": method}


def _unrolled(config, model_cfg: BertConfig, mesh, layers: int) -> steps_lib.CompiledSteps:
  cfg = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False)
  return steps_lib.compile_steps(cfg, config.optim, config.train.steps, 1, mesh)


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
  """sum(coefficient * cost) over the terms, collectives included (None where a term has none)."""
  out = {
    key: None if any(cost[key] is None for _, cost in terms) else sum(c * cost[key] for c, cost in terms)
    for key in ("step_s", "scheduled_s", "scheduled_matmul_s", "flops", "bytes_accessed")
  }
  kinds = sorted({kind for _, cost in terms for kind in cost["collectives"]})
  out["collectives"] = {
    kind: {
      field: round(sum(c * cost["collectives"].get(kind, {}).get(field, 0) for c, cost in terms))
      for field in ("count", "bytes")
    }
    for kind in kinds
  }
  return out
