"""The console progress line: format, ETA, in-place redraw on a terminal."""

import io

from bertjax.metrics import progress as metrics


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_bar_prints_a_line_per_update_off_a_terminal():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(total_steps=1000, start_step=100, stream=stream, clock=clock)
  clock.now += 60.0  # 100 steps a minute: 800 steps to go take 8 minutes
  bar.update(200, {"loss": 6.54321, "mlm_accuracy": 0.1234, "nsp_accuracy": 0.6, "tokens_per_s": 123456.7})
  clock.now += 3600.0
  bar.update(300, {"loss": 5.0})
  bar.close()
  assert stream.getvalue().splitlines() == [
    "step  200/1000 | loss 6.5432 | mlm_acc 0.1234 | nsp_acc 0.6000 | 123,457 tok/s | ETA 8m00s",
    "step  300/1000 | loss 5.0000 | ETA 3h33m",  # (60 + 3600) s / 200 steps * 700 steps = 12810 s = 3h33m30s
  ]
  assert "\r" not in stream.getvalue()


def test_progress_bar_redraws_in_place_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream, clock = Terminal(), FakeClock()
  bar = metrics.ProgressBar(total_steps=10, stream=stream, clock=clock)
  bar.update(0, {"loss": 10.0, "tokens_per_s": 1e6})
  clock.now += 1.0
  bar.update(5, {"loss": 9.0})
  bar.close()
  first, second = stream.getvalue().split("\r")[1:]
  assert first == "step  0/10 | loss 10.0000 | 1,000,000 tok/s | ETA ?"
  assert second.rstrip("\n").rstrip() == "step  5/10 | loss 9.0000 | ETA 0m01s"
  assert len(second.rstrip("\n")) == len(first) and stream.getvalue().endswith("\n")


def test_disabled_progress_bar_prints_nothing():
  stream = io.StringIO()
  bar = metrics.ProgressBar(total_steps=10, enabled=False, stream=stream)
  bar.update(5, {"loss": 1.0})
  bar.close()
  assert stream.getvalue() == ""
