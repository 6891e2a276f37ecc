"""The transformers BERT name map: bertjax parameters <-> `BertForPreTraining` tensors.

Pure conversions between a bertjax parameter pure dict (`nnx.to_pure_dict` of the model's
`nnx.Param` state) and a flat {transformers name: numpy array} dict, plus the two config
translations. This module touches no disk: folders are `folders`' (reading), `export`'s,
`import_hf`'s and `load`'s, and tokenizers `tokenizer`'s.

Layouts (docs/architecture.md, "One parameter layout"): bertjax stacks the encoder layers on a leading
axis, fuses Q/K/V into one [H, 3, N, D] kernel and keeps heads apart in the output kernel
[N, D, H]; transformers has one tensor per layer and projection with heads folded into N*D, and
torch `Linear.weight` is [out, in], the transpose of a Flax kernel. bertjax pads the vocabulary
to a multiple of 128; transformers has exactly `vocab_size` rows.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from bertjax.errors import BertjaxError
from bertjax.model.bert import abstract_model
from bertjax.model.config import BertConfig

# How one slice of a bertjax parameter becomes one transformers tensor.
#   same:         identical layout (embeddings, LayerNorms, biases of [H] or [M])
#   flat:         a per-head bias [N, D] -> [N*D]
#   kernel:       Flax [in, out...] -> torch [out, in] (dense layers, one of Q/K/V [H, N, D])
#   heads_kernel: attention output [N, D, H] -> torch [H, N*D]
_KERNELS = ("kernel", "heads_kernel")


def _to_hf(kind: str, x):
  # Array methods only, so this also runs under jax.eval_shape to derive expected shapes.
  if kind == "same":
    return x
  if kind == "flat":
    return x.reshape(-1)
  if kind == "kernel":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_kernel":
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(kind)


def _from_hf(kind: str, tensor: np.ndarray, slice_shape: tuple[int, ...]) -> np.ndarray:
  return (tensor.T if kind in _KERNELS else tensor).reshape(slice_shape)


def name_map(cfg: BertConfig) -> list[tuple[str, str, tuple, str]]:
  """(transformers name, bertjax path, index of the slice in the bertjax array, kind) for every
  tensor of a transformers `BertForPreTraining`, the tied decoder weight excepted."""
  real_vocab = (slice(0, cfg.vocab_size),)  # padded rows exist only in bertjax
  rows = [
    ("bert.embeddings.word_embeddings.weight", "embeddings/word", real_vocab, "same"),
    ("bert.embeddings.position_embeddings.weight", "embeddings/position", (), "same"),
    ("bert.embeddings.token_type_embeddings.weight", "embeddings/segment", (), "same"),
    ("bert.embeddings.LayerNorm.weight", "embeddings/norm/scale", (), "same"),
    ("bert.embeddings.LayerNorm.bias", "embeddings/norm/bias", (), "same"),
  ]
  for i in range(cfg.num_layers):
    hf, bj = f"bert.encoder.layer.{i}.", "encoder/layers/"
    for k, projection in enumerate(("query", "key", "value")):  # order of the fused qkv axis
      rows.append(
        (f"{hf}attention.self.{projection}.weight", bj + "attention/qkv_kernel", (i, slice(None), k), "kernel")
      )
      rows.append((f"{hf}attention.self.{projection}.bias", bj + "attention/qkv_bias", (i, k), "flat"))
    rows += [
      (hf + "attention.output.dense.weight", bj + "attention/out_kernel", (i,), "heads_kernel"),
      (hf + "attention.output.dense.bias", bj + "attention/out_bias", (i,), "same"),
      (hf + "attention.output.LayerNorm.weight", bj + "attention_norm/scale", (i,), "same"),
      (hf + "attention.output.LayerNorm.bias", bj + "attention_norm/bias", (i,), "same"),
      (hf + "intermediate.dense.weight", bj + "feed_forward/in_kernel", (i,), "kernel"),
      (hf + "intermediate.dense.bias", bj + "feed_forward/in_bias", (i,), "same"),
      (hf + "output.dense.weight", bj + "feed_forward/out_kernel", (i,), "kernel"),
      (hf + "output.dense.bias", bj + "feed_forward/out_bias", (i,), "same"),
      (hf + "output.LayerNorm.weight", bj + "output_norm/scale", (i,), "same"),
      (hf + "output.LayerNorm.bias", bj + "output_norm/bias", (i,), "same"),
    ]
  return rows + [
    ("bert.pooler.dense.weight", "pooler/kernel", (), "kernel"),
    ("bert.pooler.dense.bias", "pooler/bias", (), "same"),
    ("cls.predictions.transform.dense.weight", "mlm_head/transform_kernel", (), "kernel"),
    ("cls.predictions.transform.dense.bias", "mlm_head/transform_bias", (), "same"),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_head/transform_norm/scale", (), "same"),
    ("cls.predictions.transform.LayerNorm.bias", "mlm_head/transform_norm/bias", (), "same"),
    ("cls.predictions.bias", "mlm_head/output_bias", real_vocab, "same"),
    ("cls.seq_relationship.weight", "nsp_head/kernel", (), "kernel"),
    ("cls.seq_relationship.bias", "nsp_head/bias", (), "same"),
  ]


# Fine-tuned models (bertjax.finetune.heads) keep BertForPreTraining's embeddings, encoder and
# (classification, multiple choice) pooler under the same paths, and add one output layer.
# transformers' BertForQuestionAnswering and BertForTokenClassification have no pooler.
_FINETUNE_BODY = {
  "classification": ("embeddings", "encoder", "pooler"),
  "qa": ("embeddings", "encoder"),
  "ner": ("embeddings", "encoder"),
  "multiple_choice": ("embeddings", "encoder", "pooler"),
}
_CLASSIFIER = [
  ("classifier.weight", "classifier/kernel", (), "kernel"),
  ("classifier.bias", "classifier/bias", (), "same"),
]
_FINETUNE_HEADS = {
  "classification": _CLASSIFIER,
  "qa": [
    ("qa_outputs.weight", "qa_outputs/kernel", (), "kernel"),
    ("qa_outputs.bias", "qa_outputs/bias", (), "same"),
  ],
  "ner": _CLASSIFIER,
  "multiple_choice": _CLASSIFIER,
}
FINETUNE_ARCHITECTURES = {
  "classification": "BertForSequenceClassification",
  "qa": "BertForQuestionAnswering",
  "ner": "BertForTokenClassification",
  "multiple_choice": "BertForMultipleChoice",
}


def finetune_name_map(cfg: BertConfig, kind: str) -> list[tuple[str, str, tuple, str]]:
  """name_map's rows for a fine-tuned model of `kind` (a `FINETUNE_ARCHITECTURES` key): transformers'
  BertForSequenceClassification, BertForQuestionAnswering, BertForTokenClassification or
  BertForMultipleChoice."""
  body = [row for row in name_map(cfg) if row[1].split("/")[0] in _FINETUNE_BODY[kind]]
  return body + _FINETUNE_HEADS[kind]


def _tensors(params: dict, rows) -> dict[str, np.ndarray]:
  flat = {path: np.asarray(value, np.float32) for path, value in flatten_dict(params, sep="/").items()}
  if uncovered := set(flat) - {path for _, path, _, _ in rows}:
    raise RuntimeError(f"bertjax.hf.names has no transformers name for {sorted(uncovered)}")
  # Copies: the tensors own their memory, so they neither alias nor pin the parameters.
  return {name: np.array(_to_hf(kind, flat[path][index]), np.float32, order="C") for name, path, index, kind in rows}


def to_hf_state_dict(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
  """bertjax parameters -> transformers `BertForPreTraining` tensors (float32, contiguous).

  The decoder weight is left out: transformers ties it to the word embeddings on load."""
  return _tensors(params, name_map(cfg))


def to_hf_finetune_state_dict(params: dict, cfg: BertConfig, kind: str) -> dict[str, np.ndarray]:
  """A fine-tuned model's parameters -> the tensors of its transformers model
  (`FINETUNE_ARCHITECTURES[kind]`).

  Args:
    params: the fine-tuned model's parameter pure dict (`bertjax.finetune.heads` layout).
    cfg: its body's BertConfig.
    kind: `classification`, `qa`, `ner` or `multiple_choice`.
  Returns:
    {transformers name: float32 contiguous numpy array}, vocabulary padding rows stripped.
  """
  return _tensors(params, finetune_name_map(cfg, kind))


# Buffers that older transformers versions saved with the weights; they are not parameters.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Aliases of tensors bertjax has once: the tied MLM decoder.
_DECODER_WEIGHT, _DECODER_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"


def _canonical_names(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The names a current transformers `BertForPreTraining` uses, buffers dropped."""
  out = {}
  for name, tensor in tensors.items():
    if name.endswith(_BUFFERS):
      continue
    if name.startswith(("embeddings.", "encoder.", "pooler.")):
      name = "bert." + name  # a plain BertModel saves without the prefix
    # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    out[name] = np.asarray(tensor)
  return out


