"""Dropout masks: threefry's as before, and the counter-based hash's rate, independence and mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bertjax.model import dropout

SHAPE = (256, 1024)


def test_threefry_is_jax_bernoulli_exactly():
  key, x = jax.random.key(3), jnp.linspace(-1, 1, 4096).reshape(64, 64)
  keep = jax.random.bernoulli(key, 0.9, x.shape)
  np.testing.assert_array_equal(dropout.dropout(x, 0.1, key), jnp.where(keep, x / 0.9, 0))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_the_hash_keeps_each_element_with_probability_one_minus_rate(rate):
  keep = np.asarray(dropout.keep_mask(jax.random.key(0), SHAPE, rate, "hash"))
  assert abs(keep.mean() - (1 - rate)) < 3e-3  # 262,144 draws: the standard error is under 1e-3
  for axis in (0, 1):  # neighbours along either axis are independent draws
    both = np.logical_and(keep, np.roll(keep, 1, axis=axis)).mean()
    assert abs(both - (1 - rate) ** 2) < 5e-3, (axis, both)
  rows, columns = keep.mean(axis=1), keep.mean(axis=0)
  assert rows.std() < 0.05 and columns.std() < 0.05  # no row or column is special


def test_the_hash_is_a_function_of_the_key_and_the_position():
  a = np.asarray(dropout.keep_mask(jax.random.key(0), SHAPE, 0.1, "hash"))
  np.testing.assert_array_equal(a, dropout.keep_mask(jax.random.key(0), SHAPE, 0.1, "hash"))
  b = np.asarray(dropout.keep_mask(jax.random.key(1), SHAPE, 0.1, "hash"))
  c = np.asarray(dropout.keep_mask(jax.random.fold_in(jax.random.key(0), 1), SHAPE, 0.1, "hash"))
  for other in (b, c):  # independent masks agree where both keep or both drop: 0.9^2 + 0.1^2
    assert abs((a == other).mean() - 0.82) < 5e-3
  # A shape is a view of the coordinates: the first rows of a taller mask are the same mask.
  np.testing.assert_array_equal(a[:128], dropout.keep_mask(jax.random.key(0), (128, 1024), 0.1, "hash"))


def test_the_hash_mask_is_the_same_on_any_mesh():
  key = jax.random.key(7)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  sharded = jax.jit(lambda k: dropout.keep_mask(k, SHAPE, 0.1, "hash"), out_shardings=NamedSharding(mesh, P("a", "b")))
  np.testing.assert_array_equal(sharded(key), dropout.keep_mask(key, SHAPE, 0.1, "hash"))


def test_dropout_scales_what_it_keeps_and_is_identity_without_a_key():
  x = jnp.ones(SHAPE)
  y = np.asarray(dropout.dropout(x, 0.25, jax.random.key(0), "hash"))
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(y.mean() - 1.0) < 5e-3  # inverted dropout keeps the expectation
  assert dropout.dropout(x, 0.25, None, "hash") is x and dropout.dropout(x, 0.0, jax.random.key(0), "hash") is x
