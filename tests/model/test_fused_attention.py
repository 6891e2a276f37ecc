"""The fused attention kernels (`attention_impl=pallas`), Triton's (GPUs) and Mosaic's (TPUs): the
explicit path's values, gradients and dropout mask, bit for bit, with padding, fully padded rows
and packed rows, under rematerialisation and on any mesh. On CPU both run in Pallas's
interpreter; with JAX_PLATFORMS=cuda the Triton tests compile the kernel for the GPU (looser
tolerances: TF32 matmuls), and with a TPU the Mosaic ones compile for it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bertjax.model import dropout, fused_attention, layers
from bertjax.model.bert import attention_mask_for
from tests.support.micro import micro_bert, synthetic_batch

B, L, H, D = 2, 32, 2, 16
# Row 0: one pair and padding; row 1: two packed pairs and padding.
PAIRS = np.array([[1] * 20 + [0] * 12, [1] * 10 + [2] * 14 + [0] * 8], np.int32)
TOLERANCE = 1e-5 if jax.default_backend() == "cpu" else 2e-2
# The kernels this machine can run: each compiled on its own platform, both interpreted on CPU.
KERNELS = {"cpu": ["triton", "mosaic"], "gpu": ["triton"], "tpu": ["mosaic"]}[jax.default_backend()]


def _explicit(q, k, v, pairs, key, rate):
  # layers.SelfAttention's explicit path with the hash mask, in float32.
  return layers.attention_with_dropout(q, k, v, attention_mask_for(None, pairs), key, rate, "hash")


def _qkv(seed=0):
  return tuple(jax.random.normal(k, (B, L, H, D), jnp.float32) for k in jax.random.split(jax.random.key(seed), 3))


def _loss(attend):
  # Only real query positions count (a padding query's output is never used), weighted per feature.
  weights = jnp.asarray(PAIRS > 0)[:, :, None, None] * jnp.cos(jnp.arange(D))
  return lambda q, k, v: (attend(q, k, v) * weights).sum()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_values_and_gradients_are_the_explicit_paths(rate, kernel):
  q, k, v = _qkv()
  key = jax.random.key(7)
  fused = jax.jit(lambda q, k, v: fused_attention.attention(q, k, v, PAIRS, key, rate, kernel=kernel))
  real = PAIRS > 0
  np.testing.assert_allclose(
    np.asarray(fused(q, k, v))[real], np.asarray(_explicit(q, k, v, PAIRS, key, rate))[real], atol=TOLERANCE
  )
  grads = jax.jit(jax.grad(_loss(fused), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(_loss(lambda q, k, v: _explicit(q, k, v, PAIRS, key, rate)), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=TOLERANCE * 5, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_dropout_mask_is_the_hash_mask_bit_for_bit(kernel):
  # Zero queries and keys give a uniform softmax (1/L) over one pair filling the row, and values
  # one-hot per key (D = L) copy each dropped probability into its own output feature.
  length = D
  q = k = jnp.zeros((B, length, H, D), jnp.float32)
  v = jnp.broadcast_to(jnp.eye(length, D)[None, :, None, :], (B, length, H, D))
  pairs = np.ones((B, length), np.int32)
  key, rate = jax.random.key(3), 0.5
  out_BxHxLxL = np.asarray(fused_attention.attention(q, k, v, pairs, key, rate, kernel=kernel)).transpose(0, 2, 1, 3)
  keep = np.asarray(dropout.keep_mask(key, (B, H, length, length), rate, "hash"))
  assert 0.3 < keep.mean() < 0.7
  np.testing.assert_array_equal(out_BxHxLxL != 0, keep)
  np.testing.assert_allclose(out_BxHxLxL[keep], 1 / ((1 - rate) * length), rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_without_a_key_there_is_no_dropout(kernel):
  q, k, v = _qkv(1)
  got = fused_attention.attention(q, k, v, PAIRS, None, 0.1, kernel=kernel)
  np.testing.assert_allclose(
    np.asarray(got)[PAIRS > 0], np.asarray(_explicit(q, k, v, PAIRS, None, 0.1))[PAIRS > 0], atol=TOLERANCE
  )


def test_sizes_the_tiles_cannot_cover_are_refused():
  q = jnp.zeros((1, 24, 1, 16))
  with pytest.raises(ValueError, match="sequence length 24"):
    fused_attention.attention(q, q, q, np.ones((1, 24), np.int32), None, 0.0)
  q = jnp.zeros((1, 20, 1, 16))
  with pytest.raises(ValueError, match="sequence length 20 is not a multiple of 8"):
    fused_attention.attention(q, q, q, np.ones((1, 20), np.int32), None, 0.0, kernel="mosaic")


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_padded_rows_and_padding_queries_get_the_explicit_paths_uniform_softmax(kernel):
  # A row of padding only (as a packed batch's last rows can be) and the padding queries of a
  # real row see no key: both paths give them the mean of the values, not NaN.
  pairs = PAIRS.copy()
  pairs[1] = 0
  q, k, v = _qkv(4)
  key = jax.random.key(9)
  got = np.asarray(fused_attention.attention(q, k, v, pairs, key, 0.1, kernel=kernel))
  want = np.asarray(_explicit(q, k, v, pairs, key, 0.1))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=TOLERANCE)
  grads = jax.grad(lambda q: fused_attention.attention(q, k, v, pairs, key, 0.1, kernel=kernel).sum())(q)
  assert np.isfinite(np.asarray(grads)).all() and not np.asarray(grads)[1].any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_under_rematerialisation_the_gradients_are_the_same(kernel):
  # jax.checkpoint (model.remat) runs the forward kernel again in the backward pass.
  q, k, v = _qkv(5)
  key = jax.random.key(11)
  attend = lambda q, k, v: fused_attention.attention(q, k, v, PAIRS, key, 0.1, kernel=kernel)
  plain = jax.grad(_loss(attend), argnums=(0, 1, 2))(q, k, v)
  remat = jax.grad(_loss(jax.checkpoint(attend)), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", remat, plain):
    np.testing.assert_array_equal(got, want, err_msg=f"d{name}")


def test_the_mosaic_kernel_takes_several_query_blocks_and_groups_of_heads():
  # At 512 tokens a kernel instance takes 256 queries: two blocks add into dK and dV. Four heads
  # of 64 make two groups of 128 lanes, each computed head by head with the other's lanes zeroed.
  length, heads, head_dim = 512, 4, 64
  pairs = np.zeros((1, length), np.int32)
  pairs[0, :300], pairs[0, 300:480] = 1, 2
  shape = (1, length, heads, head_dim)
  q, k, v = (jax.random.normal(x, shape) for x in jax.random.split(jax.random.key(6), 3))
  key = jax.random.key(12)
  attend = lambda q, k, v: fused_attention.attention(q, k, v, pairs, key, 0.1, kernel="mosaic")
  explicit = lambda q, k, v: _explicit(q, k, v, pairs, key, 0.1)
  np.testing.assert_allclose(attend(q, k, v), explicit(q, k, v), atol=TOLERANCE)
  weights = jnp.cos(jnp.arange(heads * head_dim)).reshape(heads, head_dim)
  grads = jax.grad(lambda *x: (attend(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *x: (explicit(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=TOLERANCE * 5, err_msg=f"d{name}")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite's fake ones)")
@pytest.mark.parametrize("kernel", KERNELS)
def test_on_a_mesh_each_shard_gets_the_global_mask(kernel):
  q, k, v = _qkv(2)
  key = jax.random.key(5)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)  # as runs use
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  unsharded = fused_attention.attention(q, k, v, PAIRS, key, 0.1, kernel=kernel)
  # Batch 2 over data x fsdp = 4 shards does not divide: repeat the rows to 4.
  q4, k4, v4 = (jnp.concatenate([x, x]) for x in (q, k, v))
  pairs4 = np.concatenate([PAIRS, PAIRS])
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda q, k, v: fused_attention.attention(q, k, v, pairs4, key, 0.1, kernel=kernel))(
      *(jax.device_put(x, spec) for x in (q4, k4, v4))
    )
  whole = fused_attention.attention(q4, k4, v4, pairs4, key, 0.1, kernel=kernel)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))
  np.testing.assert_array_equal(np.asarray(whole)[:B], np.asarray(unsharded))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite's fake ones)")
@pytest.mark.parametrize("kernel", KERNELS)
def test_a_train_step_with_the_kernel_is_the_explicit_hash_step(kernel):
  from tests.train.test_steps import _one_step

  batch = synthetic_batch(batch_size=16)
  _, explicit = _one_step((1, 1, 1), batch, cfg=micro_bert(dropout_impl="hash"))
  fused_cfg = micro_bert(dropout_impl="hash", attention_impl="pallas", fused_kernel=kernel)
  _, fused = _one_step((2, 2, 2), batch, cfg=fused_cfg)
  np.testing.assert_allclose(fused["loss"], explicit["loss"], rtol=1e-6)
  np.testing.assert_allclose(fused["grad_norm"], explicit["grad_norm"], rtol=1e-5)
