"""bertjax against transformers' BertForPreTraining: the name map in bertjax/hf/names.py is right when
a random transformers model, imported, gives the same hidden states and logits.

The reference is built here with random weights (no network). Its vocabulary (250) is not a
multiple of 128, so the padded rows are exercised, and its heads are 16 wide, not BERT's 64.
"""

import jax
import numpy as np
import pytest

from bertjax.errors import BertjaxError
from bertjax.hf import load, names
from bertjax.model.bert import init_model
from tests.support.extras import randomise, require

torch = require("torch")
transformers = require("transformers")

TOLERANCE = 5e-6  # float32 rounding: measured at most 2.4e-6 (hidden states), 1.2e-6 (logits)
HF_DIMS = dict(
  vocab_size=250,
  hidden_size=48,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=96,
  max_position_embeddings=64,
  type_vocab_size=2,
)
LENGTHS = (16, 11, 7)  # row 0 full, the others right-padded
MASKED_POSITIONS = np.array([[1, 5, 9, 15], [0, 3, 8, 10], [2, 4, 5, 6]])


def _numpy_state_dict(module):
  return {name: t.detach().numpy().copy() for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  return randomise(transformers.BertForPreTraining(transformers.BertConfig(**HF_DIMS)))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  B, L = len(LENGTHS), max(LENGTHS)
  ids = rng.integers(5, HF_DIMS["vocab_size"], (B, L))
  ids[0, 1] = HF_DIMS["vocab_size"] - 1  # the last real vocabulary row, next to the padding
  positions = np.arange(L)
  mask = (positions[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
  segments = ((positions[None] >= (np.array(LENGTHS) // 2)[:, None]) & (mask == 1)).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  assert (np.array(LENGTHS)[:, None] > MASKED_POSITIONS).all()
  return dict(input_ids=ids, segment_ids=segments, attention_mask=mask)


def _import(state_dict, hf_config_dict):
  cfg = names.bert_config_from_hf(hf_config_dict)
  model = init_model(cfg, seed=1)
  params, missing = names.from_hf_state_dict(state_dict, cfg, init_params=load.params_of(model))
  load.load_params_into(model, params)
  return cfg, model, missing


def _bertjax_outputs(model, batch):
  with jax.default_matmul_precision("highest"):
    args = (batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
    hidden = np.asarray(model.encode(*args))
    mlm, nsp = model(*args, MASKED_POSITIONS)
  return hidden, np.asarray(mlm), np.asarray(nsp)


def _hf_outputs(hf_model, batch):
  kwargs = dict(
    input_ids=torch.tensor(batch["input_ids"]),
    token_type_ids=torch.tensor(batch["segment_ids"]),
    attention_mask=torch.tensor(batch["attention_mask"]),
  )
  with torch.no_grad():
    hidden = hf_model.bert(**kwargs).last_hidden_state.numpy()
    out = hf_model(**kwargs)
  mlm = np.take_along_axis(out.prediction_logits.numpy(), MASKED_POSITIONS[..., None], axis=1)
  return hidden, mlm, out.seq_relationship_logits.numpy()


def _max_errors(bertjax_out, hf_out, batch, vocab_size):
  real = batch["attention_mask"] == 1
  (h_bj, mlm_bj, nsp_bj), (h_hf, mlm_hf, nsp_hf) = bertjax_out, hf_out
  return {
    "sequence": float(np.abs(h_bj[real] - h_hf[real]).max()),
    "mlm": float(np.abs(mlm_bj[..., :vocab_size] - mlm_hf).max()),
    "nsp": float(np.abs(nsp_bj - nsp_hf).max()),
  }


def test_imported_transformers_model_gives_the_same_outputs(hf_model, batch):
  cfg, model, missing = _import(_numpy_state_dict(hf_model), hf_model.config.to_dict())
  assert missing == []
  assert cfg.padded_vocab_size == 256 and cfg.head_dim == 16
  bertjax_out = _bertjax_outputs(model, batch)
  errors = _max_errors(bertjax_out, _hf_outputs(hf_model, batch), batch, cfg.vocab_size)
  print(f"\nHF -> bertjax max abs errors: {errors}")
  assert max(errors.values()) <= TOLERANCE, f"max abs errors {errors} exceed {TOLERANCE}"
  padded_logits = bertjax_out[1][..., cfg.vocab_size :]
  assert (padded_logits == np.finfo(np.float32).min).all(), "padded vocabulary logits are not masked"


def test_exported_bertjax_model_gives_transformers_the_same_outputs(batch):
  cfg = names.bert_config_from_hf(dict(HF_DIMS, model_type="bert"))
  model = init_model(cfg, seed=2)
  params = jax.tree.map(lambda p: p + np.float32(0.05), load.params_of(model))  # no zero biases or unit norms
  load.load_params_into(model, params)
  hf_config = names.hf_config_from_bert(cfg)
  assert names.bert_config_from_hf(hf_config) == cfg
  hf_model = transformers.BertForPreTraining(transformers.BertConfig(**hf_config)).eval()
  exported = {k: torch.from_numpy(v) for k, v in names.to_hf_state_dict(load.params_of(model), cfg).items()}
  result = hf_model.load_state_dict(exported, strict=False)
  assert result.unexpected_keys == []
  # Only the tied decoder aliases are left for transformers to fill from the exported tensors.
  assert set(result.missing_keys) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  errors = _max_errors(_bertjax_outputs(model, batch), _hf_outputs(hf_model, batch), batch, cfg.vocab_size)
  print(f"\nbertjax -> HF max abs errors: {errors}")
  assert max(errors.values()) <= TOLERANCE, f"max abs errors {errors} exceed {TOLERANCE}"


def test_round_trips_are_exact(hf_model):
  state_dict = _numpy_state_dict(hf_model)
  cfg = names.bert_config_from_hf(hf_model.config.to_dict())
  params, missing = names.from_hf_state_dict(state_dict, cfg)
  assert missing == []
  exported = names.to_hf_state_dict(params, cfg)
  tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  assert set(exported) == set(state_dict) - tied
  for name, tensor in exported.items():
    assert tensor.dtype == np.float32 and tensor.flags.c_contiguous, name
    np.testing.assert_array_equal(tensor, state_dict[name], err_msg=name)
  # The other way: every bertjax parameter has a transformers name (padded vocab rows aside).
  original = load.params_of(init_model(cfg, seed=3))
  back, _ = names.from_hf_state_dict(names.to_hf_state_dict(original, cfg), cfg)
  for path in ("embeddings/word", "mlm_head/output_bias"):
    head, leaf = path.split("/")
    assert (back[head][leaf][cfg.vocab_size :] == 0).all()
    original[head][leaf][cfg.vocab_size :] = 0
  jax.tree.map(np.testing.assert_array_equal, back, original)


@pytest.mark.parametrize("with_position_ids", [False, True])
def test_plain_bert_model_imports_and_lists_missing_heads(hf_model, with_position_ids):
  # A BertModel's own state dict: the encoder of hf_model, saved without the `bert.` prefix.
  state_dict = _numpy_state_dict(hf_model.bert)
  assert not any(name.startswith("bert.") for name in state_dict)
  if with_position_ids:  # older transformers saved this buffer with the weights
    state_dict["embeddings.position_ids"] = np.arange(HF_DIMS["max_position_embeddings"])[None]
  cfg, model, missing = _import(state_dict, hf_model.config.to_dict())
  assert missing == [
    "mlm_head/output_bias",
    "mlm_head/transform_bias",
    "mlm_head/transform_kernel",
    "mlm_head/transform_norm/bias",
    "mlm_head/transform_norm/scale",
    "nsp_head/bias",
    "nsp_head/kernel",
  ]
  params = load.params_of(model)
  fresh = load.params_of(init_model(cfg, seed=1))
  np.testing.assert_array_equal(params["nsp_head"]["kernel"], fresh["nsp_head"]["kernel"])
  np.testing.assert_array_equal(params["pooler"]["kernel"], state_dict["pooler.dense.weight"].T)
  with pytest.raises(BertjaxError, match="init_params"):
    names.from_hf_state_dict(state_dict, cfg)


def test_bad_checkpoints_raise_one_line_errors(hf_model):
  cfg = names.bert_config_from_hf(hf_model.config.to_dict())
  good = _numpy_state_dict(hf_model)

  wrong_shape = dict(good)
  wrong_shape["bert.encoder.layer.1.attention.self.key.weight"] = np.zeros((48, 32), np.float32)
  with pytest.raises(BertjaxError, match=r"layer\.1\.attention\.self\.key\.weight .*\(48, 32\).*\(48, 48\)"):
    names.from_hf_state_dict(wrong_shape, cfg)

  unknown = dict(good, **{"classifier.weight": np.zeros((2, 48), np.float32)})
  with pytest.raises(BertjaxError, match=r"classifier\.weight \(2, 48\)"):
    names.from_hf_state_dict(unknown, cfg)

  untied = dict(good)
  untied["cls.predictions.decoder.bias"] = good["cls.predictions.bias"] + 1
  with pytest.raises(BertjaxError, match="decoder.bias"):
    names.from_hf_state_dict(untied, cfg)

  truncated = {k: v for k, v in good.items() if k != "bert.encoder.layer.1.output.dense.bias"}
  with pytest.raises(BertjaxError, match=r"layer\.1\.output\.dense\.bias"):
    names.from_hf_state_dict(truncated, cfg, init_params=load.params_of(init_model(cfg)))

  config = hf_model.config.to_dict()
  for key, value in (("model_type", "roberta"), ("hidden_act", "gelu_new")):
    with pytest.raises(BertjaxError, match=key) as error:
      names.bert_config_from_hf(dict(config, **{key: value}))
    assert "\n" not in str(error.value)
