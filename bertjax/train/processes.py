"""What the processes of a job agree on, before anything that must happen on all of them.

    from_primary(flag)   process 0's flag, on every process
    any_raised(flag)     whether any process raised its flag
    barrier(name)        every process has got here

With one process each is the flag itself (or nothing): no collective runs. With several, each is a
tiny collective over every device, so every process must call it at the same point.
"""

import jax
import numpy as np


def from_primary(flag: bool) -> bool:
  """Process 0's `flag`, on every process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def any_raised(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
  """Wait until every process has called `barrier` with this `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
