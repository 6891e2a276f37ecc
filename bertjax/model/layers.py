"""BERT's building blocks in Flax NNX: embeddings, attention, feed-forward, encoder, heads.

Every parameter carries its logical axis names (`bertjax.parallel.rules.RULES` places them on the
mesh) and every block computes in the config's dtype with float32 parameters; LayerNorm
statistics, softmax and logits are float32. The layouts are docs/architecture.md's.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bertjax.model import fused_attention
from bertjax.model.config import BertConfig
from bertjax.model.dropout import dropout
from bertjax.parallel.rules import constrain

# The most negative float32: masked logits vanish under softmax without producing inf - inf.
_NEG = float(jnp.finfo(jnp.float32).min)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  # No eager sharding: placement comes from a jitted init with out-shardings derived from
  # these names (bertjax.parallel.rules), so the model also builds where no mesh is set.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _split(key: jax.Array | None, n: int) -> tuple[jax.Array | None, ...]:
  return (None,) * n if key is None else tuple(jax.random.split(key, n))


class LayerNorm(nnx.Module):
  """LayerNorm with float32 statistics whatever the compute dtype."""

  def __init__(self, size: int, cfg: BertConfig, axis_name: str = "embed"):
    self.scale = param(jnp.ones((size,), jnp.float32), (axis_name,))
    self.bias = param(jnp.zeros((size,), jnp.float32), (axis_name,))
    self.eps = cfg.layer_norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class Embeddings(nnx.Module):
  """Word + learned position + token-type (segment) embeddings, LayerNorm, dropout."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    h = cfg.hidden_size
    self.word = param(init(rngs.params(), (cfg.padded_vocab_size, h)), ("vocab", "embed"))
    self.position = param(init(rngs.params(), (cfg.max_position_embeddings, h)), ("position", "embed"))
    self.segment = param(init(rngs.params(), (cfg.type_vocab_size, h)), ("segment", "embed"))
    self.norm = LayerNorm(h, cfg)
    self.rate = cfg.dropout
    self.dropout_impl = cfg.dropout_impl

  def __call__(self, ids_BxL, segment_ids_BxL, position_ids_BxL, dropout_key=None):
    x = (
      jnp.take(self.word[...], ids_BxL, axis=0)
      + jnp.take(self.position[...], position_ids_BxL, axis=0)
      + jnp.take(self.segment[...], segment_ids_BxL, axis=0)
    )
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    return dropout(self.norm(x), self.rate, dropout_key, self.dropout_impl)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with a fused QKV projection."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    h, n, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    self.qkv_kernel = param(init(rngs.params(), (h, 3, n, d)), ("embed", "qkv", "heads", "kv"))
    self.qkv_bias = param(jnp.zeros((3, n, d), jnp.float32), ("qkv", "heads", "kv"))
    self.out_kernel = param(init(rngs.params(), (n, d, h)), ("heads", "kv", "embed"))
    self.out_bias = param(jnp.zeros((h,), jnp.float32), ("embed",))
    self.dtype = cfg.compute_dtype
    self.rate = cfg.attention_dropout
    self.dropout_impl = cfg.dropout_impl
    self.impl = cfg.attention_impl
    self.fused_kernel = cfg.fused_kernel

  def __call__(self, x_BxLxE, mask_Bx1xLxL, kv_lengths_B, dropout_key=None, *, pair_ids_BxL=None):
    """[B, L, E] attention output in the compute dtype.

    Args:
      x_BxLxE: the block's input.
      mask_Bx1xLxL: True where a query token may attend to a key token.
      kv_lengths_B: real tokens per row (right padding), which the cuDNN path takes instead of the
        mask; None for packed rows, where only the mask describes padding.
      dropout_key: a PRNG key for attention-probability dropout, or None for none.
      pair_ids_BxL: the pair id of each token, 0 on padding (the mask's source), which the fused
        kernels (`attention_impl=pallas`) take instead of the mask.
    """
    dt = self.dtype
    qkv = jnp.einsum("ble,ekhd->blkhd", x_BxLxE, self.qkv_kernel[...].astype(dt)) + self.qkv_bias[...].astype(dt)
    qkv = checkpoint_name(qkv, "qkv")
    axes = ("act_batch", "act_length", "act_heads", "act_kv")
    q, k, v = (constrain(qkv[:, :, i], axes) for i in range(3))
    # Every path applies `mask_Bx1xLxL` (a token sees the real tokens of its own pair) or, with one
    # pair a row, the equivalent key lengths: a token never attends across packed pairs.
    if self.impl == "pallas":
      # Dropout inside the kernel; its mask is the `hash` one whatever `dropout_impl` says.
      if pair_ids_BxL is None:
        raise ValueError("attention_impl=pallas needs pair_ids_BxL")
      ctx = fused_attention.attention(q, k, v, pair_ids_BxL, dropout_key, self.rate, kernel=self.fused_kernel)
    elif dropout_key is not None and self.rate > 0.0:
      ctx = attention_with_dropout(q, k, v, mask_Bx1xLxL, dropout_key, self.rate, self.dropout_impl)
    elif self.impl == "cudnn" and kv_lengths_B is not None:
      # One pair a row: padding is a length per row, which cuDNN's flash kernel takes without a
      # dense mask.
      ctx = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths_B, implementation="cudnn")
    else:
      # XLA; or cuDNN on packed rows (kv_lengths_B is None). jax.nn.dot_product_attention passes
      # cuDNN no segment ids or per-pair lengths, only this block-diagonal mask, which it adds to
      # the logits as a [B, 1, L, L] bias.
      ctx = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL, implementation=self.impl)
    ctx = checkpoint_name(constrain(ctx, axes), "context")
    out = jnp.einsum("blhd,hde->ble", ctx, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)
    return checkpoint_name(constrain(out, ("act_batch", "act_length", "act_embed")), "attention_out")


