"""benchmarks/tpu_attention.py's reading of Mosaic's LLO: a kernel's vector instructions by unit."""

import importlib.util
import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load():
  sys.path.insert(0, str(_BENCHMARKS))  # the script imports its sibling tpu_fit_table
  try:
    spec = importlib.util.spec_from_file_location("tpu_attention", _BENCHMARKS / "tpu_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(str(_BENCHMARKS))


LLO = """module attributes {stable_mosaic.version = 15 : i64} {
  func.func @attend_forward(%arg0: i32) {
    %0 = llo.constant {value = 3 : ui32} : ui32
    %1 = llo.vxor.u32 %a, %b : vector
    %2 = llo.vmul.u32 %1, %c : vector
    %3 = llo.vexp.f32 %2 : vector
    %4 = llo.vmatmul %3 : vector
    %5 = llo.vmatres %4 : vector
    %6 = llo.vperm %5 : vector
    %7 = llo.vector_load %arg0 : vector
    %8 = llo.vbitcast %7 : vector
  }
  func.func @transform_0(%arg0: i32) {
    %9 = llo.vxor.u32 %a, %b : vector
  }
}
"""


def test_instructions_are_counted_by_unit_in_the_kernels_body_once(tmp_path):
  bench = _load()
  (tmp_path / "1-0018-mosaic-dump-anonymous-post-finalize-llo.txt").write_text(LLO)
  (tmp_path / "1-0001-mosaic-dump-anonymous-original.txt").write_text(LLO)  # an earlier stage: not read
  seen = set()
  # Bitcasts and constants are not instructions of a unit; the index maps after the body are not counted.
  assert bench.kernel_instructions(tmp_path, seen) == {
    "attend_forward": {"valu": 2, "eup": 1, "mxu": 2, "xlu": 1, "load/store": 1}
  }
  assert bench.kernel_instructions(tmp_path, seen) == {}  # read once: the next compile's are new files
