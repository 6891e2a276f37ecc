"""BERT's attention with dropout on the probabilities inside GPU (Pallas Triton) kernels.

    attention(q, k, v, pairs, rows, k1, rate, interpret, tiles)   [B, L, heads, head_dim]

A flash-attention kernel (FlashAttention-2's forward and the fused dK/dV + dQ backward of
Triton's tutorial, after jax.experimental.pallas.ops.gpu.attention) that never writes the
[B, heads, L, L] probabilities, or a mask for them, to memory. The dropout mask is
`dropout.hash_bits` of the probabilities' global coordinates (batch row, head, query, key):
the kernel receives the hash chain already run over (row, head, query) for its tiles, [B, heads,
L] words, and finishes it per key inside the tile, so the backward pass recomputes the mask
instead of reading it. On CPU it runs in Pallas's interpreter (tests); the GPU compiles it with
Triton.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bertjax.model.dropout import close_chain, keep_threshold, mix_coordinate

# Masked logits: far below any real one but finite, so that no inf - inf arises.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2_E = math.log2(math.e)


def _masked(logits, q_pairs, k_pairs):
  """The logits outside each query's pair masked, and the mask (True where a query sees a key)."""
  # Query i sees key j when both are in the same pair and j is a real token (pair id > 0).
  allowed = (q_pairs[:, None] == k_pairs[None, :]) & (k_pairs[None, :] > 0)
  # A padding query sees no key: its logits are all 0 (a uniform softmax, as the explicit path's),
  # not all _MASKED, whose log-sum-exp would lose log(L) to rounding and break the backward's P.
  return jnp.where(allowed, logits, jnp.where(q_pairs[:, None] > 0, _MASKED, 0.0)), allowed


def _keep(rows, k_start, k1_words, block_k, rate):
  # The hash chain's last two links for a [block_q, block_k] tile: key coordinate, key word.
  cols = (k_start + jnp.arange(block_k)).astype(jnp.uint32)
  return close_chain(mix_coordinate(rows[:, None], cols[None, :], 3), k1_words[None, :]) >= keep_threshold(rate)


