"""Attention with BERT's dropout on the probabilities inside one kernel (Pallas), GPU or TPU.

    attention(q, k, v, pair_ids, dropout_key, rate, kernel=...)   [B, L, heads, head_dim], like
        the explicit path in `layers.SelfAttention`: softmax over the keys of the query's own
        pair, probabilities dropped at `rate` and scaled by 1 / (1 - rate), times the values

Two kernels, one contract: `triton` (GPUs; `bertjax.model.triton_attention`, a flash-attention
kernel) and `mosaic` (TPUs; `bertjax.model.mosaic_attention`). Neither writes the [B, heads, L,
L] probabilities, or a mask for them, to memory. The dropout mask of both is `dropout.hash_bits`
of the probabilities' global coordinates (batch row, head, query, key): this module runs the
hash chain over (row, head, query) with XLA from global iotas, and the kernel finishes it per key
inside its tile. So the mask is bit for bit `dropout.keep_mask(key, [B, heads, L, L], rate,
"hash")`, the same on any mesh and either kernel, and the backward pass recomputes it instead of
reading it.

On a mesh the kernel runs per shard under `jax.shard_map` (rows over `act_batch`'s axes, heads
over `act_heads`'), so GSPMD never has to partition it. On CPU either kernel runs in Pallas's
interpreter: slow, for tests.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bertjax.model import mosaic_attention, triton_attention
from bertjax.model.config import FUSED_TILE, fused_attention_fits
from bertjax.model.dropout import hash_prefix, key_words
from bertjax.parallel.rules import logical_to_spec

_QKV_AXES = ("act_batch", "act_length", "act_heads", "act_kv")
_PAIR_AXES = ("act_batch", "act_length")
_ROW_AXES = ("act_batch", "act_heads", "act_length")
# (forward, backward) tiles along the sequence of the Triton kernel: 64 x 64 was the fastest of
# the sizes timed on an H200 at both of BERT's shapes (docs/performance.md,
# benchmarks/fused_attention_tiles.py).
_TILES = (FUSED_TILE, FUSED_TILE)


def _mosaic(q, k, v, pairs, rows, k1, rate, interpret):
  # The TPU kernels take heads side by side, [B, L, N * D], and per-query values along the lanes.
  batch, length, heads, head_dim = q.shape
  side_by_side = (batch, length, heads * head_dim)
  ctx = mosaic_attention.attention(
    q.reshape(side_by_side),
    k.reshape(side_by_side),
    v.reshape(side_by_side),
    pairs[:, None, :],
    pairs[:, :, None],
    rows[:, :, None, :],
    k1[:, None],
    rate,
    interpret,
  )
  return ctx.reshape(q.shape)


def attention(
  q_BxLxNxD: jax.Array,
  k_BxLxNxD: jax.Array,
  v_BxLxNxD: jax.Array,
  pair_ids_BxL: jax.Array,
  dropout_key: jax.Array | None,
  rate: float,
  *,
  kernel: str = "triton",
  interpret: bool | None = None,
  tiles: tuple[int, int] = _TILES,
) -> jax.Array:
  """Softmax attention within pairs, with dropout on the probabilities, fused; [B, L, N, D].

  Args:
    q_BxLxNxD, k_BxLxNxD, v_BxLxNxD: queries, keys and values (compute dtype; D a power of two).
    pair_ids_BxL: a token attends to the tokens of its own pair id; 0 marks padding, which no
      query sees (one sequence a row: the attention mask itself).
    dropout_key: the key of `dropout.keep_mask(key, [B, N, L, L], rate, "hash")`, or None.
    rate: the probability of dropping a probability; kept ones are scaled by 1 / (1 - rate).
    kernel: `triton` (GPUs) or `mosaic` (TPUs); both run interpreted on CPU.
    interpret: run the kernels in Pallas's interpreter; default: where the program is compiled for
      CPU.
    tiles: the Triton kernel's (forward, backward) tile sizes along the sequence, powers of two;
      the defaults are the ones docs/performance.md measured.
  """
  batch, length, heads, head_dim = q_BxLxNxD.shape
  if (why := fused_attention_fits(length, head_dim, kernel)) is not None:
    raise ValueError(f"the fused attention kernel cannot run: {why}")
  if kernel == "triton" and any(length % min(tile, length) for tile in tiles):
    raise ValueError(f"the fused attention kernel's tiles {tiles} do not divide sequence length {length}")
  if dropout_key is None:
    rate = 0.0
  if rate > 0.0:
    rows = hash_prefix(dropout_key, (batch, heads, length))
    k1 = jnp.broadcast_to(key_words(dropout_key)[1], (length,))
  else:
    rows = jnp.zeros((batch, heads, length), jnp.uint32)
    k1 = jnp.zeros((length,), jnp.uint32)

  def kernels(interpreted: bool):
    def call(q, k, v, pairs, rows, k1):
      if kernel == "mosaic":
        return _mosaic(q, k, v, pairs, rows, k1, float(rate), interpreted)
      return triton_attention.attention(q, k, v, pairs, rows, k1, float(rate), interpreted, tuple(tiles))

    return call

  def run(*args):
    if interpret is not None:
      return kernels(interpret)(*args)
    # Decided when the program is lowered, by the platform it is compiled for: a TPU program
    # compiled ahead of time on a CPU machine gets the compiled kernel.
    return jax.lax.platform_dependent(*args, cpu=kernels(True), default=kernels(False))

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    names = mesh.axis_names
    qkv = logical_to_spec(_QKV_AXES, mesh_axis_names=names)
    run = jax.shard_map(
      run,
      in_specs=(
        qkv,
        qkv,
        qkv,
        logical_to_spec(_PAIR_AXES, mesh_axis_names=names),
        logical_to_spec(_ROW_AXES, mesh_axis_names=names),
        PartitionSpec(),
      ),
      out_specs=qkv,
      check_vma=False,
    )
  return run(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, pair_ids_BxL.astype(jnp.int32), rows, k1)
