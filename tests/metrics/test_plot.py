"""`bertjax plot`: curves of train and eval, a step logged twice, a line cut by a crash, no metrics yet."""

import math

import pytest

from bertjax.errors import BertjaxError
from bertjax.metrics import plot
from bertjax.metrics import writer as metrics


def test_plot_curves_writes_a_png_of_train_and_eval(tmp_path):

  with metrics.MetricsWriter(tmp_path) as writer:
    for step in range(0, 200, 10):
      decay = math.exp(-step / 100)
      writer.write(
        step,
        {
          "loss": 1 + 9 * decay,
          "mlm_loss": 9 * decay,
          "nsp_loss": 0.7 * decay,
          "mlm_accuracy": 1 - decay,
          "nsp_accuracy": 1 - 0.5 * decay,
        },
      )
      if step % 50 == 0:
        writer.write(step, {"loss": 1.5 + 9 * decay, "mlm_accuracy": 0.9 - decay}, split="eval")
  out = plot.plot_curves(tmp_path)
  assert out == tmp_path / "curves.png"
  png = out.read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
  curves = plot.curves_by_split(metrics.read_metrics(tmp_path), "loss")
  assert set(curves) == {"train", "eval"} and curves["eval"][0] == [0, 50, 100, 150]

  elsewhere = plot.plot_curves(tmp_path, tmp_path / "plots" / "run.png")
  assert elsewhere.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_keep_the_latest_record_of_a_step_logged_twice():

  records = [
    {"step": 10, "split": "train", "loss": 3.0},
    {"step": 20, "split": "train", "loss": 2.0},
    {"step": 10, "split": "train", "loss": 2.5},
  ]  # resumed from step 10
  assert plot.curves_by_split(records, "loss") == {"train": ([10, 20], [2.5, 2.0])}


def test_a_line_cut_by_a_crash_is_skipped(tmp_path):
  lines = [
    '{"step": 1, "split": "train", "time": 0, "loss": 6.0}',
    "7",  # JSON, but not a record
    '{"step": 2, "split": "train", "time": 0, "loss": 5.0}',
    '{"step": 3, "split": "train", "time": 0, "lo',  # a run killed mid-write
  ]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
  assert plot.plot_curves(tmp_path).exists()
  assert plot.curves_by_split(metrics.read_metrics(tmp_path), "loss") == {"train": ([1, 2], [6.0, 5.0])}


def test_plot_without_metrics_is_a_user_error(tmp_path):
  with pytest.raises(BertjaxError, match=r"--workdir .*no metrics.jsonl there; train first"):
    plot.plot_curves(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "time": 0, "lr": 0.1}\n')
  with pytest.raises(BertjaxError, match="no loss or accuracy"):
    plot.plot_curves(tmp_path)
