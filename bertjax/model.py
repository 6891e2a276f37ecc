"""BERT (Devlin et al. 2018) in Flax NNX: the variants table, the config, the pretraining model.

Faithful to the original: post-LayerNorm blocks, exact (erf) GELU, LayerNorm eps 1e-12,
truncated-normal(0.02) init, an MLM decoder tied to the word embeddings with its own bias, and
an NSP head on the tanh pooler. An exported model gives transformers' BertForPreTraining the
same logits (tests/test_hf_parity.py).

Parameter layout (checkpoints and the HF name map depend on it; DESIGN.md):
  the encoder's per-layer parameters are stacked on a leading `layers` axis and run with a scan;
  attention has one fused QKV kernel [embed, qkv=3, heads, kv] and an output kernel
  [heads, kv, embed]; the feed-forward has [embed, mlp] and [mlp, embed]; the word embedding
  has `vocab` rows padded up to a multiple of 128, whose logits are masked out.

The building blocks (embeddings, attention, feed-forward, encoder, heads) are in layers.py.
The model is written in NNX and trained as pure pytrees: no RNG lives in module state.
Dropout draws from a key passed at call time; `dropout_key=None` is deterministic.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bertjax.layers import Embeddings, Encoder, MaskedLMHead, NextSentenceHead, Pooler

VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Variant:
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int


def _sized(num_layers: int, hidden_size: int) -> Variant:
  # Google's recipe for every size: 64-dimensional heads, a 4x feed-forward.
  return Variant(num_layers, hidden_size, hidden_size // 64, 4 * hidden_size)


# Google's compact BERTs (Turc et al. 2019), L in {2..12} x H in {128..768}, plus base and large.
VARIANTS: dict[str, Variant] = {
    f"L{layers}_H{hidden}": _sized(layers, hidden)
    for layers in (2, 4, 6, 8, 10, 12)
    for hidden in (128, 256, 512, 768)
}
VARIANTS.update(
    tiny=VARIANTS["L2_H128"],
    mini=VARIANTS["L4_H256"],
    small=VARIANTS["L4_H512"],
    medium=VARIANTS["L8_H512"],
    base=_sized(12, 768),
    large=_sized(24, 1024),
)

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Everything the network needs, resolved (no `auto` left)."""

  vocab_size: int
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 2
  intermediate_size: int = 512
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are always float32
  attention_impl: str = "xla"  # xla | cudnn
  remat: str = "none"
  scan_layers: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def variant_sizes(model_cfg: Any) -> Variant:
  """The variant's sizes with the config's overrides applied (`None` keeps the variant's)."""
  base = VARIANTS[model_cfg.variant]
  hidden = model_cfg.hidden_size or base.hidden_size
  derived = _sized(base.num_layers, hidden) if hidden != base.hidden_size else base
  return Variant(
      num_layers=model_cfg.num_layers or base.num_layers,
      hidden_size=hidden,
      num_heads=model_cfg.num_heads or max(derived.num_heads, 1),
      intermediate_size=model_cfg.intermediate_size or derived.intermediate_size,
  )


def resolve_config(model_cfg: Any, vocab_size: int, backend: str | None = None) -> BertConfig:
  """A BertConfig from the `model` section of a run config, resolving `auto` for `backend`.

  `auto` dtype is bfloat16 on accelerators and float32 on CPU; `auto` attention is cuDNN flash
  attention on NVIDIA GPUs when it applies (16-bit compute, no attention dropout), else XLA.
  """
  backend = backend or jax.default_backend()
  sizes = variant_sizes(model_cfg)
  dtype = model_cfg.dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  impl = model_cfg.attention_impl
  if impl == "auto":
    cudnn_ok = backend == "gpu" and dtype in ("bfloat16", "float16") and model_cfg.attention_dropout == 0
    impl = "cudnn" if cudnn_ok else "xla"
  return BertConfig(
      vocab_size=vocab_size,
      hidden_size=sizes.hidden_size,
      num_layers=sizes.num_layers,
      num_heads=sizes.num_heads,
      intermediate_size=sizes.intermediate_size,
      max_position_embeddings=model_cfg.max_position_embeddings,
      type_vocab_size=model_cfg.type_vocab_size,
      dropout=model_cfg.dropout,
      attention_dropout=model_cfg.attention_dropout,
      layer_norm_eps=model_cfg.layer_norm_eps,
      initializer_range=model_cfg.initializer_range,
      dtype=dtype,
      attention_impl=impl,
      remat=model_cfg.remat,
      scan_layers=model_cfg.scan_layers,
  )


