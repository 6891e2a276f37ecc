"""XLA's two TPU step-time estimates on five small programs, per TPU generation: what each one counts.

    python benchmarks/tpu_cost_models.py [--chips v4,v5e,v5p,v6e]

Compiles, for one chip of each generation's 4-chip slice through libtpu (no TPU needed), a
bf16 8192^3 matmul, inverted dropout of a float32 [4096, 8192] array with a threefry, a hash
(`bertjax.model.dropout`) and an rbg mask (`jax.random.key(0, impl="rbg")`), and the same array
scaled by 2 (a copy's bytes), and prints one JSON line each: the roofline (`cost_analysis()`'s
`optimal_seconds`), the scheduled time (libtpu's per-instruction cycle estimates at the chip's
clock), both from `bertjax.perf.aot.program_cost`, and the FLOP/s or bytes/s each implies. The roofline
prices every dropout like the copy (the same bytes); the scheduled time counts the masks' work.
docs/performance.md has the figures.
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bertjax.model import dropout
from bertjax.perf import aot
from bertjax.perf import tpu as tpu_lib

N = 8192


def _programs():
  def masked(impl):
    return lambda x: dropout.dropout(x, 0.1, jax.random.key(0), impl)

  def rbg(x):  # JAX's other generator: the TPU's RngBitGenerator instruction
    keep = jax.random.bernoulli(jax.random.key(0, impl="rbg"), 0.9, x.shape)
    return jnp.where(keep, x / 0.9, 0).astype(x.dtype)

  return {
    "matmul bf16 8192^3": (lambda a, b: a @ b, [((N, N), jnp.bfloat16)] * 2),
    "threefry dropout f32 [4096, 8192]": (masked("threefry"), [((N // 2, N), jnp.float32)]),
    "hash dropout f32 [4096, 8192]": (masked("hash"), [((N // 2, N), jnp.float32)]),
    "rbg dropout f32 [4096, 8192]": (rbg, [((N // 2, N), jnp.float32)]),
    "scale f32 [4096, 8192]": (lambda x: x * 2, [((N // 2, N), jnp.float32)]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chips", default="v4,v5e,v5p,v6e")
  args = parser.parse_args()
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  jax.config.update("jax_platforms", "cpu")  # libtpu's compile-only devices; nothing runs
  for chip in args.chips.split(","):
    tpu = tpu_lib.parse_topology(f"{chip}:{'2x2x1' if tpu_lib.GENERATIONS[chip].dims == 3 else '2x2'}")
    tgt = aot.target(tpu.chips, tpu.generation.device_kind, tpu, 1)  # the smallest slice; one chip of it
    sharding = NamedSharding(Mesh(tgt.devices[:1], ("x",)), P())
    for name, (fn, shapes) in _programs().items():
      inputs = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]
      cost = aot.program_cost(jax.jit(fn).lower(*inputs).compile(), tgt.clock_hz)
      roofline_s, scheduled_s = cost["step_s"], cost["scheduled_s"]
      flops, nbytes = cost["flops"], cost["bytes_accessed"]
      line = {
        "chip": chip,
        "program": name,
        "roofline_s": roofline_s,
        "scheduled_s": scheduled_s,
        "scheduled_over_roofline": scheduled_s / roofline_s,
        "tflops_per_s_scheduled": flops / scheduled_s / 1e12,
        "gb_per_s_scheduled": nbytes / scheduled_s / 1e9,
      }
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
