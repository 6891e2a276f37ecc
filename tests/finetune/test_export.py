"""`bertjax export --format hf` of fine-tune runs: transformers loads BertForSequenceClassification
and BertForQuestionAnswering with no missing or unexpected weights, with the run's classes, and
computes bertjax's logits."""

import json

import jax
import numpy as np
import pytest

from bertjax.cli import main as cli
from bertjax.errors import BertjaxError
from bertjax.hf import load
from tests.support.extras import require

torch = require("torch")
transformers = require("transformers")

TOLERANCE = 1e-4  # what the export promises; measured at most 9.6e-7 (float32, "highest" matmul precision)


def _export(workdir):
  assert cli.main(["export", "--workdir", str(workdir), "--format", "hf"]) == 0
  return workdir / "export" / "hf"


def _batch(tokenizer, firsts, seconds):
  tokens = tokenizer(firsts, seconds, return_tensors="pt", padding=True)
  return tokens, tuple(tokens[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask"))


def test_a_classifier_exports_as_bert_for_sequence_classification(pair_run):
  _, workdir, _ = pair_run
  folder = _export(workdir)
  hf_config = json.loads((folder / "config.json").read_text())
  assert hf_config["architectures"] == ["BertForSequenceClassification"]
  assert hf_config["id2label"] == {"0": "no", "1": "yes"} and hf_config["label2id"] == {"no": 0, "yes": 1}
  assert hf_config["problem_type"] == "single_label_classification"
  model, info = transformers.BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  tokens, arrays = _batch(tokenizer, ["river play maps", "songs"], ["the people talk", "river numbers river songs"])
  with torch.no_grad():
    expected = model.eval()(**tokens).logits.numpy()
  ours, our_tokenizer, spec = load.load_finetuned(workdir)
  assert spec.labels == ("no", "yes")
  assert arrays[0][0][1:4].tolist() == our_tokenizer.encode("river play maps")  # both tokenizers agree
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(*arrays))
  np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
  assert model.config.id2label == {0: "no", 1: "yes"}


def test_a_span_predictor_exports_as_bert_for_question_answering(squad_run):
  _, workdir, _ = squad_run
  folder = _export(workdir)
  assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
  model, info = transformers.BertForQuestionAnswering.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  tokens, arrays = _batch(tokenizer, ["where", "where"], ["maps river mill talk, songs", "people Mill River, flowers"])
  with torch.no_grad():
    out = model.eval()(**tokens)
  ours, _, _ = load.load_finetuned(workdir)
  with jax.default_matmul_precision("highest"):
    starts, ends = (np.asarray(x) for x in ours(*arrays))
  real = arrays[2] == 1  # padding positions are nobody's answer (transformers masks their rows)
  np.testing.assert_allclose(starts[real], out.start_logits.numpy()[real], atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(ends[real], out.end_logits.numpy()[real], atol=TOLERANCE, rtol=0)


def test_a_regression_exports_with_one_output_and_problem_type_regression(count_run):
  _, workdir, _ = count_run
  folder = _export(workdir)
  hf_config = json.loads((folder / "config.json").read_text())
  assert hf_config["problem_type"] == "regression" and hf_config["id2label"] == {"0": "LABEL_0"}
  model, info = transformers.BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_labels == 1
  tokens, arrays = _batch(transformers.AutoTokenizer.from_pretrained(folder), ["river songs"], ["river"])
  with torch.no_grad():
    expected = model.eval()(**tokens).logits.numpy()
  ours, _, _ = load.load_finetuned(workdir)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(ours(*arrays)), expected, atol=TOLERANCE, rtol=0)


def test_a_fine_tune_run_is_not_a_pretrained_model(pair_run):
  _, workdir, _ = pair_run
  with pytest.raises(BertjaxError, match="is a fine-tuning run: load it with bertjax.hf.load.load_finetuned"):
    load.from_pretrained(workdir)
