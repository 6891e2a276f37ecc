"""Reading classification data: every GLUE task's folder layout, local files, local hf: folders,
BERT's truncation and input layout, and every bad input as one line naming the file and the fix.

The GLUE files are written here with the header lines and columns of the distributed GLUE data,
quotes and words like "nan" included (read verbatim, as google-research/bert reads them).
"""

import json
import re

import numpy as np
import pytest

from bertjax import tasks
from bertjax.config import loading
from bertjax.errors import BertjaxError
from bertjax.finetune import features, sources
from tests.support.finetune import write_glue_files, write_jsonl

TEXTS = ['He said "yes" and left.', "nan", "null", "It's 5' 10\" tall"]


def _rows(task: tasks.GlueTask, count: int, offset: int):
  """(first, second, TSV label, class id or value) per row."""
  out = []
  for i in range(count):
    first, second = TEXTS[(i + offset) % len(TEXTS)], f"second {i + offset}"
    if task.regression:
      value = f"{(i + offset) % 6 * 0.8:.3f}"
      out.append((first, second, value, float(value)))
    else:
      k = (i + offset) % len(task.labels)
      out.append((first, second, task.tsv_labels[k], k))
  return out


def write_glue_task(root, name: str, train: int = 5, dev: int = 3) -> dict[str, list]:
  """TASK/train.tsv and its dev files with a few rows each; returns the rows written."""
  task = tasks.GLUE[name]
  files = ["train.tsv", *task.dev_files.values()]
  rows = {file: _rows(task, train if file == "train.tsv" else dev, 10 * i) for i, file in enumerate(files)}
  write_glue_files(root, name, {file: [r[:3] for r in file_rows] for file, file_rows in rows.items()})
  return rows


def _config(*overrides, task="classification"):
  base = ["finetune.init=/nowhere", f"finetune.task={task}"]
  return loading.load_config("configs/finetune/classification.py", base + list(overrides))


@pytest.mark.parametrize("name", list(tasks.GLUE))
def test_every_glue_task_reads_its_own_columns(name, tmp_path):
  written = write_glue_task(tmp_path, name)
  task = tasks.GLUE[name]
  data = sources.read_classification(_config(f"finetune.glue_task={name}", f"finetune.data={tmp_path}"))
  assert data.spec.dev_splits == tuple(task.dev_files)
  splits = {"train.tsv": data.train, **{task.dev_files[s]: data.dev[s] for s in task.dev_files}}
  for file, examples in splits.items():
    rows = written[file]
    assert examples.texts == [r[0] for r in rows], file
    assert examples.pairs == (None if task.pair is None else [r[1] for r in rows])
    np.testing.assert_allclose(examples.labels, [r[3] for r in rows])
    assert examples.labels.dtype == (np.float32 if task.regression else np.int32)
    assert examples.source.endswith(f"{task.folder}/{file}")


def test_a_glue_task_folder_may_be_named_directly(tmp_path):
  write_glue_task(tmp_path, "rte")
  data = sources.read_classification(_config("finetune.glue_task=rte", f"finetune.data={tmp_path}/RTE"))
  assert len(data.train.texts) == 5


def test_glue_metrics_and_split_names():
  assert tasks.metric_names(tasks.glue_spec("mnli")) == ["accuracy_matched", "accuracy_mismatched"]
  assert tasks.metric_names(tasks.glue_spec("mrpc")) == ["f1", "accuracy"]
  assert tasks.glue_spec("stsb").regression and tasks.glue_spec("stsb").num_outputs == 1
  assert tasks.glue_spec("cola").metrics == ("matthews",)


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv"])
def test_local_files_with_configurable_columns(suffix, tmp_path):
  rows = [{"q": 'a "quoted" text', "r": "nan", "y": "pos"}, {"q": "second", "r": "other", "y": "neg"}]
  for split in ("train", "dev"):
    path = tmp_path / f"{split}.{suffix}"
    if suffix == "jsonl":
      path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "csv":
      path.write_text('q,r,y\n"a ""quoted"" text",nan,pos\nsecond,other,neg\n')
    else:
      path.write_text('q\tr\ty\na "quoted" text\tnan\tpos\nsecond\tother\tneg\n')
  config = _config(
    f"finetune.train_file={tmp_path}/train.{suffix}",
    f"finetune.dev_file={tmp_path}/dev.{suffix}",
    "finetune.text_column=q",
    "finetune.text_pair_column=r",
    "finetune.label_column=y",
    "finetune.labels=neg,pos",
  )
  data = sources.read_classification(config)
  assert data.train.texts == ['a "quoted" text', "second"]
  assert data.train.pairs == ["nan", "other"]
  assert data.dev["dev"].labels.tolist() == [1, 0]


