"""Stateless random numbers keyed by integers: (seed, epoch, example index, position, stream).

Masking must give row r of step s the same draws whether a process builds the whole global batch
or only its own rows, and whether or not the iterator was restarted in between. A sequential
generator cannot promise that without replaying everything before; a counter-based hash can: each
number is a pure function of its key. SplitMix64's finaliser mixes well enough for masking and is a
handful of vectorised uint64 operations.
"""

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix(x) -> np.ndarray:
  """SplitMix64 finaliser, elementwise over a uint64 array (wrapping arithmetic on purpose)."""
  z = np.asarray(x, dtype=np.uint64) + _GOLDEN
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def row_keys(seed: int, epoch, index) -> np.ndarray:
  """One uint64 key per example, from the run's seed, the epoch and the example's index.

  Args:
    seed: the run's seed (any int; taken modulo 2**64).
    epoch: an int or an integer array.
    index: an int or an integer array, broadcast against `epoch`.
  Returns:
    uint64 keys, shaped as `epoch` and `index` broadcast.
  """
  k = mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
  k = mix(k ^ np.asarray(epoch, dtype=np.uint64))
  return mix(k ^ np.asarray(index, dtype=np.uint64))


def window_keys(seed: int, epoch: int, window: int, index) -> np.ndarray:
  """One uint64 key per example of a stream window: (seed, epoch, window) then the index in it.

  Args:
    seed: the run's seed.
    epoch: the pass over the corpus.
    window: the window's number within the epoch.
    index: the examples' indices within the window (an int or an integer array).
  Returns:
    uint64 keys shaped as `index`.
  """
  return mix(row_keys(seed, epoch, window) ^ np.asarray(index, dtype=np.uint64))


def uniform(keys_N: np.ndarray, stream: int, width: int) -> np.ndarray:
  """Float64 uniforms in [0, 1) of shape [N, width]: column j is draw j of `stream` for each key.

  Args:
    keys_N: uint64 keys, one per row.
    stream: what the draws are for; different streams give independent draws from the same keys.
    width: draws per key.
  """
  salt = mix(mix(np.uint64(stream)) + np.arange(width, dtype=np.uint64))
  bits = mix(keys_N[:, None] ^ salt[None, :])
  return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