def _forward_kernel(q_ref, k_ref, v_ref, pairs_ref, rows_ref, k1_ref, o_ref, lse_ref, *, scale, rate, block_k):
  """One [block_q, D] tile of the output and its log-sum-exp (base 2), for one row and head."""
  block_q = q_ref.shape[0]
  length = k_ref.shape[0]
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  q_pairs = pairs_ref[pl.ds(q_start, block_q)]
  rows = rows_ref[...]

  def body(i, carry):
    o, m, denominator = carry
    k_slice = pl.ds(i * block_k, block_k)
    logits = plgpu.dot(q, k_ref[k_slice, :].T) * (scale * _LOG2_E)
    logits, _ = _masked(logits, q_pairs, pairs_ref[k_slice])
    m_next = jnp.maximum(m, logits.max(axis=-1))
    correction = jnp.exp2(m - m_next)
    p = jnp.exp2(logits - m_next[:, None])
    denominator = correction * denominator + p.sum(axis=-1)  # the softmax's: before dropout
    if rate > 0.0:
      p = jnp.where(_keep(rows, i * block_k, k1_ref[k_slice], block_k, rate), p, 0.0)
    v = v_ref[k_slice, :]
    return correction[:, None] * o + plgpu.dot(p.astype(v.dtype), v), m_next, denominator

  init = (
    jnp.zeros(q.shape, jnp.float32),
    jnp.full((block_q,), -jnp.inf, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  o, m, denominator = jax.lax.fori_loop(0, length // block_k, body, init)
  o_ref[...] = (o * (1.0 / ((1.0 - rate) * denominator))[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(denominator)


def _backward_kernel(
  q_ref, k_ref, v_ref, pairs_ref, rows_ref, k1_ref, do_ref, lse_ref, delta_ref, *outs, scale, rate, block
):
  """dK and dV of one key tile (looping over queries), then dQ of one query tile (over keys)."""
  dq_ref, dk_ref, dv_ref = outs
  length = q_ref.shape[0]
  start = pl.program_id(2) * block
  tile = pl.ds(start, block)
  inverse_keep = 1.0 / (1.0 - rate)

  def tile_grads(q_slice, k_slice, q, k, v, do, k_start):
    # p: the softmax; dp: the loss's gradient with respect to it (through dropout), less delta.
    logits = plgpu.dot(q, k.T) * (scale * _LOG2_E)
    logits, allowed = _masked(logits, pairs_ref[q_slice], pairs_ref[k_slice])
    p = jnp.exp2(logits - lse_ref[q_slice][:, None])
    dp_dropped = plgpu.dot(do, v.T)
    if rate > 0.0:
      keep = _keep(rows_ref[q_slice], k_start, k1_ref[k_slice], block, rate)
      p_dropped = jnp.where(keep, p * inverse_keep, 0.0)
      dp = jnp.where(keep, dp_dropped * inverse_keep, 0.0)
    else:
      p_dropped, dp = p, dp_dropped
    # A masked logit is a constant: no gradient (where a query sees no key, its softmax is uniform).
    ds = jnp.where(allowed, p * (dp - delta_ref[q_slice][:, None]) * scale, 0.0)
    return p_dropped, ds

  k, v = k_ref[tile, :], v_ref[tile, :]

  def dkdv_body(i, carry):
    dk, dv = carry
    q_slice = pl.ds(i * block, block)
    q, do = q_ref[q_slice, :], do_ref[q_slice, :]
    p_dropped, ds = tile_grads(q_slice, tile, q, k, v, do, start)
    dv = dv + plgpu.dot(p_dropped.astype(do.dtype).T, do)
    dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, length // block, dkdv_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  q, do = q_ref[tile, :], do_ref[tile, :]

  def dq_body(i, dq):
    k_slice = pl.ds(i * block, block)
    k_i = k_ref[k_slice, :]
    _, ds = tile_grads(tile, k_slice, q, k_i, v_ref[k_slice, :], do, i * block)
    return dq + plgpu.dot(ds.astype(k_i.dtype), k_i)

  dq = jax.lax.fori_loop(0, length // block, dq_body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _forward(q, k, v, pairs, rows, k1, rate, interpret, tiles):
  batch, length, heads, head_dim = q.shape
  block_q = block_k = min(tiles[0], length)
  kernel = functools.partial(_forward_kernel, scale=head_dim**-0.5, rate=rate, block_k=block_k)
  whole = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  out, lse = pl.pallas_call(
    kernel,
    grid=(length // block_q, batch, heads),
    in_specs=[
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      whole,
      whole,
      pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
      pl.BlockSpec((length,), lambda i, b, h: (0,)),
    ],
    out_specs=[
      pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
    ],
    out_shape=[q, jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
    compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
    interpret=interpret,
    name="bert_attention_dropout_forward",
  )(q, k, v, pairs, rows, k1)
  return out, lse


def _backward(q, k, v, pairs, rows, k1, out, lse, do, rate, interpret, tiles):
  batch, length, heads, head_dim = q.shape
  block = min(tiles[1], length)
  # delta = rowsum(dO * O) is rowsum(dP * P) of the dropped probabilities, which softmax's
  # backward needs; one XLA fusion.
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))
  kernel = functools.partial(_backward_kernel, scale=head_dim**-0.5, rate=rate, block=block)
  whole = pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h, 0))
  per_row = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
  tile = pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, length // block),
    in_specs=[
      whole,
      whole,
      whole,
      pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
      per_row,
      pl.BlockSpec((length,), lambda b, h, i: (0,)),
      whole,
      per_row,
      per_row,
    ],
    out_specs=[tile, tile, tile],
    out_shape=[q, k, v],
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="bert_attention_dropout_backward",
  )(q, k, v, pairs, rows, k1, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def attention(q, k, v, pairs, rows, k1, rate, interpret, tiles):
  """[B, L, N, D] attention within pairs, dropout inside; gradients by the fused backward kernel.

  Args:
    q, k, v: [B, L, N, D] queries, keys and values in the compute dtype.
    pairs: [B, L] int32 pair id of each token, 0 on padding.
    rows: [B, N, L] uint32: `dropout.hash_prefix(key, (B, N, L))`, the mask's chain so far.
    k1: [L] uint32: the dropout key's second word, broadcast.
    rate: the dropout rate (0: none; `rows` and `k1` are then unused).
    interpret: run in Pallas's interpreter (CPU).
    tiles: (forward, backward) tile sizes along the sequence.
  """
  return _forward(q, k, v, pairs, rows, k1, rate, interpret, tiles)[0]


def _attention_fwd(q, k, v, pairs, rows, k1, rate, interpret, tiles):
  out, lse = _forward(q, k, v, pairs, rows, k1, rate, interpret, tiles)
  return out, (q, k, v, pairs, rows, k1, out, lse)


def _attention_bwd(rate, interpret, tiles, residuals, do):
  q, k, v, pairs, rows, k1, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, pairs, rows, k1, out, lse, do, rate, interpret, tiles)
  return dq, dk, dv, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
