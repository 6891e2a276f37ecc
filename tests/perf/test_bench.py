"""`bertjax bench`: the timed train step on synthetic batches, and its kernel summary."""

import gzip
import json
import math

from bertjax.config import loading as config_lib
from bertjax.perf import bench, profile
from tests.support.runs import MICRO_OVERRIDES


def test_bench_times_the_step_and_reports_where_the_time_went(tmp_path):
  config = config_lib.load_config("configs/tiny.py", MICRO_OVERRIDES)
  result = bench.run(config, steps=2, warmup=1, profile_dir=tmp_path / "profile")
  assert result["batch_size"] == 8 and result["seq_len"] == 32 and result["steps"] == 2
  assert result["tokens_per_s"] > 0 and abs(result["tokens_per_s"] * result["step_s"] / (8 * 32) - 1) < 1e-3
  assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]
  assert result["nonpadding_tokens_per_s"] == result["tokens_per_s"] and result["padding_fraction"] == 0
  assert not result["pack_pairs"] and result["pairs_per_row"] == 1
  assert 0 < result["loss"] < math.log(256) + math.log(2) + 0.1  # three steps from chance level
  profile = result["profile"]
  assert profile["trace"].startswith(str(tmp_path / "profile")) and profile["trace"].endswith(".json.gz")
  assert profile["devices"] == result["devices"] == 8  # conftest's fake CPU devices
  assert 0 < profile["busy_ms_per_step"] < 2 * 1e3 * result["step_s"]  # one device's time, not the sum
  assert profile["top"]
  name, ms, calls = profile["top"][0]
  assert isinstance(name, str) and ms > 0 and calls > 0
  assert [row[1] for row in profile["top"]] == sorted((row[1] for row in profile["top"]), reverse=True)


def test_bench_times_the_packed_step_and_counts_real_tokens():
  import numpy as np

  from bertjax.data.synthetic import synthetic_packed_batch

  config = config_lib.load_config(
    "configs/tiny.py", MICRO_OVERRIDES + ["data.pack_pairs=true", "data.max_pairs_per_row=3"]
  )
  synthetic = bench._synthetic(config)  # what `bertjax bench` times: full rows of 1-3 pairs
  assert synthetic["attention_mask"].all() and synthetic["nsp_weights"].shape == (8, 3)
  assert synthetic["nsp_weights"].sum(1).max() > 1
  # A pipeline-like batch: the last pair of every row with two or more becomes padding.
  batch = synthetic_packed_batch(8, 32, 5, 256, 3, seed=1)
  for r in range(8):
    k = int(batch["nsp_weights"][r].sum())
    if k > 1:
      drop = batch["pair_ids"][r] == k
      for name in ("input_ids", "segment_ids", "attention_mask", "position_ids", "pair_ids"):
        batch[name][r, drop] = 0
      batch["nsp_weights"][r, k - 1] = batch["nsp_labels"][r, k - 1] = batch["nsp_positions"][r, k - 1] = 0
      batch["masked_weights"][r, drop[batch["masked_positions"][r]]] = 0
  real = batch["attention_mask"].mean()
  assert 0.5 < real < 1
  result = bench.run(config, steps=2, warmup=1, batch=batch)
  assert result["pack_pairs"] and result["pairs_per_row"] == batch["nsp_weights"].sum() / 8
  assert result["padding_fraction"] == round(1 - real, 4)
  assert abs(result["nonpadding_tokens_per_s"] / result["tokens_per_s"] - real) < 1e-3
  assert np.isfinite(result["loss"])


def _trace(tmp_path, events):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return path


def test_the_summary_counts_gpu_kernels_per_step_and_device_and_not_host_events(tmp_path):
  events = [
    {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 9, "tid": 1, "name": "PjitFunction(train_step)", "dur": 99000},
  ]
  for pid in (1, 2):  # two GPUs, the same kernels on each
    events += [
      {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"/device:GPU:{pid - 1}"}},
      *({"ph": "X", "pid": pid, "tid": 7, "name": "gemm", "dur": 3000} for _ in range(4)),
      *({"ph": "X", "pid": pid, "tid": 7, "name": "memcpy128", "dur": 500} for _ in range(6)),
    ]
  summary = profile.kernel_summary(_trace(tmp_path, events), steps=2)
  assert summary == {"devices": 2, "busy_ms_per_step": 7.5, "top": [["gemm", 6.0, 2.0], ["memcpy128", 1.5, 3.0]]}


def test_the_summary_reads_only_the_op_line_where_a_device_has_one(tmp_path):
  events = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:TPU:0"}},
    {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "XLA Modules"}},
    {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "XLA Ops"}},
    {"ph": "X", "pid": 1, "tid": 2, "name": "jit_train_step", "dur": 5000},
    {"ph": "X", "pid": 1, "tid": 3, "name": "fusion.1", "dur": 3000},
    {"ph": "X", "pid": 1, "tid": 3, "name": "convolution.2", "dur": 2000},
  ]
  summary = profile.kernel_summary(_trace(tmp_path, events), steps=1)
  assert summary == {
    "devices": 1,
    "busy_ms_per_step": 5.0,
    "top": [["fusion.1", 3.0, 1.0], ["convolution.2", 2.0, 1.0]],
  }


def test_the_summary_on_cpu_counts_xla_ops_without_their_enclosing_loops(tmp_path):
  def op(name, dur, device):
    return {
      "ph": "X",
      "pid": 1,
      "tid": device,
      "name": name,
      "dur": dur,
      "args": {"hlo_op": name, "device_ordinal": str(device)},
    }

  events = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "tid": 0, "name": "ThunkExecutor::Execute", "dur": 9000},
    *(op("while.3", 4000, d) for d in (0, 1)),
    *(op("dot.1", 3000, d) for d in (0, 1)),
  ]
  summary = profile.kernel_summary(_trace(tmp_path, events), steps=1)
  assert summary == {"devices": 2, "busy_ms_per_step": 3.0, "top": [["dot.1", 3.0, 1.0]]}