def test_a_file_without_the_pair_column_holds_single_sentences(tmp_path):
  for split in ("train", "dev"):
    (tmp_path / f"{split}.jsonl").write_text(json.dumps({"text": "one", "label": 0.5}) + "\n")
  config = _config(
    f"finetune.train_file={tmp_path}/train.jsonl", f"finetune.dev_file={tmp_path}/dev.jsonl", "finetune.regression=true"
  )
  data = sources.read_classification(config)
  assert data.train.pairs is None and data.train.labels.tolist() == [0.5]
  assert data.spec.metrics == ("pearson", "spearman")


def test_a_local_hf_folder_names_its_classes_with_its_classlabel(tmp_path):
  import datasets

  features = datasets.Features(
    {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
  )
  for split, labels in (("train", [0, 1, 1]), ("validation", [1, 0])):
    ds = datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in labels], "label": labels}, features=features)
    ds.to_parquet(str(tmp_path / "hub" / f"{split}.parquet"))
  config = _config(
    f"finetune.data=hf:{tmp_path}/hub", "finetune.text_column=sentence", f"data.cache_dir={tmp_path}/cache"
  )
  data = sources.read_classification(config)
  assert data.spec.labels == ("negative", "positive")
  assert data.train.labels.tolist() == [0, 1, 1] and data.dev["dev"].labels.tolist() == [1, 0]
  glue = sources.read_classification(
    _config(f"finetune.data=hf:{tmp_path}/hub", "finetune.glue_task=sst2", f"data.cache_dir={tmp_path}/cache")
  )
  assert glue.train.texts == ["s0", "s1", "s1"] and glue.dev["dev"].labels.tolist() == [1, 0]


# -- bad input: one line naming the file and the fix ------------------------------------------------
def _jsonl_config(tmp_path, train_rows, dev_rows, *extra):
  for split, rows in (("train", train_rows), ("dev", dev_rows)):
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return _config(
    f"finetune.train_file={tmp_path}/train.jsonl",
    f"finetune.dev_file={tmp_path}/dev.jsonl",
    "finetune.labels=no,yes",
    *extra,
  )


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_a_label_outside_the_declared_classes(tmp_path):
  rows = [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}]
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(_jsonl_config(tmp_path, rows, rows[:1]))
  message = _one_line(e)
  assert f"{tmp_path}/train.jsonl line 2" in message and "'maybe'" in message and "no, yes" in message
  assert "finetune.labels" in message


def test_a_glue_label_outside_the_task_names_the_line(tmp_path):
  write_glue_task(tmp_path, "sst2")
  path = tmp_path / "SST-2" / "dev.tsv"
  path.write_text(path.read_text() + "odd one\t7\n")
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(_config("finetune.glue_task=sst2", f"finetune.data={tmp_path}"))
  assert f"{path} line 5: label '7' is not one of sst2's classes (0, 1)" in _one_line(e)


def test_a_missing_column(tmp_path):
  rows = [{"sentence": "a", "label": "yes"}]
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(_jsonl_config(tmp_path, rows, rows))
  assert "has no column 'text' (it has sentence, label): set finetune.text_column" in _one_line(e)


def test_a_dev_file_without_the_pair_column_the_train_file_has(tmp_path):
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(
      _jsonl_config(tmp_path, [{"text": "a", "text_pair": "b", "label": "no"}], [{"text": "a", "label": "no"}])
    )
  assert f"{tmp_path}/dev.jsonl has no column 'text_pair'" in _one_line(e)


@pytest.mark.parametrize("empty", ["train", "dev"])
def test_an_empty_split(empty, tmp_path):
  rows = [{"text": "a", "label": "no"}]
  config = _jsonl_config(tmp_path, [] if empty == "train" else rows, [] if empty == "dev" else rows)
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(config)
  assert f"{tmp_path}/{empty}.jsonl holds no examples" in _one_line(e)


