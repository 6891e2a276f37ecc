"""metrics.jsonl and the TensorBoard event files: records, resumes, crashes, and read-backs."""

import json
import logging
import time

import jax.numpy as jnp
import numpy as np
import pytest

from bertjax.errors import BertjaxError
from bertjax.metrics import writer as metrics


def _write_two_steps(workdir, writer_cls=metrics.MetricsWriter):
  with writer_cls(workdir) as writer:
    writer.write(10, {"loss": 7.5, "mlm_accuracy": np.float32(0.125), "skipped_steps": np.int64(0)})
    writer.write(10, {"loss": jnp.asarray(7.25)}, split="eval")


def test_jsonl_records_parse_and_a_resumed_run_appends(tmp_path):
  _write_two_steps(tmp_path)
  with metrics.MetricsWriter(tmp_path) as writer:  # a resumed run
    writer.write(20, {"loss": 6.0, "epoch": 1})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  records = [json.loads(line) for line in lines]
  assert records[0]["step"] == 10 and records[0]["split"] == "train" and records[0]["mlm_accuracy"] == 0.125
  assert isinstance(records[0]["skipped_steps"], int) and isinstance(records[0]["time"], float)
  assert records[1] == {"step": 10, "split": "eval", "time": records[1]["time"], "loss": 7.25}
  assert records[2]["epoch"] == 1 and metrics.read_metrics(tmp_path) == records


def test_read_metrics_skips_a_line_cut_by_a_crash_and_the_next_writer_cuts_it_off(tmp_path):
  _write_two_steps(tmp_path)
  whole = (tmp_path / "metrics.jsonl").read_text()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 11, "split": "tr')  # killed mid-write
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [10, 10]
  with metrics.MetricsWriter(tmp_path) as writer:  # the resumed run
    writer.write(12, {"loss": 5.0})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text.startswith(whole) and text.count("\n") == 3 and "tr\n" not in text
  assert [json.loads(line)["step"] for line in text.splitlines()] == [10, 10, 12]
  assert metrics.read_metrics(tmp_path / "elsewhere") == []


def test_a_whole_last_record_that_lost_only_its_newline_is_kept(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}')
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(3, {"loss": 0.5})
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]


def _scalars(tb_folder, tag, local_copy) -> list[tuple[int, float]]:
  """A TensorBoard tag's (step, value) pairs, read by TensorBoard from a local copy of the folder."""
  from tensorboard.backend.event_processing import event_accumulator

  local_copy.mkdir(exist_ok=True)
  for events in tb_folder.iterdir():
    (local_copy / events.name).write_bytes(events.read_bytes())
  acc = event_accumulator.EventAccumulator(str(local_copy))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def _eventually(read, want, seconds=30.0):
  """`read()` once it returns `want` (uploads run in the background), else its last value."""
  deadline = time.monotonic() + seconds
  while (got := read()) != want and time.monotonic() < deadline:
    time.sleep(0.05)
  return got


def test_on_gcs_readers_see_whole_lines_and_tensorboard_while_the_run_writes(gcs_bucket, tmp_path):
  workdir = metrics.epath.Path(gcs_bucket) / "run"
  steps = lambda: [r["step"] for r in metrics.read_metrics(workdir)]
  with metrics.MetricsWriter(workdir, upload_every_s=0) as writer:
    writer.write(10, {"loss": 7.5})
    writer.write(20, {"loss": 7.0})
    assert _eventually(steps, [10, 20]) == [10, 20]  # before the writer closes
    time.sleep(1.5)  # tensorboardX puts its events on disk every second here: the next upload takes them
    writer.write(25, {"loss": 6.8})
    read_tb = lambda: _scalars(workdir / "tb", "train/loss", tmp_path / "tb")[:2] if (workdir / "tb").exists() else []
    assert _eventually(read_tb, [(10, 7.5), (20, 7.0)]) == [(10, 7.5), (20, 7.0)]
  (workdir / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text() + '{"step": 21, "spl')  # cut
  with metrics.MetricsWriter(workdir, upload_every_s=3600) as writer:  # a resumed run
    writer.write(30, {"loss": 6.5})  # the first upload goes at once
    assert _eventually(steps, [10, 20, 25, 30]) == [10, 20, 25, 30]
    writer.write(40, {"loss": 6.0})  # this one waits for the next upload, here the close
    time.sleep(0.5)
    assert steps() == [10, 20, 25, 30]
  text = (workdir / "metrics.jsonl").read_text()
  assert [json.loads(line)["step"] for line in text.splitlines()] == [10, 20, 25, 30, 40]


