"""BERT with a fine-tuning head, in Flax NNX: sequence classification (or regression), extractive QA,
token classification and multiple choice.

    SequenceClassifier   a dense layer on the pooled [CLS] output, after dropout (0.1): one logit
                         per class, or one value for a regression
    SpanPredictor        a dense layer on every final hidden state: start and end logits
    TokenClassifier      a dense layer on every final hidden state, after dropout: one logit per tag
    ChoiceScorer         [B, C, L] choices read as [B*C, L] sequences; a SequenceClassifier with one
                         output scores each, giving [B, C] logits

All hold BertForPreTraining's embeddings, encoder and (classifier and choice scorer) pooler under
the same names, and compute them with its own `encode`, so a pretraining checkpoint's parameters
load by path, and transformers' BertForSequenceClassification, BertForQuestionAnswering,
BertForTokenClassification (neither of which has a pooler) and BertForMultipleChoice take them
through the one name map (bertjax.hf.names). The MLM and NSP heads are not
part of a fine-tuned model. Parameters carry logical axis names from bertjax.parallel.rules.RULES
(`classes` for the outputs); dropout draws from a key passed at call time, never module state.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bertjax.model.bert import BertForPreTraining
from bertjax.model.config import BertConfig
from bertjax.model.dropout import dropout
from bertjax.model.layers import Embeddings, Encoder, Pooler, param
from bertjax.parallel.rules import constrain
from bertjax.tasks import TaskSpec

# The parts of BertForPreTraining a fine-tuned model keeps, by parameter path.
BODY = ("embeddings", "encoder", "pooler")


class OutputLayer(nnx.Module):
  """A dense layer from the hidden size to the task's outputs, computed in float32."""

  def __init__(self, cfg: BertConfig, outputs: int, input_axis: str, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.truncated_normal(cfg.initializer_range)
    self.kernel = param(init(rngs.params(), (cfg.hidden_size, outputs)), (input_axis, "classes"))
    self.bias = param(jnp.zeros((outputs,), jnp.float32), ("classes",))

  def __call__(self, x):
    return jnp.einsum("...e,ec->...c", x.astype(jnp.float32), self.kernel[...]) + self.bias[...]


class SequenceClassifier(nnx.Module):
  """[B, L] tokens -> [B, C] logits (C classes, or 1 for a regression), float32."""

  # BertForPreTraining's forward to the final hidden states, on the same parameters.
  encode = BertForPreTraining.encode

  def __init__(self, cfg: BertConfig, num_outputs: int, head_dropout: float, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.pooler = Pooler(cfg, rngs=rngs)
    # The pooled output is on the `embed_out` side of the pooler's square kernel.
    self.classifier = OutputLayer(cfg, num_outputs, "embed_out", rngs=rngs)
    self.rate = head_dropout

  def __call__(self, input_ids, segment_ids, attention_mask, *, dropout_key=None):
    """[B, C] float32 logits; the arguments are `encode`'s, and `dropout_key` also drops the pooled output."""
    encode_key, head_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h = self.encode(input_ids, segment_ids, attention_mask, dropout_key=encode_key)
    pooled = self.pooler(h[:, 0]).astype(jnp.float32)
    return self.classifier(dropout(pooled, self.rate, head_key, self.config.dropout_impl))


class SpanPredictor(nnx.Module):
  """[B, L] tokens -> ([B, L] start logits, [B, L] end logits), float32."""

  encode = BertForPreTraining.encode

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.qa_outputs = OutputLayer(cfg, 2, "embed", rngs=rngs)

  def __call__(self, input_ids, segment_ids, attention_mask, *, dropout_key=None):
    """(start logits, end logits), each [B, L] float32; the arguments are `encode`'s."""
    h = self.encode(input_ids, segment_ids, attention_mask, dropout_key=dropout_key)
    logits_BxLx2 = constrain(self.qa_outputs(h), ("act_batch", "act_length", None))
    return logits_BxLx2[..., 0], logits_BxLx2[..., 1]


class TokenClassifier(nnx.Module):
  """[B, L] tokens -> [B, L, C] logits, one per tag (C tags), float32."""

  encode = BertForPreTraining.encode

  def __init__(self, cfg: BertConfig, num_tags: int, head_dropout: float, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.classifier = OutputLayer(cfg, num_tags, "embed", rngs=rngs)
    self.rate = head_dropout

  def __call__(self, input_ids, segment_ids, attention_mask, *, dropout_key=None):
    """[B, L, C] float32 logits; `dropout_key` also drops the final hidden states before the classifier."""
    encode_key, head_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h_BxLxE = self.encode(input_ids, segment_ids, attention_mask, dropout_key=encode_key).astype(jnp.float32)
    logits_BxLxC = self.classifier(dropout(h_BxLxE, self.rate, head_key, self.config.dropout_impl))
    return constrain(logits_BxLxC, ("act_batch", "act_length", None))


class ChoiceScorer(SequenceClassifier):
  """[B, C, L] tokens (C choices) -> [B, C] logits, float32: each choice is scored alone, as
  transformers' BertForMultipleChoice scores it, and a softmax over the C logits picks one."""

  def __init__(self, cfg: BertConfig, head_dropout: float, *, rngs: nnx.Rngs):
    super().__init__(cfg, 1, head_dropout, rngs=rngs)

  def __call__(self, input_ids, segment_ids, attention_mask, *, dropout_key=None):
    """[B, C] float32 logits; the arguments are [B, C, L], read by the encoder as [B*C, L]."""
    b, c, length = input_ids.shape
    flat = (x.reshape(b * c, length) for x in (input_ids, segment_ids, attention_mask))
    return super().__call__(*flat, dropout_key=dropout_key).reshape(b, c)


def build(cfg: BertConfig, spec: TaskSpec, head_dropout: float, rngs: nnx.Rngs) -> nnx.Module:
  """The fine-tuning model of a task.

  Args:
    cfg: the body's BertConfig.
    spec: the task; `qa` gives a SpanPredictor, `ner` a TokenClassifier of its tags,
      `multiple_choice` a ChoiceScorer, else a SequenceClassifier of `spec.num_outputs`.
    head_dropout: the dropout rate before the output layer (all but QA).
    rngs: the parameters' random streams.
  """
  if spec.kind == "qa":
    return SpanPredictor(cfg, rngs=rngs)
  if spec.kind == "ner":
    return TokenClassifier(cfg, spec.num_outputs, head_dropout, rngs=rngs)
  if spec.kind == "multiple_choice":
    return ChoiceScorer(cfg, head_dropout, rngs=rngs)
  return SequenceClassifier(cfg, spec.num_outputs, head_dropout, rngs=rngs)
