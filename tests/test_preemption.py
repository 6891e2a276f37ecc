"""The signal guard: first SIGTERM/SIGINT asks to stop after saving, a second SIGINT aborts."""

import os
import signal

import pytest

from bertjax.preemption import PreemptionGuard


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