def written_out_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xLxL, key, rate: float, impl: str):
  """([B, L, N, D] context, what the hand-written backward keeps): softmax attention with dropout.

  jax.nn.dot_product_attention has no dropout on the probabilities; BERT has. Same math as its
  XLA path: float32 logits and softmax, probabilities in the compute dtype for the second matmul.
  Differentiated by autodiff, the backward pass keeps the float32 probabilities and draws the
  dropout mask again; `attention_with_dropout` is the same forward with a leaner backward.
  """
  logits_BxNxLxL = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxNxD, k_BxLxNxD, preferred_element_type=jnp.float32)
  logits_BxNxLxL = jnp.where(mask_Bx1xLxL, logits_BxNxLxL * (q_BxLxNxD.shape[-1] ** -0.5), _NEG)
  probs_BxNxLxL = jax.nn.softmax(logits_BxNxLxL, axis=-1)
  dropped_BxNxLxL = dropout(probs_BxNxLxL, rate, key, impl).astype(v_BxLxNxD.dtype)
  ctx_BxLxNxD = jnp.einsum("bhqk,bkhd->bqhd", dropped_BxNxLxL, v_BxLxNxD)
  kept = (q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xLxL, probs_BxNxLxL.astype(v_BxLxNxD.dtype), dropped_BxNxLxL)
  return ctx_BxLxNxD, kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention_with_dropout(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xLxL, key, rate: float, impl: str):
  """`written_out_attention`'s context; its backward draws no mask and keeps no float32 [B, N, L, L].

  With keep the mask and r the rate, the dropped probabilities are P' = P * keep / (1 - r), and
  the softmax backward needs P * dP = P * keep / (1 - r) * dP' = P' * dP': the mask is already
  in P'. The backward therefore keeps P and P' in the compute dtype (the forward's float32 P
  becomes one more [B, N, L, L] in bf16) and writes the logits' gradient once, where autodiff
  rereads the float32 P and redraws the mask in each of the two matmuls' fusions that consume
  it. In float32 the two backwards agree to rounding; in bf16 the softmax backward reads P in
  bf16, as a bf16 PyTorch BERT's does.
  """
  return written_out_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_Bx1xLxL, key, rate, impl)[0]


