"""The signal guard: first SIGTERM/SIGINT asks to stop after saving, a second SIGINT aborts.

The multi-process runs with real signals are in tests/train/test_checkpoint.py and tests/test_launch.py.
"""

import os
import signal

import jax
import pytest

from bertjax.train.preemption import PreemptionGuard


def test_first_signal_asks_to_stop_and_a_second_sigint_aborts():
  with PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.received == "SIGTERM" and guard.should_stop(2)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT: aborting without saving"):
      os.kill(os.getpid(), signal.SIGINT)


def test_handlers_are_restored_on_exit():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard():
    assert signal.getsignal(signal.SIGTERM) != before
  assert signal.getsignal(signal.SIGTERM) == before


def test_with_several_processes_sigterm_stays_with_jax_and_sigint_is_handed_to_it(monkeypatch):
  """The service's agreement decides the step; a second SIGINT ends the process outright."""
  notices = []

  def jax_handler(signum, frame):  # stands in for the C++ handler of JAX's preemption service
    notices.append(signum)

  previous = signal.signal(signal.SIGTERM, jax_handler)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  service = jax.config.jax_enable_preemption_service  # an in-process CLI call elsewhere may have turned it off
  jax.config.update("jax_enable_preemption_service", True)
  exits = []

  def fake_exit(code):
    exits.append(code)
    raise SystemExit(code)

  monkeypatch.setattr(os, "_exit", fake_exit)
  asked = []
  try:
    with PreemptionGuard(sync_point=lambda step: asked.append(step) or step == 7, start=5) as guard:
      assert asked == [5]  # where this run starts, reported before the first step
      assert signal.getsignal(signal.SIGTERM) is jax_handler
      os.kill(os.getpid(), signal.SIGINT)
      assert guard.received == "SIGINT" and notices == [signal.SIGTERM]
      assert not guard.should_stop(6) and guard.should_stop(7)
      with pytest.raises(SystemExit):
        os.kill(os.getpid(), signal.SIGINT)
      assert exits == [130]
  finally:
    signal.signal(signal.SIGTERM, previous)
    jax.config.update("jax_enable_preemption_service", service)
