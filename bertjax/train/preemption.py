"""Stopping cleanly when asked: SIGTERM or SIGINT finish the step, save, and exit 0.

One process: a Python handler notes the first SIGTERM or SIGINT and the loop stops after the
step in flight; a second SIGINT aborts at once.

Several processes must all save the same step, whichever of them was signalled (a scheduler
may reach one host first). `jax.distributed.initialize` starts JAX's preemption service, whose
own C++ handler takes SIGTERM; the processes then agree through orbax's preemption sync point
(`CheckpointManager.reached_preemption`, asked every step: a host-side check of a few
microseconds, no collective): when one process is signalled, all of them reach the sync point at
the same, slightly later step. So with several processes the guard leaves SIGTERM to that
service, and a first SIGINT is handed to it as a SIGTERM. Where the service is off
(`JAX_ENABLE_PREEMPTION_SERVICE=false`), the Python handler takes both signals and the processes
all-gather their flags every `CHECK_EVERY` steps instead.

The sync point is the highest step any process has reported when the notice comes, plus one; a
process that has not asked yet counts as step 0. So the guard reports the step it starts from as
soon as it is entered (before the first compile). A notice that comes earlier still, while a
resumed job restores its checkpoint, lands on step 1, which the resumed run never asks about:
that job trains on until the scheduler kills it, and resumes from its last periodic save.

A second SIGINT aborts at once. With several processes it ends the process with `os._exit`:
unwinding would wait for `jax.distributed`'s shutdown barrier, which the other processes, still
in a collective, never reach.
"""

import logging
import os
import signal
import sys
from collections.abc import Callable

import jax

from bertjax.train import processes

log = logging.getLogger(__name__)
CHECK_EVERY = 5  # steps between all-gathers of the flags when JAX's preemption service is off
JOB_NOTICE = "a preemption signal to the job"  # what stopped a process that was not signalled itself


class PreemptionGuard:
  """A context manager whose `should_stop(step)`, asked after every step, says when to save and stop.

  `sync_point(step)` is the multi-process agreement (orbax's `CheckpointManager.reached_preemption`).
  """

  def __init__(self, sync_point: Callable[[int], bool] | None = None, start: int = 0, check_every: int = CHECK_EVERY):
    self.received: str | None = None
    self.start = start
    self.check_every = check_every
    self._sync_point = sync_point
    self._previous = {}
    self._processes = 1
    self._service = False

  def __enter__(self):
    self._processes = jax.process_count()
    self._service = (
      self._processes > 1 and self._sync_point is not None and bool(jax.config.jax_enable_preemption_service)
    )
    # With the service on, SIGTERM stays with its C++ handler: a Python one would replace it.
    signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    if self._service and self._sync_point(self.start):  # report where this run starts
      self.received = JOB_NOTICE
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      if self._processes > 1:
        sys.stdout.flush()
        print(f"bertjax: second {name}: aborting without saving", file=sys.stderr, flush=True)
        os._exit(130)
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt(f"second {name}: aborting without saving")
    self.received = name
    log.warning(
      "received %s: finishing this step, saving a checkpoint, then stopping "
      "(send SIGINT again to abort without saving)",
      name,
    )
    if self._service:
      signal.raise_signal(signal.SIGTERM)  # JAX's handler: the service tells the other processes

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` (the number of steps done) and stop. Every process asks every step."""
    if self._processes == 1 or self.received == JOB_NOTICE:
      return self.received is not None
    if self._service:
      stop = self._sync_point(step)
    elif step % self.check_every == 0:
      stop = processes.any_raised(self.received is not None)
    else:
      stop = False
    if stop:
      self.received = self.received or JOB_NOTICE
    return stop
