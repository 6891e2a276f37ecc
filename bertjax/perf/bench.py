"""`bertjax bench`: the compiled train step timed on synthetic batches of the config's shape.

No corpus and no tokenizer: the vocabulary is `data.vocab_size` and batches are random ids with
`data.max_predictions` masked positions, so the figure is the model's and the mesh's alone. With
`data.pack_pairs` the batch is packed (1 to `data.max_pairs_per_row` pairs a row), so the packed
step (pair mask, a [CLS] per pair) is what is timed. `tokens_per_s` counts every position the
step computes; `nonpadding_tokens_per_s` only the real tokens of the batch timed. Synthetic rows
are full; `run(config, batch=...)` times a batch of the input pipeline instead, padding included.
Prints one JSON line per shape measured (the config's). With `--profile DIR` it also traces a few
steps with `jax.profiler` (open DIR in TensorBoard or Perfetto) and adds where the time went:
device time per step by kernel (XLA op on CPU), the biggest first.
"""

import statistics
import time

import jax
from etils import epath

from bertjax.data.synthetic import synthetic_batch, synthetic_packed_batch
from bertjax.metrics import flops as flops_lib
from bertjax.model.config import resolve_config
from bertjax.parallel.layout import MESH_AXES
from bertjax.perf.profile import kernel_summary
from bertjax.train import run as run_lib
from bertjax.train.pretraining import Pretraining

PROFILED_STEPS = 3


def _synthetic(config) -> dict:
  d, t = config.data, config.train
  if d.pack_pairs:
    return synthetic_packed_batch(t.batch_size, d.seq_len, d.max_predictions, d.vocab_size, d.max_pairs_per_row)
  return synthetic_batch(t.batch_size, d.seq_len, d.max_predictions, d.vocab_size)


def _compiled(compiled, state, batch):
  """(the train step compiled for this state and batch, seconds it took)."""
  start = time.perf_counter()
  with jax.set_mesh(compiled.mesh):
    executable = compiled.jitted["train"].lower(state, batch).compile()
  return executable, time.perf_counter() - start


def _timed(step, state, warmup: int, steps: int):
  """(state, last metrics, seconds of each timed step) after `warmup` untimed steps."""
  for _ in range(warmup):
    state, out = step(state)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = step(state)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return state, out, times


def run(config, steps: int = 20, warmup: int = 3, profile_dir=None, batch=None) -> dict:
  """Compile, warm up, then time `steps` train steps; the median step gives the throughput.

  Args:
    config: a validated run config; its model, data shapes, optimizer and mesh are used.
    steps, warmup: timed steps, and untimed ones before them.
    profile_dir: if given, PROFILED_STEPS more steps are traced there and their kernel summary
      is added under "profile".
    batch: a global batch in the pipeline's arrays (`Pipeline.batch(step)`) to time instead of a
      synthetic one; its padding then counts in `nonpadding_tokens_per_s`.
  Returns:
    The figures of one JSON line (compile time, step time, tokens/s of all positions and of the
    real tokens, MFU where the chip's peak is known, peak memory where the device reports it).
  """
  d, t = config.data, config.train
  model_config = resolve_config(config.model, d.vocab_size, seq_len=d.seq_len)
  compiled, _ = run_lib.compile_for(config, Pretraining(), model_config, t.steps)
  mesh = compiled.mesh
  state = compiled.init(t.seed)
  host = _synthetic(config) if batch is None else batch
  real_tokens = float(host["attention_mask"].sum())
  pairs = float(host["nsp_weights"].sum()) if "nsp_weights" in host else float(len(host["nsp_labels"]))
  batch = {k: jax.device_put(v, compiled.batch_sharding) for k, v in host.items()}

  executable, compile_s = _compiled(compiled, state, batch)

  def step(state):
    with jax.set_mesh(mesh):
      return executable(state, batch)

  state, out, times = _timed(step, state, warmup, steps)
  step_s = statistics.median(times)
  device = jax.local_devices()[0]  # memory_stats needs a device of this process
  flops = flops_lib.flops_per_sequence(model_config, d.seq_len, d.max_predictions)
  peak = flops_lib.peak_flops_per_device(device.device_kind, config.metrics.peak_tflops)
  result = {
    **_described(config, model_config, mesh, device),
    "steps": steps,
    "compile_s": round(compile_s, 2),
    "step_s": round(step_s, 5),
    "step_s_min": round(min(times), 5),
    "step_s_max": round(max(times), 5),
    "tokens_per_s": round(t.batch_size * d.seq_len / step_s, 1),
    "nonpadding_tokens_per_s": round(real_tokens / step_s, 1),
    "padding_fraction": round(1.0 - real_tokens / (t.batch_size * d.seq_len), 4),
    "pack_pairs": bool(d.pack_pairs),
    "pairs_per_row": round(pairs / t.batch_size, 3),
    "loss": float(out["loss"]),
  }
  if peak:
    result["mfu"] = round(flops * t.batch_size / step_s / (peak * jax.device_count()), 4)
  memory = device.memory_stats() if hasattr(device, "memory_stats") else None
  if memory and "peak_bytes_in_use" in memory:
    result["peak_memory_gib"] = round(memory["peak_bytes_in_use"] / 2**30, 3)
  if profile_dir is not None:
    result["profile"] = _profiled(step, state, profile_dir)
  return result


def _described(config, model_config, mesh, device) -> dict:
  """What was timed: the shapes, the model's settings, the mesh and the device."""
  d = config.data
  return {
    "variant": config.model.variant,
    "seq_len": d.seq_len,
    "batch_size": config.train.batch_size,
    "max_predictions": d.max_predictions,
    "vocab_size": d.vocab_size,
    "dtype": model_config.dtype,
    "attention_impl": model_config.attention_impl,
    "remat": model_config.remat,
    "scan_layers": model_config.scan_layers,
    "dropout_impl": model_config.dropout_impl,
    "dropout": model_config.dropout,
    "attention_dropout": model_config.attention_dropout,
    "mesh": dict(zip(MESH_AXES, mesh.devices.shape)),
    "device": device.device_kind,
    "devices": jax.device_count(),
  }


def _profiled(step, state, profile_dir) -> dict:
  """PROFILED_STEPS more steps traced into `profile_dir`, and where their time went."""
  with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
    for _ in range(PROFILED_STEPS):
      state, out = step(state)
    jax.block_until_ready(out)
  trace = max(epath.Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().mtime)
  return {"trace": str(trace), **kernel_summary(trace, PROFILED_STEPS)}