def test_an_empty_glue_split(tmp_path):
  write_glue_task(tmp_path, "mrpc")
  (tmp_path / "MRPC" / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(_config("finetune.glue_task=mrpc", f"finetune.data={tmp_path}"))
  assert "MRPC/dev.tsv holds no examples" in _one_line(e)


def test_a_glue_folder_without_the_task(tmp_path):
  write_glue_task(tmp_path, "sst2")
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(_config("finetune.glue_task=cola", f"finetune.data={tmp_path}"))
  message = _one_line(e)
  assert f"GLUE folder {tmp_path} holds no CoLA/ (task cola)" in message and "point finetune.data" in message


def test_a_squad_file_given_to_classification(tmp_path):
  (tmp_path / "train.json").write_text("{}")
  config = _config(
    f"finetune.train_file={tmp_path}/train.json", f"finetune.dev_file={tmp_path}/train.json", "finetune.labels=a,b"
  )
  with pytest.raises(BertjaxError, match="a SQuAD .json is for --task qa"):
    sources.read_classification(config)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["finetune.glue_task=sts", "finetune.data=/g"], "finetune.glue_task='sts' is not a GLUE task"),
    (["finetune.train_file=a.jsonl", "finetune.dev_file=b.jsonl"], "finetune.labels='' declares 0 class(es)"),
    (["finetune.data=/glue"], "set finetune.glue_task for a GLUE folder"),
    (["finetune.glue_task=sst2", "finetune.data=/g", "finetune.max_seq_len=1024"], "exceeds model.max_position"),
    (["finetune.data=hf:x", "finetune.labels=a,a"], "lists a class twice"),
  ],
)
def test_config_checks_are_one_line(overrides, message):
  with pytest.raises(BertjaxError, match=re.escape(message)):
    _config(*overrides)


# -- BERT's input layout --------------------------------------------------------------------------
def _google_truncate(len_a, len_b, budget):
  a, b = [0] * len_a, [0] * len_b
  while len(a) + len(b) > budget:
    (a if len(a) > len(b) else b).pop()
  return len(a), len(b)


def test_longest_first_truncation_is_google_researchs():
  for len_a in range(0, 12):
    for len_b in range(0, 12):
      for budget in range(0, 14):
        assert features.truncate_pair(len_a, len_b, budget) == _google_truncate(len_a, len_b, budget)


class _Chars:
  """A stand-in tokenizer: one token per character (ids = code points)."""

  pad_id, cls_id, sep_id = 0, 2, 3

  def encode_batch(self, texts):
    return [[ord(c) for c in t] for t in texts]


def test_pairs_are_cls_a_sep_b_sep_with_segments_and_padding():
  examples = sources.Examples("x", ["abcdefg", "ab"], ["xyz", "q"], np.array([1, 0], np.int32))
  out = features.encode_classification(examples, _Chars(), max_seq_len=9)
  a, b, x, y, z, q = (ord(c) for c in "abxyzq")
  # 7 + 3 tokens into 9 - 3 = 6: the longer one down to 3.
  assert features.truncate_pair(7, 3, 6) == (3, 3)
  assert out["input_ids"][0].tolist() == [2, a, b, ord("c"), 3, x, y, z, 3]
  assert out["segment_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
  assert out["input_ids"][1].tolist() == [2, a, b, 3, q, 3, 0, 0, 0]
  assert out["segment_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]
  assert out["attention_mask"][1].tolist() == [1] * 6 + [0] * 3
  single = sources.Examples("x", ["abcdefghij"], None, np.array([1], np.int32))
  assert features.encode_classification(single, _Chars(), 5)["input_ids"][0].tolist() == [2, a, b, ord("c"), 3]


def test_the_train_order_is_a_function_of_seed_and_step_and_pads_the_last_batch():
  order = features.TrainOrder(10, 4, seed=3)
  assert order.steps_per_epoch == 3
  epoch = np.concatenate([order.rows(s) for s in range(3)])
  assert sorted(epoch[epoch >= 0].tolist()) == list(range(10)) and (epoch[-2:] == -1).all()
  assert np.array_equal(features.TrainOrder(10, 4, seed=3).rows(4), order.rows(4))
  assert not np.array_equal(order.rows(3), order.rows(0))  # each epoch its own permutation
  batch = features.take({"x": np.arange(10) * 10}, np.array([3, -1]))
  assert batch["x"].tolist() == [30, 0] and batch["weights"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
  ("name", "content", "said"),
  [
    ("train.jsonl", b'{"text": "a", "label": "no"}\n{"text": "caf\xe9", "label": "no"}\n', "line 2 is not UTF-8 text"),
    ("train.csv", b"text,label\ncaf\xe9,no\n", "line 2 is not UTF-8 text"),
    ("train.jsonl", b"\n\n  \n", "holds no examples"),
    ("train.csv", b"text,label\n", "holds no examples"),
    ("train.tsv", b"text\tlabel\n\n", "holds no examples"),
  ],
)
def test_a_file_that_is_not_utf8_or_holds_no_examples_is_one_line_naming_it(name, content, said, tmp_path):
  (tmp_path / name).write_bytes(content)
  write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "label": "no"}])
  config = _config(
    f"finetune.train_file={tmp_path / name}", f"finetune.dev_file={tmp_path}/dev.jsonl", "finetune.labels=no,yes"
  )
  with pytest.raises(BertjaxError) as e:
    sources.read_classification(config)
  assert _one_line(e).startswith(f"{tmp_path / name} ") and said in _one_line(e)
