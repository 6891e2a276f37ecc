"""BERT's attention with dropout on the probabilities inside TPU (Pallas Mosaic) kernels.

    attention(q, k, v, q_pairs, k_pairs, rows, k1, rate, interpret)   [B, L, heads * head_dim]

The TPU counterpart of `bertjax.model.triton_attention`: softmax over the keys of the query's own
pair, probabilities dropped at `rate` and scaled by 1 / (1 - rate), times the values, without
the [B, heads, L, L] probabilities (or a mask for them) ever reaching HBM.

Layout. Queries, keys and values stay as the QKV projection makes them, [B, L, heads * head_dim]:
no transpose to heads-major, and no padding (a [.., L, 64] array would fill half of each
128-lane tile row). A kernel instance takes a group of heads that spans 128 lanes (two of
BERT's 64-wide heads) or all of them, and computes each head on the group's full width with the
other heads' lanes zeroed or dropped: a 64-deep contraction takes the MXU's passes of a 128-deep
one, so the zeros cost no matmul time.

BERT's rows are short (512 tokens at most): an instance holds one block of queries and every key
of its row in VMEM, so the softmax is computed whole instead of online, and the backward pass is
one kernel that recomputes the probabilities once and accumulates dK and dV over the query
blocks in VMEM. Inside, the logits are [L, block_q], keys down the sublanes and queries across
the lanes, so that per-query values (log-sum-exp, the mask's chain) are rows, stored [B, heads,
1, L] without lane padding. The dropout mask is `dropout.hash_bits` of each probability's global
coordinates (row, head, query, key): the kernel receives the chain run over (row, head, query)
and finishes it over the keys (an [L, 1] iota) and the key's second word, so the mask is bit for
bit `dropout.keep_mask(key, [B, heads, L, L], rate, "hash")` and the backward draws it again
instead of reading it.

On CPU the kernels run in Pallas's interpreter (tests); on a TPU Mosaic compiles them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bertjax.model.config import mosaic_block_q, mosaic_head_group
from bertjax.model.dropout import close_chain, keep_threshold, mix_coordinate

# Masked logits: far below any real one but finite, so that no inf - inf arises.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# dot_general contracting both operands' last axes (k @ q.T), or both first axes (P.T @ v, whose
# result has the queries first).
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _head_lanes(width: int, head_dim: int, head: int) -> jax.Array:
  """[1, width] True on the lanes of `head` within its group."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (lane >= head * head_dim) & (lane < (head + 1) * head_dim)


def _logits(q_h, k, q_pairs_ref, k_pairs_ref, scale):
  """[L, block_q] float32 logits, keys down and queries across, masked outside each query's pair;
  and the mask (True where a query sees a key)."""
  logits = jax.lax.dot_general(k, q_h, _NT, preferred_element_type=jnp.float32) * scale
  q_pairs, k_pairs = q_pairs_ref[...], k_pairs_ref[...]
  # Key j is seen by query i when both are in the same pair and j is a real token (pair id > 0).
  allowed = (k_pairs == q_pairs) & (k_pairs > 0)
  # A padding query sees no key: its logits are all 0 (a uniform softmax, as the explicit path's),
  # not all _MASKED, whose log-sum-exp would lose log(L) to rounding and break the backward's P.
  return jnp.where(allowed, logits, jnp.where(q_pairs > 0, _MASKED, 0.0)), allowed


def _keep(rows, k1_ref, rate):
  """The [L, block_q] keep mask: the hash chain's last two links, key coordinate and key word."""
  keys = jax.lax.broadcasted_iota(jnp.int32, k1_ref.shape, 0)
  return close_chain(mix_coordinate(rows, keys, 3), k1_ref[...]) >= keep_threshold(rate)