def _attention_with_dropout_backward(rate, impl, kept, d_ctx_BxLxNxD):
  del rate, impl  # in the dropped probabilities already
  q, k, v, mask, probs, dropped = kept
  d_dropped = jnp.einsum("bqhd,bkhd->bhqk", d_ctx_BxLxNxD, v, preferred_element_type=jnp.float32)
  d_v = jnp.einsum("bhqk,bqhd->bkhd", dropped, d_ctx_BxLxNxD)
  weighted = dropped.astype(jnp.float32) * d_dropped  # = P * dP
  d_logits = weighted - probs.astype(jnp.float32) * weighted.sum(axis=-1, keepdims=True)
  d_scores = jnp.where(mask, d_logits * (q.shape[-1] ** -0.5), 0.0).astype(q.dtype)
  # Written once: left to itself, XLA fuses this elementwise chain into both matmuls below, and
  # each rereads its [B, N, L, L] inputs.
  d_scores = jax.lax.optimization_barrier(d_scores)
  d_q = jnp.einsum("bhqk,bkhd->bqhd", d_scores, k)
  d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q)
  return d_q, d_k, d_v, None, None


attention_with_dropout.defvjp(
  lambda q, k, v, mask, key, rate, impl: written_out_attention(q, k, v, mask, key, rate, impl),
  _attention_with_dropout_backward,
)


class FeedForward(nnx.Module):
  """Dense -> exact (erf) GELU -> dense."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    h, m = cfg.hidden_size, cfg.intermediate_size
    self.in_kernel = param(init(rngs.params(), (h, m)), ("embed", "mlp"))
    self.in_bias = param(jnp.zeros((m,), jnp.float32), ("mlp",))
    self.out_kernel = param(init(rngs.params(), (m, h)), ("mlp", "embed"))
    self.out_bias = param(jnp.zeros((h,), jnp.float32), ("embed",))
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BxLxE):
    dt = self.dtype
    h = jnp.einsum("ble,em->blm", x_BxLxE, self.in_kernel[...].astype(dt)) + self.in_bias[...].astype(dt)
    h = checkpoint_name(h, "mlp_wide")
    # BERT's GELU is exact; jax.nn.gelu defaults to the tanh approximation.
    h = constrain(jax.nn.gelu(h, approximate=False), ("act_batch", "act_length", "act_mlp"))
    out = jnp.einsum("blm,me->ble", h, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)
    return checkpoint_name(constrain(out, ("act_batch", "act_length", "act_embed")), "mlp_out")


class EncoderLayer(nnx.Module):
  """One post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = LayerNorm(cfg.hidden_size, cfg)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.output_norm = LayerNorm(cfg.hidden_size, cfg)
    self.rate = cfg.dropout
    self.dropout_impl = cfg.dropout_impl

  def __call__(self, x, mask, kv_lengths, dropout_key=None, *, pair_ids=None):
    attn_key, attn_out_key, ffn_out_key = _split(dropout_key, 3)
    a = self.attention(x, mask, kv_lengths, attn_key, pair_ids_BxL=pair_ids)
    x = checkpoint_name(self.attention_norm(x + dropout(a, self.rate, attn_out_key, self.dropout_impl)), "mlp_in")
    f = self.feed_forward(x)
    return self.output_norm(x + dropout(f, self.rate, ffn_out_key, self.dropout_impl))


# What each `model.remat` policy keeps for a layer's backward pass, by the `checkpoint_name`s
# above (`bertjax.model.config.REMAT_POINTS`); the rest is computed again from the layer's input.
# `none` keeps everything: no checkpoint at all.
_REMAT = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # The two [B, L, E] block outputs: the MLP's backward needs no attention recomputed first.
  "attention_out_mlp_in": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_in"),
  # Every named point but the [B, L, M] wide activation, four times wider than the others.
  "dots_except_mlp_wide": jax.checkpoint_policies.save_only_these_names(
    "qkv", "context", "attention_out", "mlp_in", "mlp_out"
  ),
  # Every named point kept in host memory (a TPU's pinned host memory), none on the device.
  "offload_dots": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(),
    names_which_can_be_offloaded=("qkv", "context", "attention_out", "mlp_in", "mlp_wide", "mlp_out"),
    offload_src="device",
    offload_dst="pinned_host",
  ),
}


