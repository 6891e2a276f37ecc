"""When a training loop may save: the rules pretraining and fine-tuning share.

A save never happens after another run took the workdir over (every process stops, none waits in
the save's collective), and a periodic save never happens while steps are being skipped for a
non-finite gradient, so the newest checkpoint stays one from before the first skipped step.
"""

import dataclasses
import logging
from collections.abc import Callable

import jax
from etils import epath

from bertjax.train import checkpoint, lock, processes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Saver:
  """Saves through `checkpoints` with `meta(step)` beside the state, under the rules above."""

  checkpoints: checkpoint.Checkpoints
  workdir_lock: lock.WorkdirLock | None  # process 0's; None on the others
  workdir: epath.Path
  meta: Callable[[int], dict]

  def save(self, state, step: int, *, wait: bool = False) -> None:
    """`Checkpoints.save` of `state` with `meta(step)`, on every process.

    Raises:
      WorkdirInUse: another run took the workdir over; no process saves.
      CheckpointError: the save failed.
    """
    lost = self.workdir_lock is not None and self.workdir_lock.lost is not None
    if processes.from_primary(lost):  # every process stops, none waits in the save's collective
      if self.workdir_lock is not None:
        self.workdir_lock.check()
      raise lock.WorkdirInUse(f"--workdir {self.workdir}: another run took it over (process 0 says which)")
    self.checkpoints.save(state, self.meta(step), wait=wait)

  def periodic(self, state, step: int, step_metrics) -> None:
    """A scheduled save, skipped while the step's gradient streak is non-finite."""
    skipping = int(jax.device_get(step_metrics["nonfinite_consecutive"]))  # the save waits on this step anyway
    if skipping:
      log.warning(
        "step %d: no checkpoint while steps are skipped for a non-finite gradient (%d in a row so far)", step, skipping
      )
      return
    self.save(state, step)

  def newest(self) -> int | None:
    """The newest checkpoint step in the workdir, or None."""
    steps = self.checkpoints.steps()
    return steps[-1] if steps else None
