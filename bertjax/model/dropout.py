"""Dropout, with its mask drawn by JAX's threefry or by a counter-based hash where it is used.

    dropout(x, rate, key, impl)   x with each element zeroed with probability `rate`, the rest
                                  scaled by 1 / (1 - rate); `key=None` or `rate=0` is identity
    keep_mask(key, shape, rate, impl)  the boolean mask alone

Both masks are functions of (key, the element's global coordinates) only, so they are the same on
any mesh and after any restart (the train step derives `key` from the run's key and the step).

`threefry` draws the bits with `jax.random.bernoulli` (threefry2x32, partitionable). XLA computes
them in a fusion of their own and writes them to memory, which the fusion that applies the mask
reads back: for attention probabilities, [batch, heads, L, L] values each way.

`hash` computes the mask from the element's coordinates (iotas) and the key's two 32-bit words
with integer multiplies and shifts (murmur3's finaliser): elementwise integer work that XLA fuses
into the consumer, so no mask travels through memory. Its bits are not threefry's, so the two give
different (equally distributed) masks; the choice is `model.dropout_impl`. Under GSPMD an iota is
partitioned by offsetting each shard, so the coordinates are global and the mask mesh-independent.
"""

import jax
import jax.numpy as jnp

# Odd multipliers: murmur3's finaliser constants and the 32-bit golden ratio (per-axis salt).
_M1, _M2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finaliser: every input bit affects every output bit (uint32, wrapping)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A PRNG key's first two 32-bit words, which open and close every hash chain."""
  k0, k1 = jax.random.key_data(key).reshape(-1)[:2].astype(jnp.uint32)
  return k0, k1


def mix_coordinate(h: jax.Array, coordinate: jax.Array, axis: int) -> jax.Array:
  """One link of the chain: xor in the element's coordinate on `axis` (salted per axis), mix."""
  return _fmix32(h ^ (coordinate.astype(jnp.uint32) + jnp.uint32((_GOLDEN * (axis + 1)) & 0xFFFFFFFF)))


def close_chain(h: jax.Array, k1: jax.Array) -> jax.Array:
  """The chain's last link: xor in the key's second word, mix."""
  return _fmix32(h ^ k1)


def hash_prefix(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The chain over the leading axes of a larger array, open (not closed with the key's word).

  `close_chain(mix_coordinate(prefix[..., None], j, len(shape)), k1)` is `hash_bits` of the
  array with one more trailing axis at coordinate j: a fused kernel finishes the chain per tile.
  """
  h = jnp.broadcast_to(key_words(key)[0], shape)
  for axis in range(len(shape)):
    h = mix_coordinate(h, jax.lax.broadcasted_iota(jnp.uint32, shape, axis), axis)
  return h


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits of `shape`, a hash of (key, each element's coordinates).

  Axis by axis the coordinate is xor-ed in and mixed, so no linear index (which could overflow 32
  bits) is formed; the key's two words open and close the chain.
  """
  return close_chain(hash_prefix(key, shape), key_words(key)[1])


def keep_threshold(rate: float) -> jax.Array:
  """The uint32 t with P(bits >= t) = 1 - t / 2^32 = 1 - rate, to within 2^-32."""
  return jnp.uint32(min(int(rate * 2**32), 2**32 - 1))


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float, impl: str = "threefry") -> jax.Array:
  """bool mask of `shape`, True with probability 1 - `rate`.

  Args:
    key: a PRNG key; the mask is a function of it and the element coordinates only.
    shape: the mask's shape.
    rate: the probability of False (dropped).
    impl: `threefry` (jax.random.bernoulli) or `hash` (`hash_bits`); the two give different masks.
  """
  if impl == "threefry":
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  return hash_bits(key, shape) >= keep_threshold(rate)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, impl: str = "threefry") -> jax.Array:
  """Inverted dropout of `x` at `rate`; identity without a key or at rate 0 (evaluation).

  Args:
    x: any array; the result has its shape and dtype.
    rate: the probability of zeroing an element; kept elements are scaled by 1 / (1 - rate).
    key: a PRNG key, or None for no dropout.
    impl: `keep_mask`'s `impl`.
  """
  if key is None or rate == 0.0:
    return x
  keep = keep_mask(key, x.shape, rate, impl)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
