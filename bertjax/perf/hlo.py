"""What an optimised HLO module's text says: the collectives it runs, by kind, with their bytes."""

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
