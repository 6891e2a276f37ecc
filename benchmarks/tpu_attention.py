"""BERT's attention on TPUs, XLA's against the Mosaic kernel, by XLA's cost models: docs/performance.md.

    python benchmarks/tpu_attention.py OUT_DIR [--models large] [--phases 1,2]
        [--chips v5e,v5p,v6e] [--report]

Two tables, each compiled through libtpu for one chip of a 4-chip slice (no TPU needed):

- **Attention alone**: the forward and backward pass of self-attention with dropout 0.1 on the
  probabilities, from a [B, L, 3, heads, head_dim] bf16 QKV projection to its gradient, as
  `model.attention_impl=xla` computes it (`layers.attention_with_dropout`: softmax and the
  hand-written backward, written out by XLA) and as `pallas` does (`fused_attention.attention`
  with the Mosaic kernel). Temporaries, the roofline, the scheduled time, FLOPs and bytes.
- **A layer**: the difference between the 2-layer and the 1-layer train step (`bertjax train
  --dry-run --compile --json --config.model.num_layers=N`, layers unrolled, no remat).

The batch per chip is the same for both and on every chip: the largest that fits XLA's BERT-large
step on a v5e (docs/scaling.md's fit table), so the rows compare like with like.

XLA's two estimates see the kernel differently. The roofline (`optimal_seconds`) prices a Mosaic
custom call by the cost the kernel declares (`pl.CostEstimate`: its matmul FLOPs, exponentials
and HBM bytes) at the chip's peak rates. The scheduled time sums libtpu's cycle estimates of the
instructions it schedules, and a custom call has none: the kernel is absent from it, and its
vector work (the softmax, the mask's hash) is priced by neither.

The dry runs' JSON lines go to OUT_DIR/runs.jsonl (benchmarks/tpu_fit_table.py's format; an
interrupted run resumes); `--report` prints the layer table from it, compiling no train step.
"""

import argparse
import collections
import os
import re
import tempfile
from pathlib import Path

from tpu_fit_table import CHIPS, NotCompiled, Runs, command

PER_CHIP = {"1": 64, "2": 16}  # XLA's BERT-large fits on a v5e (docs/scaling.md)
SHAPES = {"base": (12, 768), "large": (16, 1024)}  # heads, hidden
SEQ = {"1": 128, "2": 512}
# Mosaic's LLO vector instructions by the unit that runs them (the rest: vector ALU).
UNITS = {
  "mxu": re.compile(r"matmul|vmatres|vlatch|gain_latch"),
  "eup": re.compile(r"vexp|vln|vlog|vrecip|vrsqrt|vpow|vtanh"),
  "xlu": re.compile(r"vperm|vsetperm|vxpose|vrot"),
  "load/store": re.compile(r"vector_load|vector_store"),
}


def kernel_instructions(dump: Path, seen: set) -> dict[str, dict[str, int]]:
  """{kernel: {unit: instructions in one instance}} of the Mosaic kernels dumped since `seen`."""
  found = {}
  for path in sorted(dump.glob("*post-finalize-llo.txt")):
    if path.name in seen:
      continue
    seen.add(path.name)
    text = path.read_text()
    name = re.search(r"func\.func @(\w+)", text).group(1)
    body = text[: text.find("func.func @transform_0")]
    units = collections.Counter()
    for op in re.findall(r"\bllo\.(v[\w.]*|vector_\w+|matmul\w*)", body):
      if op.startswith("vbitcast"):
        continue
      units[next((unit for unit, pattern in UNITS.items() if pattern.search(op)), "valu")] += 1
    found[name] = dict(units)
  return found


