"""Multiple choice (SWAG): SWAG's CSV and .jsonl read alike, each choice as [CLS] context [SEP] start
ending [SEP] in a [B, C, L] batch, bad rows named by file and line, and the choice task of
tests/support/finetune_families.py learned and exported to
transformers' BertForMultipleChoice with bertjax's logits (its eval and resume: test_families.py)."""

import json

import jax
import numpy as np
import pytest

from bertjax.cli import main as cli
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune import choice, job
from bertjax.metrics import writer
from tests.support.finetune_families import SWAG_HEADER, write_swag

TOLERANCE = 1e-4  # what the export promises (tests/finetune/test_export.py)
ROWS = [
  {"context": "river play", "start": "the mill", "endings": ["songs", "maps", "stars talk", "bread"], "label": 2},
  {"context": "people talk", "start": "", "endings": ["a", "b", "c", "d"], "label": 0},
]


def test_swag_csv_and_jsonl_read_alike(tmp_path):
  write_swag(tmp_path / "val.csv", ROWS)
  (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  for name in ("val.csv", "val.jsonl"):
    examples = choice.read_examples(tmp_path / name)
    assert examples.contexts == ["river play", "people talk"]
    assert examples.choices == [
      ["the mill songs", "the mill maps", "the mill stars talk", "the mill bread"],
      list("abcd"),
    ]
    assert examples.labels.tolist() == [2, 0]
  assert choice.read_examples(tmp_path / "val.csv").wheres == [f"{tmp_path / 'val.csv'} line {n}" for n in (2, 3)]


def test_each_choice_is_a_pair_in_a_b_c_l_batch(pretrained, tmp_path):
  tokenizer = tokenizer_lib.load_tokenizer(pretrained / "tokenizer")
  write_swag(tmp_path / "val.csv", ROWS)
  features = choice.encode_choices(choice.read_examples(tmp_path / "val.csv"), tokenizer, 12)
  assert features["input_ids"].shape == features["segment_ids"].shape == (2, 4, 12)
  context, second = tokenizer.encode("river play"), tokenizer.encode("the mill stars talk")
  row = [tokenizer.cls_id, *context, tokenizer.sep_id, *second, tokenizer.sep_id]
  assert features["input_ids"][0, 2, : len(row)].tolist() == row
  assert features["segment_ids"][0, 2, : len(row)].tolist() == [0] * (len(context) + 2) + [1] * (len(second) + 1)
  assert features["attention_mask"][0, 2].sum() == len(row) and features["labels"].tolist() == [2, 0]
  short = choice.encode_choices(choice.read_examples(tmp_path / "val.csv"), tokenizer, 5)  # longest first
  assert short["input_ids"][0, 2].tolist()[0] == tokenizer.cls_id and short["attention_mask"][0, 2].sum() == 5


def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, pretrained, family_files, capsys):
  bad = tmp_path / "train.csv"
  write_swag(bad, [ROWS[0], {**ROWS[1], "label": 4}])
  with pytest.raises(BertjaxError, match=f"^{bad} line 3: label '4' is not one of the 4 choices \\(0-3\\)"):
    choice.read_examples(bad)
  ragged = tmp_path / "train.jsonl"
  ragged.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "endings": ["a", "b", "c"]}) + "\n")
  with pytest.raises(BertjaxError, match=f"^{ragged} line 2: 3 choices, where the run's examples have 4"):
    choice.read_examples(ragged)
  columns = tmp_path / "columns.csv"
  columns.write_text(",".join(h for h in SWAG_HEADER if h != "sent2") + "\n")
  with pytest.raises(BertjaxError, match=f"^{columns} has no column 'sent2'"):
    choice.read_examples(columns)
  args = ["finetune", "--task", "multiple_choice", "--config", "configs/finetune/swag.py", "--init", str(pretrained)]
  args += ["--workdir", str(tmp_path / "run"), f"--config.finetune.train_file={bad}"]
  args += [f"--config.finetune.dev_file={family_files}/choice-dev.jsonl", "--config.finetune.max_seq_len=16"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f"bertjax: error: {bad} line 3: label '4' is not one of the 4 choices (0-3); correct or remove that example"
  ]
  assert not (tmp_path / "run").exists()


def test_the_choice_task_is_learned(choice_run):
  _, workdir, result = choice_run
  assert result.final["accuracy"] >= 0.9, result.final  # chance: 0.25
  evals = [r for r in writer.read_metrics(workdir) if r["split"] == "eval"]
  assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0] and evals[-1]["accuracy"] == result.final["accuracy"]
  train = [r for r in writer.read_metrics(workdir) if r["split"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"] and "accuracy" in train[-1]
  results = json.loads((workdir / job.RESULTS_FILE).read_text())
  assert results == {"step": result.state.step, "task": "multiple_choice", **result.final}


def test_the_choice_scorer_exports_as_bert_for_multiple_choice(choice_run, whole_words):
  from tests.support.extras import require

  torch, transformers = require("torch"), require("transformers")
  from bertjax.hf import load

  _, workdir, _ = choice_run
  assert cli.main(["export", "--workdir", str(workdir), "--format", "hf"]) == 0
  folder = workdir / "export" / "hf"
  assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForMultipleChoice"]
  model, info = transformers.BertForMultipleChoice.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  contexts = [" ".join(whole_words[1:4])] * 3 + [whole_words[0]] * 3
  held = (whole_words[0], whole_words[6], whole_words[7], whole_words[2], whole_words[0], whole_words[3])
  endings = [f"{whole_words[5]} {w}" for w in held]  # example 0's right ending is choice 0, example 1's choice 1
  tokens = hf_tokenizer(contexts, endings, return_tensors="pt", padding=True)
  tokens = {k: v.reshape(2, 3, -1) for k, v in tokens.items()}  # [B=2, C=3, L]
  arrays = tuple(tokens[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask"))
  with torch.no_grad():
    expected = model.eval()(**tokens).logits.numpy()
  ours, _, _ = load.load_finetuned(workdir)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(*arrays))
  assert got.shape == expected.shape == (2, 3)
  np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
  assert got.argmax(-1).tolist() == [0, 1]  # the ending holding the key word wins
