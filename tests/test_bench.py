"""`bertjax bench`: the timed train step on synthetic batches, and its kernel summary."""

import gzip
import json
import math

from bertjax import bench
from bertjax import config as config_lib
from tests.test_pretrain import MICRO_OVERRIDES


def test_bench_times_the_step_and_reports_where_the_time_went(tmp_path):
  config = config_lib.load_config("configs/tiny.py", MICRO_OVERRIDES)
  result = bench.run(config, steps=2, warmup=1, profile_dir=tmp_path / "profile")
  assert result["batch_size"] == 8 and result["seq_len"] == 32 and result["steps"] == 2
  assert result["tokens_per_s"] > 0 and abs(result["tokens_per_s"] * result["step_s"] / (8 * 32) - 1) < 1e-3
  assert result["step_s_min"] <= result["step_s"] <= result["step_s_max"]
  assert 0 < result["loss"] < math.log(256) + math.log(2) + 0.1  # three steps from chance level
  profile = result["profile"]
  assert profile["trace"].startswith(str(tmp_path / "profile")) and profile["trace"].endswith(".json.gz")
  assert profile["busy_ms_per_step"] > 0 and profile["top"]
  name, ms, calls = profile["top"][0]
  assert isinstance(name, str) and ms > 0 and calls > 0
  assert [row[1] for row in profile["top"]] == sorted((row[1] for row in profile["top"]), reverse=True)


def test_the_summary_counts_device_kernels_per_step_and_not_host_events(tmp_path):
  events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
      *({"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "dur": 3000} for _ in range(4)),
      *({"ph": "X", "pid": 1, "tid": 7, "name": "memcpy128", "dur": 500} for _ in range(6)),
      {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(train_step)", "dur": 99000},
  ]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = bench.kernel_summary(path, steps=2)
  assert summary == {"busy_ms_per_step": 7.5, "top": [["gemm", 6.0, 2.0], ["memcpy128", 1.5, 3.0]]}