def _check_tied(tensors: dict[str, np.ndarray], alias: str, canonical: str) -> None:
  if alias in tensors and canonical in tensors and not np.array_equal(tensors[alias], tensors[canonical]):
    raise BertjaxError(
      f"checkpoint tensor {alias} differs from {canonical}: bertjax ties the MLM "
      "decoder to them; import a checkpoint with tied decoder weights"
    )


def from_hf_state_dict(
  tensors: Mapping[str, np.ndarray], cfg: BertConfig, *, init_params: dict | None = None
) -> tuple[dict, list[str]]:
  """transformers BERT tensors -> (bertjax parameters, bertjax paths taken from `init_params`).

  Accepts BertForPreTraining, BertForMaskedLM and plain BertModel state dicts; parameters the
  checkpoint lacks (a BertModel has no heads) come from `init_params`. Padded vocabulary rows
  are zero. Unknown tensors and shape mismatches raise BertjaxError."""
  tensors = _canonical_names(tensors)
  _check_tied(tensors, _DECODER_WEIGHT, "bert.embeddings.word_embeddings.weight")
  _check_tied(tensors, _DECODER_BIAS, "cls.predictions.bias")
  if _DECODER_BIAS in tensors and "cls.predictions.bias" not in tensors:
    tensors["cls.predictions.bias"] = tensors[_DECODER_BIAS]
  tensors.pop(_DECODER_WEIGHT, None)
  tensors.pop(_DECODER_BIAS, None)

  shapes = flatten_dict(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)), sep="/")
  flat = {path: np.zeros(s.shape, np.float32) for path, s in shapes.items()}
  rows = name_map(cfg)
  if uncovered := set(flat) - {path for _, path, _, _ in rows}:
    raise RuntimeError(f"bertjax.hf.names.name_map has no transformers name for {sorted(uncovered)}")
  if unknown := sorted(set(tensors) - {name for name, _, _, _ in rows}):
    listed = ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in unknown[:3])
    raise BertjaxError(
      f"checkpoint has {len(unknown)} tensor(s) a {cfg.num_layers}-layer "
      f"BertForPreTraining lacks: {listed}; check that config.json matches the weights"
    )

  found: dict[str, list[str]] = {}
  absent: dict[str, list[str]] = {}
  for name, path, index, kind in rows:
    target = flat[path][index]  # a view: writing into it fills the bertjax array
    if name not in tensors:
      absent.setdefault(path, []).append(name)
      continue
    found.setdefault(path, []).append(name)
    tensor = tensors[name]
    expected = jax.eval_shape(
      lambda x, kind=kind: _to_hf(kind, x), jax.ShapeDtypeStruct(target.shape, np.float32)
    ).shape
    if tuple(tensor.shape) != tuple(expected):
      raise BertjaxError(
        f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected "
        f"{tuple(expected)} for this config; check that config.json matches the weights"
      )
    target[...] = _from_hf(kind, tensor.astype(np.float32), target.shape)

  for path, names in absent.items():
    if path in found:  # part of a stacked parameter but not all: a truncated or damaged file
      raise BertjaxError(f"checkpoint lacks {names[0]} but has {found[path][0]}; use a complete checkpoint")
  missing = sorted(absent)
  if missing:
    if init_params is None:
      raise BertjaxError(
        f"checkpoint lacks {', '.join(absent[p][0] for p in missing[:3])} "
        f"({len(missing)} bertjax parameter(s)); pass init_params to start them fresh"
      )
    init_flat = flatten_dict(init_params, sep="/")
    for path in missing:
      value = np.asarray(init_flat[path], np.float32)
      if value.shape != flat[path].shape:
        raise BertjaxError(f"init_params {path} has shape {value.shape}, expected {flat[path].shape}")
      flat[path] = value.copy()
  return unflatten_dict(flat, sep="/"), missing