def _forward_kernel(q_ref, k_ref, v_ref, q_pairs_ref, k_pairs_ref, rows_ref, k1_ref, o_ref, lse_ref, **static):
  """One block of queries' output and log-sum-exp, for one row and group of heads."""
  scale, rate, head_dim = static["scale"], static["rate"], static["head_dim"]
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  out = jnp.zeros(o_ref.shape, jnp.float32)
  for head in range(q.shape[1] // head_dim):
    lanes = _head_lanes(q.shape[1], head_dim, head)
    logits, _ = _logits(jnp.where(lanes, q, 0), k, q_pairs_ref, k_pairs_ref, scale)
    col_max = logits.max(axis=0, keepdims=True)
    p = jnp.exp(logits - col_max)
    denominator = p.sum(axis=0, keepdims=True)  # the softmax's: before dropout
    # Normalised before the matmul: a query's factor lies along the lanes here, not down a column.
    p = p * (1.0 / ((1.0 - rate) * denominator))
    if rate > 0.0:
      p = jnp.where(_keep(rows_ref[head], k1_ref, rate), p, 0.0)
    out_h = jax.lax.dot_general(p.astype(v.dtype), v, _TN, preferred_element_type=jnp.float32)
    out = jnp.where(lanes, out_h, out)
    lse_ref[head] = col_max + jnp.log(denominator)
  o_ref[...] = out.astype(o_ref.dtype)


def _head_grads(q, k, v, do, lanes, refs, head, scale, rate):
  """One head's ([L, W] dK and dV terms and [block_q, W] dQ) for a block of queries."""
  q_pairs_ref, k_pairs_ref, rows_ref, k1_ref, lse_ref, delta_ref = refs
  logits, allowed = _logits(jnp.where(lanes, q, 0), k, q_pairs_ref, k_pairs_ref, scale)
  p = jnp.exp(logits - lse_ref[head])
  dp = jax.lax.dot_general(v, jnp.where(lanes, do, 0), _NT, preferred_element_type=jnp.float32)  # w.r.t. dropped P
  if rate > 0.0:
    keep = _keep(rows_ref[head], k1_ref, rate)
    p_dropped = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
  else:
    p_dropped = p
  # delta = rowsum(dO * O) = rowsum(P * dP): softmax's backward. A masked logit is a constant:
  # no gradient (it matters where a query sees no key and its softmax is uniform).
  ds = jnp.where(allowed, p * (dp - delta_ref[head]) * scale, 0.0).astype(q.dtype)
  dv = jnp.dot(p_dropped.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dk = jnp.dot(ds, q, preferred_element_type=jnp.float32)
  dq = jax.lax.dot_general(ds, k, _TN, preferred_element_type=jnp.float32)
  return dk, dv, dq


def _backward_kernel(q_ref, k_ref, v_ref, q_pairs_ref, k_pairs_ref, rows_ref, k1_ref, do_ref, *refs, **static):
  """dQ of one block of queries; dK and dV summed over the row's query blocks (VMEM scratch)."""
  lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, dk_sum, dv_sum = refs
  scale, rate, head_dim = static["scale"], static["rate"], static["head_dim"]
  block = pl.program_id(2)

  @pl.when(block == 0)
  def _():
    dk_sum[...] = jnp.zeros(dk_sum.shape, jnp.float32)
    dv_sum[...] = jnp.zeros(dv_sum.shape, jnp.float32)

  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  per_query = (q_pairs_ref, k_pairs_ref, rows_ref, k1_ref, lse_ref, delta_ref)
  dk_block, dv_block = jnp.zeros(dk_sum.shape, jnp.float32), jnp.zeros(dv_sum.shape, jnp.float32)
  dq = jnp.zeros(dq_ref.shape, jnp.float32)
  for head in range(q.shape[1] // head_dim):
    lanes = _head_lanes(q.shape[1], head_dim, head)
    dk_h, dv_h, dq_h = _head_grads(q, k, v, do, lanes, per_query, head, scale, rate)
    dk_block, dv_block = jnp.where(lanes, dk_h, dk_block), jnp.where(lanes, dv_h, dv_block)
    dq = jnp.where(lanes, dq_h, dq)
  dk_sum[...] += dk_block
  dv_sum[...] += dv_block
  dq_ref[...] = dq.astype(dq_ref.dtype)

  @pl.when(block == pl.num_programs(2) - 1)
  def _():
    dk_ref[...] = dk_sum[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sum[...].astype(dv_ref.dtype)


def _specs(length: int, width: int, heads: int, bq: int) -> dict[str, pl.BlockSpec]:
  """Block specs over the grid (row, group of heads, query block): what a kernel instance sees.

  Per-query vectors lie along the lanes ([B, heads, 1, L]) and per-key ones down the sublanes
  ([B, L, 1]), as the [L, block_q] logits have them; a per-query column would pad each value
  to a 128-lane row in HBM.
  """
  return {
    "queries": pl.BlockSpec((None, bq, width), lambda b, g, i: (b, i, g)),
    "keys": pl.BlockSpec((None, length, width), lambda b, g, i: (b, 0, g)),
    "q_pairs": pl.BlockSpec((None, 1, bq), lambda b, g, i: (b, 0, i)),
    "k_pairs": pl.BlockSpec((None, length, 1), lambda b, g, i: (b, 0, 0)),
    "per_query": pl.BlockSpec((None, heads, 1, bq), lambda b, g, i: (b, g, 0, i)),
    "k1": pl.BlockSpec((length, 1), lambda b, g, i: (0, 0)),
  }


def _layout(q, rows):
  """(grid, block specs, the kernels' static arguments but the rate) of [B, L, N * D] inputs."""
  batch, length, all_heads = q.shape[0], q.shape[1], rows.shape[1]
  head_dim = q.shape[2] // all_heads
  heads = mosaic_head_group(all_heads, head_dim)
  bq = mosaic_block_q(length)
  grid = (batch, all_heads // heads, length // bq)
  static = {"scale": head_dim**-0.5, "head_dim": head_dim}
  return grid, _specs(length, heads * head_dim, heads, bq), static


def _cost(q, rows, passes: int, arrays) -> pl.CostEstimate:
  # XLA's TPU cost models give a custom call no time of its own; this is what they are told:
  # the matmuls' FLOPs (not the zeroed lanes'), one exponential a probability, the HBM bytes.
  batch, length, width = q.shape
  return pl.CostEstimate(
    flops=2 * passes * batch * length * length * width,
    transcendentals=batch * rows.shape[1] * length * length,
    bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays),
  )


def _forward(q, k, v, q_pairs, k_pairs, rows, k1, rate, interpret):
  grid, s, static = _layout(q, rows)
  batch, length = q.shape[:2]
  lse_shape = jax.ShapeDtypeStruct((batch, rows.shape[1], 1, length), jnp.float32)
  return pl.pallas_call(
    functools.partial(_forward_kernel, rate=rate, **static),
    grid=grid,
    in_specs=[s["queries"], s["keys"], s["keys"], s["q_pairs"], s["k_pairs"], s["per_query"], s["k1"]],
    out_specs=[s["queries"], s["per_query"]],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    cost_estimate=_cost(q, rows, 2, (q, k, v, q, lse_shape)),
    interpret=interpret,
    name="bert_attention_dropout_forward_tpu",
  )(q, k, v, q_pairs, k_pairs, rows, k1)


def _backward(q, k, v, q_pairs, k_pairs, rows, k1, out, lse, do, rate, interpret):
  grid, s, static = _layout(q, rows)
  batch, length, width = q.shape
  heads = rows.shape[1]
  per_head = (batch, length, heads, width // heads)
  delta = jnp.einsum(
    "blhd,blhd->bhl", out.astype(jnp.float32).reshape(per_head), do.astype(jnp.float32).reshape(per_head)
  )
  return pl.pallas_call(
    functools.partial(_backward_kernel, rate=rate, **static),
    grid=grid,
    in_specs=[s["queries"], s["keys"], s["keys"], s["q_pairs"], s["k_pairs"], s["per_query"], s["k1"]]
    + [s["queries"], s["per_query"], s["per_query"]],
    out_specs=[s["queries"], s["keys"], s["keys"]],
    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
    scratch_shapes=[pltpu.VMEM(s["keys"].block_shape[1:], jnp.float32)] * 2,
    # The query blocks of a (row, group of heads) add into the same dK and dV: that axis runs in order.
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    cost_estimate=_cost(q, rows, 5, (q, k, v, do, lse, delta, q, k, v)),
    interpret=interpret,
    name="bert_attention_dropout_backward_tpu",
  )(q, k, v, q_pairs, k_pairs, rows, k1, do, lse, delta[:, :, None, :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def attention(q, k, v, q_pairs, k_pairs, rows, k1, rate: float, interpret: bool):
  """[B, L, N * D] attention within pairs, dropout inside; gradients by the fused backward kernel.

  Args:
    q, k, v: [B, L, N * D] queries, keys and values in the compute dtype, heads side by side.
    q_pairs: [B, 1, L] int32 pair id of each query, 0 on padding.
    k_pairs: [B, L, 1] the same ids down the keys.
    rows: [B, N, 1, L] uint32: `dropout.hash_prefix(key, (B, N, L))`, the mask's chain so far
      (its N gives the number of heads).
    k1: [L, 1] uint32: the dropout key's second word, broadcast.
    rate: the dropout rate (0: none; `rows` and `k1` are then unused).
    interpret: run in Pallas's interpreter (CPU).
  """
  return _forward(q, k, v, q_pairs, k_pairs, rows, k1, rate, interpret)[0]


def _attention_forward(q, k, v, q_pairs, k_pairs, rows, k1, rate, interpret):
  out, lse = _forward(q, k, v, q_pairs, k_pairs, rows, k1, rate, interpret)
  return out, (q, k, v, q_pairs, k_pairs, rows, k1, out, lse)


def _attention_backward(rate, interpret, residuals, d_out):
  q, k, v, q_pairs, k_pairs, rows, k1, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_pairs, k_pairs, rows, k1, out, lse, d_out, rate, interpret)
  return dq, dk, dv, None, None, None, None


attention.defvjp(_attention_forward, _attention_backward)
