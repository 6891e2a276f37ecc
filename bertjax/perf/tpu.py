"""TPU generations and slices as Cloud TPU names them, and libtpu's compile-only devices for one.

parse_topology(name) -> TpuSlice         'v5p-128', 'v5e-256', 'v4-64', 'v6e-16', 'v5p:4x4x12'
tpu_slice(device_kind, chips) -> TpuSlice | None   the slice of that many chips of a TPU kind
is_tpu(device_kind) -> bool              whether a device kind names a TPU
compile_only_devices(tpu, slices) -> list   devices to compile for, on a machine without TPUs
libtpu_init_args(init_args) -> str       LIBTPU_INIT_ARGS with the compiler's thread stack raised
"""

import dataclasses
import importlib.util
import math
import os
import re

from bertjax.errors import BertjaxError

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


def libtpu_init_args(init_args: str) -> str:
  """LIBTPU_INIT_ARGS with the compiler's thread stack raised, unless they set it themselves."""
  if any(arg.split("=")[0] == COMPILER_THREAD_STACK_FLAG for arg in init_args.split()):
    return init_args
  return f"{init_args} {COMPILER_THREAD_STACK_FLAG}={COMPILER_THREAD_STACK_BYTES}".strip()


def compile_only_devices(tpu: TpuSlice, slices: int) -> list:
  """The devices of `slices` x `tpu`, through libtpu on this machine: programs compile for them, nothing runs."""
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
