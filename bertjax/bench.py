"""`bertjax bench`: the compiled train step timed on synthetic batches of the config's shape.

No corpus and no tokenizer: the vocabulary is `data.vocab_size` and batches are random ids with
`data.max_predictions` masked positions, so the figure is the model's and the mesh's alone.
Prints one JSON line per shape measured (the config's). With `--profile DIR` it also traces a few
steps with `jax.profiler` (open DIR in TensorBoard or Perfetto) and adds where the time went:
device time per step by kernel (XLA op on CPU), the biggest first.
"""

import collections
import gzip
import json
import statistics
import time

from etils import epath

import jax
import numpy as np

from bertjax import metrics, sharding
from bertjax import train as train_lib
from bertjax.model import resolve_config


def synthetic_batch(batch_size: int, seq_len: int, max_predictions: int, vocab_size: int, seed: int = 0):
  """Full-length rows, two segments, distinct masked positions: the shape of a real batch."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, (batch_size, seq_len), dtype=np.int32)
  positions = np.sort(np.argsort(rng.random((batch_size, seq_len - 1)), axis=1)[:, :max_predictions] + 1, axis=1)
  return {
      "input_ids": ids,
      "segment_ids": (np.arange(seq_len)[None] >= seq_len // 2).astype(np.int32).repeat(batch_size, 0),
      "attention_mask": np.ones((batch_size, seq_len), np.int32),
      "masked_positions": positions.astype(np.int32),
      "masked_ids": np.take_along_axis(ids, positions, 1),
      "masked_weights": np.ones((batch_size, max_predictions), np.float32),
      "nsp_labels": rng.integers(0, 2, batch_size, dtype=np.int32),
  }


PROFILED_STEPS = 3
TOP_KERNELS = 30


def run(config, steps: int = 20, warmup: int = 3, profile_dir=None) -> dict:
  """Compile, warm up, then time `steps` train steps; the median step gives the throughput.
  With `profile_dir`, trace PROFILED_STEPS more steps there and add their kernel summary."""
  d, t = config.data, config.train
  model_config = resolve_config(config.model, d.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  compiled = train_lib.compile_steps(model_config, config.optim, t.steps, t.grad_accum, mesh)
  state = compiled.init(t.seed)
  batch = {k: jax.device_put(v, compiled.batch_sharding)
           for k, v in synthetic_batch(t.batch_size, d.seq_len, d.max_predictions, d.vocab_size).items()}

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    executable = compiled.jitted["train"].lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def step(state):
    with jax.set_mesh(mesh):
      return executable(state, batch)

  for _ in range(warmup):
    state, out = step(state)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = step(state)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)

  step_s = statistics.median(times)
  device = jax.local_devices()[0]  # memory_stats needs a device of this process
  flops = metrics.flops_per_sequence(model_config, d.seq_len, d.max_predictions)
  peak = metrics.peak_flops_per_device(device.device_kind, config.metrics.peak_tflops)
  result = {
      "variant": config.model.variant, "seq_len": d.seq_len, "batch_size": t.batch_size,
      "max_predictions": d.max_predictions, "vocab_size": d.vocab_size, "dtype": model_config.dtype,
      "attention_impl": model_config.attention_impl, "remat": model_config.remat,
      "dropout": model_config.dropout, "attention_dropout": model_config.attention_dropout,
      "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)), "device": device.device_kind,
      "devices": jax.device_count(), "steps": steps,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 5),
      "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
      "tokens_per_s": round(t.batch_size * d.seq_len / step_s, 1),
      "loss": float(out["loss"]),
  }
  if peak:
    result["mfu"] = round(flops * t.batch_size / step_s / (peak * jax.device_count()), 4)
  memory = device.memory_stats() if hasattr(device, "memory_stats") else None
  if memory and "peak_bytes_in_use" in memory:
    result["peak_memory_gib"] = round(memory["peak_bytes_in_use"] / 2**30, 3)
  if profile_dir is not None:
    with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
      for _ in range(PROFILED_STEPS):
        state, out = step(state)
      jax.block_until_ready(out)
    trace = max(epath.Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz"),
                key=lambda p: p.stat().mtime)
    result["profile"] = {"trace": str(trace), **kernel_summary(trace, PROFILED_STEPS)}
  return result


def kernel_summary(trace_path, steps: int, top: int = TOP_KERNELS) -> dict:
  """Time per step and device by kernel, from a perfetto trace.

  On GPUs the kernels of every `/device:` process (its streams); where a device has an "XLA Ops"
  line (TPU) only that line, since its module and step lines span the same time again. On CPU
  the XLA ops (events naming an `hlo_op`), leaving out control flow (`while`, `conditional`,
  `call`), whose events contain their bodies' ops. Times are averaged over the devices.
  """
  with gzip.open(epath.Path(trace_path).open("rb")) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  metadata = [e for e in events if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in metadata if e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in metadata if e.get("name") == "thread_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  op_lines = {(pid, tid) for (pid, tid), name in threads.items() if pid in devices and name == "XLA Ops"}
  with_op_lines = {pid for pid, _ in op_lines}

  def is_kernel(e) -> bool:
    if devices:
      pid = e.get("pid")
      return pid in devices and (pid not in with_op_lines or (pid, e.get("tid")) in op_lines)
    op = e.get("args", {}).get("hlo_op")
    return op is not None and not op.startswith(("while", "conditional", "call"))

  kernels = [e for e in events if e.get("ph") == "X" and is_kernel(e)]
  n_devices = len(devices) or len({e["args"].get("device_ordinal") for e in kernels}) or 1
  time_us, calls = collections.Counter(), collections.Counter()
  for e in kernels:
    time_us[e["name"]] += e.get("dur", 0)
    calls[e["name"]] += 1
  per = steps * n_devices
  return {
      "devices": n_devices,
      "busy_ms_per_step": round(sum(time_us.values()) / per / 1e3, 3),
      "top": [[name, round(us / per / 1e3, 3), calls[name] / per] for name, us in time_us.most_common(top)],
  }