def bert_config_from_hf(hf_config: Mapping) -> BertConfig:
  """A bertjax BertConfig from a transformers BERT config.json dict.

  Absent optional keys take transformers' BertConfig defaults, as transformers itself does."""
  if hf_config.get("model_type") != "bert":
    raise BertjaxError(
      f"config.json model_type is {hf_config.get('model_type')!r}, not 'bert'; bertjax imports BERT checkpoints only"
    )
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise BertjaxError(
      f"config.json hidden_act is {hf_config['hidden_act']!r}; bertjax computes the "
      "exact (erf) GELU, 'gelu'; import a checkpoint trained with it"
    )
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise BertjaxError(
      f"config.json position_embedding_type is {hf_config['position_embedding_type']!r}; "
      "bertjax has absolute position embeddings only"
    )
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  if absent := [key for key in required if key not in hf_config]:
    raise BertjaxError(f"config.json lacks {', '.join(absent)}; use the config.json saved with the weights")
  if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
    raise BertjaxError(
      f"config.json hidden_size {hf_config['hidden_size']} is not a multiple of "
      f"num_attention_heads {hf_config['num_attention_heads']}"
    )
  return BertConfig(
    vocab_size=int(hf_config["vocab_size"]),
    hidden_size=int(hf_config["hidden_size"]),
    num_layers=int(hf_config["num_hidden_layers"]),
    num_heads=int(hf_config["num_attention_heads"]),
    intermediate_size=int(hf_config["intermediate_size"]),
    max_position_embeddings=int(hf_config.get("max_position_embeddings", 512)),
    type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
    dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
    attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
    layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
    initializer_range=float(hf_config.get("initializer_range", 0.02)),
  )