class Encoder(nnx.Module):
  """`num_layers` EncoderLayers with parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(layer_rngs):
      return EncoderLayer(cfg, rngs=layer_rngs)

    self.layers = stacked_layers(rngs)
    self.num_layers = cfg.num_layers
    self.remat = cfg.remat
    self.scan = cfg.scan_layers

  def __call__(self, x, mask, kv_lengths, dropout_key=None, *, pair_ids=None):
    """All layers over `x` [B, L, E]; the arguments are `SelfAttention`'s, one key split per layer."""
    graphdef, stacked = nnx.split(self.layers)
    keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)

    def apply_layer(h, layer_state_and_key):
      layer_state, key = layer_state_and_key
      return nnx.merge(graphdef, layer_state)(h, mask, kv_lengths, key, pair_ids=pair_ids), None

    if self.remat != "none":
      apply_layer = jax.checkpoint(apply_layer, prevent_cse=not self.scan, policy=_REMAT[self.remat])
    if self.scan:
      # One traced layer whatever the depth: compile time stays flat.
      x, _ = jax.lax.scan(apply_layer, x, (stacked, keys))
    else:
      for i in range(self.num_layers):
        x, _ = apply_layer(x, jax.tree.map(lambda a, i=i: a[i], (stacked, keys)))
    return x


class Pooler(nnx.Module):
  """tanh(dense) on the [CLS] hidden state."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    h = cfg.hidden_size
    self.kernel = param(init(rngs.params(), (h, h)), ("embed", "embed_out"))
    self.bias = param(jnp.zeros((h,), jnp.float32), ("embed_out",))
    self.dtype = cfg.compute_dtype

  def __call__(self, cls_BxE):
    dt = self.dtype
    return jnp.tanh(cls_BxE @ self.kernel[...].astype(dt) + self.bias[...].astype(dt))


class MaskedLMHead(nnx.Module):
  """Dense + GELU + LayerNorm, then the decoder tied to the word embeddings, plus a bias."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    h = cfg.hidden_size
    self.transform_kernel = param(init(rngs.params(), (h, h)), ("embed", "embed_out"))
    self.transform_bias = param(jnp.zeros((h,), jnp.float32), ("embed_out",))
    self.transform_norm = LayerNorm(h, cfg)
    self.output_bias = param(jnp.zeros((cfg.padded_vocab_size,), jnp.float32), ("vocab",))
    self.dtype = cfg.compute_dtype
    self.vocab_size = cfg.vocab_size

  def __call__(self, h_BxPxE, word_embeddings_VxE):
    dt = self.dtype
    h = h_BxPxE @ self.transform_kernel[...].astype(dt) + self.transform_bias[...].astype(dt)
    h = self.transform_norm(jax.nn.gelu(h, approximate=False))
    logits = jnp.einsum("bpe,ve->bpv", h, word_embeddings_VxE.astype(dt), preferred_element_type=jnp.float32)
    logits = logits + self.output_bias[...]
    # Rows past the real vocabulary exist only for alignment: they never win a softmax.
    valid_V = jnp.arange(logits.shape[-1]) < self.vocab_size
    return constrain(jnp.where(valid_V, logits, _NEG), ("act_batch", "act_predictions", "act_vocab"))


class NextSentenceHead(nnx.Module):
  """Two-way classifier on the pooled output: 0 = B follows A, 1 = B is random."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    self.kernel = param(init(rngs.params(), (cfg.hidden_size, 2)), ("embed_out", "classes"))
    self.bias = param(jnp.zeros((2,), jnp.float32), ("classes",))

  def __call__(self, pooled_BxE):
    return pooled_BxE.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
