"""The console progress line: step, loss, accuracies, tokens/s and ETA."""

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar:
  """One status line: step/total, loss, MLM and NSP accuracy, tokens/s and ETA.

  On a terminal the line is redrawn in place; elsewhere (logs, pipes) each update is a new line,
  which is why the loop calls it only at log steps. The ETA extrapolates the step rate since
  construction (compilation included, so the first estimate is pessimistic).
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int = 0,
    enabled: bool = True,
    stream: TextIO = sys.stderr,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total_steps = total_steps
    self.start_step = start_step
    self.enabled = enabled
    self.stream = stream
    self.clock = clock
    self.start_time = clock()
    self.is_tty = enabled and bool(getattr(stream, "isatty", lambda: False)())
    self._drawn_width = 0

  def format(self, step: int, metrics: dict[str, Any]) -> str:
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}"]
    for key, label in (("loss", "loss"), ("mlm_accuracy", "mlm_acc"), ("nsp_accuracy", "nsp_acc")):
      if key in metrics:
        parts.append(f"{label} {float(metrics[key]):.4f}")
    if "tokens_per_s" in metrics:
      parts.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
    parts.append(f"ETA {self._eta(step)}")
    return " | ".join(parts)

  def _eta(self, step: int) -> str:
    done, elapsed = step - self.start_step, self.clock() - self.start_time
    if done <= 0 or elapsed <= 0:
      return "?"
    return _duration(max(self.total_steps - step, 0) * elapsed / done)

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = self.format(step, metrics)
    if self.is_tty:
      # Pad over the previous line's tail: a shorter line would leave stale characters behind.
      self.stream.write("\r" + line.ljust(self._drawn_width))
      self._drawn_width = len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.is_tty and self._drawn_width:
      self.stream.write("\n")
      self.stream.flush()
    self._drawn_width = 0
