"""Stopping cleanly when asked: SIGTERM or SIGINT finish the step, save, and exit 0.

One process: a Python handler notes the first SIGTERM or SIGINT; the loop finishes its step,
saves synchronously and returns; a second SIGINT aborts at once. Several processes: schedulers
send SIGTERM to every process, and JAX's preemption service (running once `jax.distributed` is
initialised) agrees on one step at which all of them stop, through orbax's
`reached_preemption`, so every process saves the same step. SIGINT then keeps its default
(abort), since one process's Ctrl-C cannot be agreed on without a collective every step.
"""

import logging
import signal

import jax

log = logging.getLogger(__name__)


class PreemptionGuard:
  """A context manager whose `should_stop(step, checkpoints)` says when to save and stop."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._multi_process = False

  def __enter__(self):
    self._multi_process = jax.process_count() > 1
    signals = [] if self._multi_process else [signal.SIGTERM, signal.SIGINT]
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt(f"second {name}: aborting without saving")
    self.received = name
    log.warning("received %s: finishing this step, saving a checkpoint, then stopping "
                "(send SIGINT again to abort without saving)", name)

  def should_stop(self, step: int, checkpoints) -> bool:
    if self._multi_process:
      if checkpoints.manager.reached_preemption(step):
        self.received = self.received or "SIGTERM"
        return True
      return False
    return self.received is not None
