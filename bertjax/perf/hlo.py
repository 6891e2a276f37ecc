"""What an optimised HLO module's text says.

collectives(text) -> {kind: {count, bytes}}     the collectives it runs, with their bytes
kernels(text) -> {name: {count, flops, bytes}}  its Mosaic kernels, with the cost they declare
scheduled_cycles(text) -> {matmul, other} | None  libtpu's per-instruction cycle estimates, summed
"""

import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
# An instruction of the optimised HLO: `%name = SHAPE op(...)`; an asynchronous collective is a
# -start / -done pair, counted once at its -done, whose shape is the result's.
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%\S+ = (?P<shape>.+?) (?P<op>" + "|".join(COLLECTIVES) + r")(?P<part>-start|-done)?\(", re.M
)
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collectives in an optimised HLO module, by kind: how many, and the bytes of their results.

  Counts the program's text: an instruction inside a loop counts once (the estimate's programs
  have none).
  """
  found: dict[str, dict[str, int]] = {}
  for match in _INSTRUCTION.finditer(hlo_text):
    if match.group("part") == "-start":
      continue
    entry = found.setdefault(match.group("op"), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(match.group("shape")))
  return found


def _array_bytes(dtype: str, dims: str) -> int:
  bits = 8 if dtype.startswith("f8") else _BITS.get(dtype) or int(dtype[1:])
  return math.prod(int(d) for d in dims.split(",") if d) * bits // 8


# libtpu's code generator annotates each instruction it schedules with its own cycle estimate
# ("estimated_cycles" in the backend config). A computation opens with `%name (` or `ENTRY %name (`
# at the start of a line and closes with `}` there.
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>\S+) \(.*?^}", re.M | re.S)
_CALLS = re.compile(r"calls=%([\w.-]+)")


def scheduled_cycles(hlo_text: str) -> dict[str, int] | None:
  """Cycles libtpu's code generator estimates for each instruction of the entry computation, summed.

  Split into matmul fusions (an instruction that is, or calls a computation holding, a
  convolution: XLA's TPU name for a dot) and the rest (elementwise, reductions, copies). None
  where the program has no such estimates (a GPU's). Unlike `cost_analysis()`'s roofline
  (`optimal_seconds`: FLOPs and bytes at peak rates), these count the vector units' work, such as
  a dropout mask's integer hashing. Collectives are not priced; a loop's body is not in the entry
  computation (the estimate's programs have no loops).
  """
  bodies = {m.group("name"): m.group(0) for m in _COMPUTATION.finditer(hlo_text)}
  entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
  if entry is None or not _CYCLES.search(entry.group(0)):
    return None
  holds_dot: dict[str, bool] = {}

  def has_dot(name: str) -> bool:
    if name not in holds_dot:
      body = bodies.get(name, "")
      holds_dot[name] = " convolution(" in body or " dot(" in body or any(has_dot(c) for c in _CALLS.findall(body))
    return holds_dot[name]

  out = {"matmul": 0, "other": 0}
  for line in entry.group(0).splitlines():
    cycles = _CYCLES.search(line)
    if cycles is None or _INSTRUCTION.match(line):  # a collective: priced apart, by its bytes
      continue
    dot = " convolution(" in line or " dot(" in line or any(has_dot(c) for c in _CALLS.findall(line))
    out["matmul" if dot else "other"] += int(cycles.group(1))
  return out


# A Mosaic kernel is a custom call to "tpu_custom_call" named after its pallas_call, with the
# cost the kernel declares (`pl.CostEstimate`) in its backend config.
_KERNEL_NAME = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w-]+?)(?:\.\d+)? = ")
_KERNEL_COST = re.compile(
  r'"cost_estimate":\{"flops":"(?P<flops>\d+)","transcendentals":"\d+","bytes_accessed":"(?P<bytes>\d+)"'
)


def kernels(hlo_text: str) -> dict[str, dict[str, int]]:
  """Mosaic kernels in the entry computation, by name: how many, and the FLOPs and HBM bytes they declare.

  libtpu's cost models do not look inside a kernel: the roofline prices it at these declared
  figures, and the scheduled time (`scheduled_cycles`) has no estimate for it at all. A kernel
  that declares nothing counts 0 FLOPs and bytes.
  """
  entry = re.search(r"^ENTRY .*?^}", hlo_text, re.M | re.S)
  found: dict[str, dict[str, int]] = {}
  for line in entry.group(0).splitlines() if entry else ():
    if 'custom_call_target="tpu_custom_call"' not in line or (name := _KERNEL_NAME.match(line)) is None:
      continue
    cost = _KERNEL_COST.search(line)
    entry_cost = found.setdefault(name.group("name"), {"count": 0, "flops": 0, "bytes": 0})
    entry_cost["count"] += 1
    entry_cost["flops"] += int(cost.group("flops")) if cost else 0
    entry_cost["bytes"] += int(cost.group("bytes")) if cost else 0
  return found