def _gather_rows(h_BxLxE, positions_BxK):
  return jnp.take_along_axis(h_BxLxE, positions_BxK[..., None].astype(jnp.int32), axis=1)


def attention_mask_for(attention_mask_BxL, pair_ids_BxL=None):
  """[B, 1, L, L] booleans: a token attends to real tokens of its own pair (pair id 0 = padding)."""
  pair = attention_mask_BxL if pair_ids_BxL is None else pair_ids_BxL
  return ((pair[:, :, None] == pair[:, None, :]) & (pair[:, None, :] > 0))[:, None]


class BertForPreTraining(nnx.Module):
  """BERT encoder with pooler, masked-LM head and next-sentence head."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.pooler = Pooler(cfg, rngs=rngs)
    self.mlm_head = MaskedLMHead(cfg, rngs=rngs)
    self.nsp_head = NextSentenceHead(cfg, rngs=rngs)

  def encode(self, input_ids, segment_ids=None, attention_mask=None, *,
             position_ids=None, pair_ids=None, dropout_key=None):
    """Final hidden states [B, L, H]. Sequences are right-padded; `pair_ids` (packing) keeps
    tokens attending only within their pair, 0 marking padding."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, L = input_ids.shape
    segment_ids = jnp.zeros_like(input_ids) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask = attention_mask_for(attention_mask, None if pair_ids is None else jnp.asarray(pair_ids, jnp.int32))
    kv_lengths = attention_mask.sum(-1) if pair_ids is None else None
    embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x = self.embeddings(input_ids, segment_ids, position_ids, embed_key)
    return self.encoder(x, mask, kv_lengths, encoder_key)

  def __call__(self, input_ids, segment_ids, attention_mask, masked_positions, *,
               position_ids=None, pair_ids=None, nsp_positions=None, dropout_key=None):
    """Pretraining forward: (MLM logits [B, P, V_padded] at `masked_positions`, NSP logits).

    MLM logits are float32 with the padded vocabulary rows at the most negative float.
    `nsp_positions` [B] (default: every row's [CLS] at 0) gives NSP logits [B, 2]; [B, K]
    (K packed pairs a row) gives [B, K, 2].
    """
    h = self.encode(input_ids, segment_ids, attention_mask, position_ids=position_ids,
                    pair_ids=pair_ids, dropout_key=dropout_key)
    mlm_logits = self.mlm_head(_gather_rows(h, jnp.asarray(masked_positions)), self.embeddings.word[...])
    if nsp_positions is None:
      nsp_positions = jnp.zeros(h.shape[:1], jnp.int32)
    nsp_positions = jnp.asarray(nsp_positions)
    cls = _gather_rows(h, nsp_positions.reshape(h.shape[0], -1))
    nsp_logits = self.nsp_head(self.pooler(cls))
    return mlm_logits, nsp_logits.reshape(*nsp_positions.shape, 2)


@functools.cache
def _jitted_init(cfg: BertConfig):
  # One compiled initializer per config: eager init would compile every random op separately.
  return jax.jit(lambda seed: nnx.split(BertForPreTraining(cfg, rngs=nnx.Rngs(params=jax.random.key(seed))))[1])


def init_model(cfg: BertConfig, seed: int = 0) -> BertForPreTraining:
  """A freshly initialised model; the same seed gives the same parameters."""
  graphdef, _ = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, _jitted_init(cfg)(seed))


def abstract_model(cfg: BertConfig) -> BertForPreTraining:
  """Shapes, dtypes and logical axes of the model, allocating nothing."""
  return nnx.eval_shape(lambda: BertForPreTraining(cfg, rngs=nnx.Rngs(params=0)))