def hf_finetune_config(
  cfg: BertConfig,
  kind: str,
  labels: tuple[str, ...],
  regression: bool,
  classifier_dropout: float,
  pad_token_id: int = 0,
) -> dict:
  """A transformers config.json dict for a fine-tuned model: the head's architecture; for
  classification its classes (id2label, label2id) and problem_type (regression: one output); for
  NER its tags (id2label, label2id); the dropout before the output layer (all but QA).

  Args:
    cfg: the body's BertConfig.
    kind: a `FINETUNE_ARCHITECTURES` key; `labels` and `regression` apply to classification and
      `labels` to NER, `classifier_dropout` to all but qa.
    labels: the class (NER: tag) names, in output order; ignored with `regression` (one output, LABEL_0).
    regression: whether the head has one real-valued output.
    classifier_dropout: written as `classifier_dropout`.
    pad_token_id: the tokenizer's [PAD] id.
  """
  config = {**hf_config_from_bert(cfg, pad_token_id), "architectures": [FINETUNE_ARCHITECTURES[kind]]}
  if kind in ("classification", "ner"):
    names = ["LABEL_0"] if regression else list(labels)
    config.update(id2label={str(i): name for i, name in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
  if kind == "classification":
    config["problem_type"] = "regression" if regression else "single_label_classification"
  if kind != "qa":
    config["classifier_dropout"] = classifier_dropout
  return config


def hf_config_from_bert(cfg: BertConfig, pad_token_id: int = 0) -> dict:
  """A transformers config.json dict describing `cfg` as a BertForPreTraining."""
  return {
    "model_type": "bert",
    "architectures": ["BertForPreTraining"],
    "vocab_size": cfg.vocab_size,  # the real vocabulary: padding rows are not exported
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": "gelu",
    "hidden_dropout_prob": cfg.dropout,
    "attention_probs_dropout_prob": cfg.attention_dropout,
    "max_position_embeddings": cfg.max_position_embeddings,
    "type_vocab_size": cfg.type_vocab_size,
    "initializer_range": cfg.initializer_range,
    "layer_norm_eps": cfg.layer_norm_eps,
    "position_embedding_type": "absolute",
    "tie_word_embeddings": True,
    "pad_token_id": pad_token_id,
  }
