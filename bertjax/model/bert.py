"""BERT (Devlin et al. 2018) for pretraining, in Flax NNX: encoder, pooler, MLM and NSP heads.

Faithful to the original: post-LayerNorm blocks, exact (erf) GELU, LayerNorm eps 1e-12,
truncated-normal(0.02) init, an MLM decoder tied to the word embeddings with its own bias, and
an NSP head on the tanh pooler. An exported model gives transformers' BertForPreTraining the
same logits. The parameter layout (stacked layers, fused QKV, padded vocabulary) is the one
docs/architecture.md fixes; checkpoints and the transformers name map depend on it.

The building blocks are in `layers`, the sizes in `config`. The model is written in NNX and
trained as pure pytrees: no RNG lives in module state. Dropout draws from a key passed at call
time; `dropout_key=None` is deterministic.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bertjax.model.config import BertConfig
from bertjax.model.layers import Embeddings, Encoder, MaskedLMHead, NextSentenceHead, Pooler


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

  def encode(
    self, input_ids, segment_ids=None, attention_mask=None, *, position_ids=None, pair_ids=None, dropout_key=None
  ):
    """Final hidden states [B, L, H] in the compute dtype (`config.dtype`).

    Args:
      input_ids: [B, L] token ids, right-padded.
      segment_ids: [B, L] token types (0 = sentence A, 1 = B); None is all 0.
      attention_mask: [B, L], 1 on real tokens and 0 on padding; None is all 1.
      position_ids: [B, L] position-embedding rows; None is 0..L-1 in every row (packed rows
        restart at each pair).
      pair_ids: [B, L] with packing: tokens attend only within their pair, 0 marking padding;
        None is one sequence a row, masked by `attention_mask`.
      dropout_key: a PRNG key for dropout, or None for a deterministic pass.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    B, L = input_ids.shape
    segment_ids = jnp.zeros_like(input_ids) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    pairs = attention_mask if pair_ids is None else jnp.asarray(pair_ids, jnp.int32)
    mask = attention_mask_for(attention_mask, pairs)
    # Key lengths describe one right-padded sequence a row; packed rows need the pair mask.
    kv_lengths = attention_mask.sum(-1) if pair_ids is None else None
    embed_key, encoder_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x = self.embeddings(input_ids, segment_ids, position_ids, embed_key)
    return self.encoder(x, mask, kv_lengths, encoder_key, pair_ids=pairs)

  def __call__(
    self,
    input_ids,
    segment_ids,
    attention_mask,
    masked_positions,
    *,
    position_ids=None,
    pair_ids=None,
    nsp_positions=None,
    dropout_key=None,
  ):
    """Pretraining forward: (MLM logits [B, P, V_padded] at `masked_positions`, NSP logits).

    MLM logits are float32 with the padded vocabulary rows at the most negative float.
    `nsp_positions` [B] (default: every row's [CLS] at 0) gives NSP logits [B, 2]; [B, K]
    (K packed pairs a row) gives [B, K, 2].

    Args:
      input_ids, segment_ids, attention_mask, position_ids, pair_ids, dropout_key: as in `encode`.
      masked_positions: [B, P] positions in the row whose tokens the MLM head predicts.
      nsp_positions: [B] or [B, K] positions of the [CLS] tokens the NSP head classifies.
    Returns:
      (mlm_logits [B, P, V_padded], nsp_logits [B, 2] or [B, K, 2]), both float32.
    """
    h = self.encode(
      input_ids, segment_ids, attention_mask, position_ids=position_ids, pair_ids=pair_ids, dropout_key=dropout_key
    )
    mlm_logits = self.mlm_head(_gather_rows(h, jnp.asarray(masked_positions)), self.embeddings.word[...])
    if nsp_positions is None:
      nsp_positions = jnp.zeros(h.shape[:1], jnp.int32)
    nsp_positions = jnp.asarray(nsp_positions)
    cls = _gather_rows(h, nsp_positions.reshape(h.shape[0], -1))
    nsp_logits = self.nsp_head(self.pooler(cls))
    return mlm_logits, nsp_logits.reshape(*nsp_positions.shape, 2)


Build = Callable[[BertConfig, nnx.Rngs], nnx.Module]


def _pretraining(cfg: BertConfig, rngs: nnx.Rngs) -> BertForPreTraining:
  return BertForPreTraining(cfg, rngs=rngs)


@functools.cache
def _jitted_init(build: Build, cfg: BertConfig):
  # One compiled initializer per (model, config): eager init would compile every random op separately.
  return jax.jit(lambda seed: nnx.split(build(cfg, nnx.Rngs(params=jax.random.key(seed))))[1])


def initialise(build: Build, cfg: BertConfig, seed: int = 0) -> nnx.Module:
  """`build(cfg, rngs)`'s model, freshly initialised; the same seed gives the same parameters.
  `build` must hash by value (a module-level function, or a frozen task's bound method)."""
  graphdef = nnx.graphdef(abstract(build, cfg))
  return nnx.merge(graphdef, _jitted_init(build, cfg)(seed))


def abstract(build: Build, cfg: BertConfig) -> nnx.Module:
  """Shapes, dtypes and logical axes of `build(cfg, rngs)`'s model, allocating nothing."""
  return nnx.eval_shape(lambda: build(cfg, nnx.Rngs(params=0)))


def init_model(cfg: BertConfig, seed: int = 0) -> BertForPreTraining:
  """A freshly initialised pretraining model; the same seed gives the same parameters."""
  return initialise(_pretraining, cfg, seed)


def abstract_model(cfg: BertConfig) -> BertForPreTraining:
  """Shapes, dtypes and logical axes of the pretraining model, allocating nothing."""
  return abstract(_pretraining, cfg)