def attention_alone(model: str, phase: str, chip: str, dump: Path, seen: set) -> dict[str, dict]:
  """{impl: temporaries, roofline, scheduled, FLOPs, bytes (and the kernels' instructions per
  1,024 probabilities)} of attention's forward and backward."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from bertjax.model import fused_attention, layers
  from bertjax.model.bert import attention_mask_for
  from bertjax.model.config import mosaic_block_q, mosaic_head_group
  from bertjax.perf import aot
  from bertjax.perf import tpu as tpu_lib

  heads, hidden = SHAPES[model]
  batch, length, head_dim = PER_CHIP[phase], SEQ[phase], hidden // heads
  tpu = tpu_lib.parse_topology(f"{chip}:{'2x2x1' if tpu_lib.GENERATIONS[chip].dims == 3 else '2x2'}")
  tgt = aot.target(tpu.chips, tpu.generation.device_kind, tpu, 1)
  one_chip = NamedSharding(Mesh(tgt.devices[:1], ("x",)), P())

  def attend(impl, q, k, v, pairs, key):
    if impl == "pallas":
      return fused_attention.attention(q, k, v, pairs, key, 0.1, kernel="mosaic")
    return layers.attention_with_dropout(q, k, v, attention_mask_for(None, pairs), key, 0.1, "hash")

  def gradient(impl):
    def loss(qkv, pairs, key, weights):
      out = attend(impl, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], pairs, key)
      return (out.astype(jnp.float32) * weights).sum()

    return jax.grad(loss)

  args = [
    jax.ShapeDtypeStruct((batch, length, 3, heads, head_dim), jnp.bfloat16, sharding=one_chip),
    jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=one_chip),
    jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=one_chip),
    jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32, sharding=one_chip),
  ]
  out = {}
  for impl in ("xla", "pallas"):
    compiled = jax.jit(gradient(impl)).lower(*args).compile()
    cost = aot.program_cost(compiled, tgt.clock_hz)
    out[impl] = {
      "temporaries_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
      "roofline_ms": 1e3 * cost["step_s"],
      "scheduled_ms": 1e3 * cost["scheduled_s"],
      "gflop": cost["flops"] / 1e9,
      "mib": cost["bytes_accessed"] / 2**20,
    }
  per_instance = mosaic_head_group(heads, head_dim) * length * mosaic_block_q(length) / 1024
  out["pallas"]["instructions"] = {
    name: {unit: count / per_instance for unit, count in units.items()}
    for name, units in kernel_instructions(dump, seen).items()
  }
  return out


def layer(runs: Runs, model: str, phase: str, chip: str, attention: str) -> dict:
  one, two = (
    runs.get(command(model, phase, chip, "none", PER_CHIP[phase], attention=attention, layers=n)) for n in (1, 2)
  )
  return {
    "memory_gib": two["memory_per_device_gib"] - one["memory_per_device_gib"],
    "roofline_ms": 1e3 * (two["estimated_step_s"] - one["estimated_step_s"]),
    "scheduled_ms": 1e3 * (two["scheduled_step_s"] - one["scheduled_step_s"]),
  }


def alone_table(args, dump: Path) -> str:
  rows = [
    "| model | phase (seq) | chip | batch per chip | attention | temporaries | roofline | scheduled | FLOPs | bytes |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  units = ("mxu", "valu", "eup", "xlu", "load/store")
  counts = [
    "| phase (seq) | chip | kernel | " + " | ".join(units) + " |",
    "|---|---|---|" + "---|" * len(units),
  ]
  seen: set = set()
  for model in args.models:
    for phase in args.phases:
      for chip in args.chips:
        figures = attention_alone(model, phase, chip, dump, seen)
        for name, per_vreg in figures["pallas"].pop("instructions").items():
          listed = " | ".join(f"{per_vreg.get(unit, 0):.1f}" for unit in units)
          counts.append(f"| {phase} ({SEQ[phase]}) | {chip} | {name} | {listed} |")
        for impl, f in figures.items():
          kernel = " (without the kernel)" if impl == "pallas" else ""
          rows.append(
            f"| {model} | {phase} ({SEQ[phase]}) | {chip} | {PER_CHIP[phase]} | {impl} | "
            f"{f['temporaries_mib']:,.0f} MiB | {f['roofline_ms']:.2f} ms | {f['scheduled_ms']:.2f} ms{kernel} | "
            f"{f['gflop']:.0f} G | {f['mib']:,.0f} MiB |"
          )
  per_vreg = "\n\nThe kernels' vector instructions per 1,024 probabilities (one instance's, by unit):\n\n"
  return "\n".join(rows) + per_vreg + "\n".join(counts)


def layer_table(runs: Runs, args) -> str:
  rows = [
    "| model | phase (seq) | chip | batch per chip | attention | memory a layer | roofline a layer "
    "| scheduled a layer |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for model in args.models:
    for phase in args.phases:
      for chip in args.chips:
        for attention in ("xla", "pallas"):
          head = f"| {model} | {phase} ({SEQ[phase]}) | {chip} | {PER_CHIP[phase]} | {attention} |"
          try:
            f = layer(runs, model, phase, chip, attention)
          except NotCompiled:
            rows.append(f"{head} not compiled yet | | |")
            continue
          kernel = " (without the kernel)" if attention == "pallas" else ""
          rows.append(
            f"{head} {f['memory_gib']:.2f} GiB | {f['roofline_ms']:.2f} ms | {f['scheduled_ms']:.2f} ms{kernel} |"
          )
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", type=Path)
  parser.add_argument("--models", default="large")
  parser.add_argument("--phases", default="1,2")
  parser.add_argument("--chips", default="v5e,v5p,v6e")
  parser.add_argument("--report", action="store_true", help="the layer table from OUT_DIR/runs.jsonl: no train step")
  args = parser.parse_args()
  for key in ("models", "phases", "chips"):
    setattr(args, key, getattr(args, key).split(","))
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  dump = Path(tempfile.mkdtemp(prefix="mosaic-dump-"))  # read by libtpu once, when it starts
  os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} --xla_mosaic_dump_to={dump}".strip()
  import jax

  jax.config.update("jax_platforms", "cpu")  # libtpu's compile-only devices; nothing runs
  args.out.mkdir(parents=True, exist_ok=True)
  print(f"Attention alone, forward and backward (one chip of a {CHIPS}-chip slice):\n")
  print(alone_table(args, dump))
  print(f"\nA layer: the 2-layer train step less the 1-layer one (one chip of a {CHIPS}-chip slice):\n")
  print(layer_table(Runs(args.out, compile=not args.report), args))


if __name__ == "__main__":
  main()