def test_on_gcs_a_store_that_goes_away_loses_no_line_and_never_hangs(gcs, gcs_bucket, caplog):
  caplog.set_level(logging.WARNING)
  workdir = metrics.epath.Path(gcs_bucket) / "run"
  writer = metrics.MetricsWriter(workdir, upload_every_s=0)
  writer.write(1, {"loss": 3.0})
  steps = lambda: [r["step"] for r in metrics.read_metrics(workdir)]
  assert _eventually(steps, [1]) == [1]
  gcs.stop()
  try:
    started = time.monotonic()
    writer.write(2, {"loss": 2.5})  # the upload fails in the background: the loop does not wait
    assert time.monotonic() - started < 1.0
    assert _eventually(lambda: "could not upload the metrics" in caplog.text, True, seconds=150)
  finally:
    gcs.start()
  writer.write(3, {"loss": 2.0})
  writer.close()
  assert steps() == [1, 2, 3]


def test_a_write_the_os_refuses_is_one_line(tmp_path):
  (tmp_path / "metrics.jsonl").mkdir()  # stands in for a full disk or a lost permission
  with pytest.raises(BertjaxError) as error, metrics.MetricsWriter(tmp_path) as writer:
    writer.write(5, {"loss": 1.0})
  message = str(error.value)
  assert "\n" not in message and message.startswith(
    f"writing the metrics of step 5 to {tmp_path} failed: Is a directory"
  )


def test_tensorboard_reads_past_a_record_cut_by_a_crash_into_the_resumed_runs_file(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  _write_two_steps(tmp_path)
  (killed,) = (tmp_path / "tb").iterdir()
  killed.write_bytes(killed.read_bytes()[:-7])  # the eval record of step 10, cut mid-write
  with metrics.MetricsWriter(tmp_path) as writer:  # the resumed run writes a file of its own
    writer.write(20, {"loss": 6.0})
    writer.write(20, {"loss": 5.5}, split="eval")
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 7.5), (20, 6.0)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(20, 5.5)]


def test_writer_refuses_what_json_and_tensorboard_cannot_hold(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="step"):
      writer.write(1, {"step": 3.0})
    with pytest.raises(ValueError, match="scalar"):
      writer.write(1, {"loss": np.ones(3)})


def test_tensorboard_reads_back_the_same_tags_steps_and_values(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  _write_two_steps(tmp_path)
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(20, {"loss": 6.0})
  files = sorted((tmp_path / "tb").iterdir())
  assert len(files) == 2 and all(f.name.startswith("events.out.tfevents.") for f in files)

  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/mlm_accuracy", "train/skipped_steps", "eval/loss"}
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 7.5), (20, 6.0)]
  assert [(e.step, e.value) for e in acc.Scalars("train/mlm_accuracy")] == [(10, 0.125)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(10, 7.25)]


def test_the_event_file_starts_with_the_file_version_and_its_checksums_verify(tmp_path):
  from tensorboard.backend.event_processing import event_file_loader

  _write_two_steps(tmp_path)
  (path,) = (tmp_path / "tb").iterdir()
  events = list(event_file_loader.EventFileLoader(str(path)).Load())
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [10, 10, 10, 10]  # three train scalars, one eval
  assert events[1].wall_time == pytest.approx(metrics.read_metrics(tmp_path)[0]["time"])
  # Flip one payload byte: the data CRC no longer matches, which TensorBoard's reader checks.
  raw = bytearray(path.read_bytes())
  raw[-6] ^= 0xFF
  path.write_bytes(bytes(raw))
  assert len(list(event_file_loader.EventFileLoader(str(path)).Load())) < len(events)


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricsWriter(tmp_path / "run", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.flush()
  assert not (tmp_path / "run").exists()


def test_writing_events_brings_no_pytorch_into_the_process(tmp_path):
  """tensorboardX would import torch where the hf extra installed it: CUDA libraries of its own."""
  import subprocess
  import sys

  code = (
    "import sys; from bertjax.metrics import writer; w = writer.MetricsWriter(sys.argv[1]); "
    "w.write(1, {'loss': 1.0}); w.close(); print('torch' in sys.modules, len(writer.read_metrics(sys.argv[1])))"
  )
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "1"]
  assert list((tmp_path / metrics.TENSORBOARD_DIRNAME).glob("events.out.tfevents.*"))
