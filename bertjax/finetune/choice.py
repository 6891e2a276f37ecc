"""The multiple-choice family (SWAG): a context and several endings, one of them right.

    read_examples(path)               SWAG's train.csv / val.csv, or .jsonl rows -> Examples
    encode_choices(examples, ...)     [B, C, L] features: [CLS] context [SEP] start ending [SEP]
    FAMILY                            prepare (the two files) and score (accuracy and loss)

SWAG's CSV layout is the official one: `video-id,fold-ind,startphrase,sent1,sent2,gold-source,
ending0,ending1,ending2,ending3,label`; the context is `sent1` and choice k is `sent2 + " " +
endingK`. A `.jsonl` row is {"context": ..., "start": ... (optional), "endings": [...], "label": k}.
Each choice is one sequence, truncated longest-first as a sentence pair (`features.truncate_pair`),
so a batch is [B, C, L]. Every example of a run has the same number of choices C, the train
file's (the dev file's when only it is read).
"""

import csv
import dataclasses
import io
import json

import numpy as np
from etils import epath

from bertjax import tasks
from bertjax.errors import BertjaxError
from bertjax.finetune import features
from bertjax.finetune.family import Data, Family, mean_loss

SWAG_COLUMNS = ("sent1", "sent2", "ending0", "ending1", "ending2", "ending3", "label")


@dataclasses.dataclass
class Examples:
  """One split: each example's context, its choices' texts (C each) and the right choice."""

  source: str
  contexts: list[str]
  choices: list[list[str]]  # [N][C]: the start and ending of each choice, joined by a space
  labels: np.ndarray  # [N] int32 choice ids
  wheres: list[str]  # "FILE line N" of each example


def _choice(start: str, ending: str) -> str:
  return f"{start} {ending}" if start else ending


def _label(value, count: int, where: str) -> int:
  try:
    label = int(str(value).strip())
  except ValueError:
    label = -1
  if not 0 <= label < count:
    raise BertjaxError(
      f"{where}: label {value!r} is not one of the {count} choices (0-{count - 1}); correct or remove that example"
    )
  return label


def _swag_rows(path: str, text: str):
  """(context, choices, label, where) per row of a SWAG CSV."""
  reader = csv.DictReader(io.StringIO(text))
  missing = [c for c in SWAG_COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise BertjaxError(
      f"{path} has no column {missing[0]!r}: a SWAG CSV has the header video-id,fold-ind,startphrase,sent1,sent2,"
      "gold-source,ending0,ending1,ending2,ending3,label (the official train.csv and val.csv)"
    )
  for row in reader:
    where = f"{path} line {reader.line_num}"
    choices = [_choice(row["sent2"], row[f"ending{k}"]) for k in range(4)]
    yield row["sent1"], choices, _label(row["label"], 4, where), where


def _jsonl_rows(path: str, text: str):
  """(context, choices, label, where) per row of a .jsonl file."""
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    try:
      row = json.loads(line)
      context, start, endings, label = row["context"], row.get("start") or "", row["endings"], row["label"]
    except (ValueError, KeyError, TypeError, AttributeError):
      raise BertjaxError(
        f'{where}: not a JSON object with "context", "endings" (a list) and "label" ("start" optional); fix that line'
      ) from None
    if not isinstance(endings, list) or len(endings) < 2:
      raise BertjaxError(f'{where}: "endings" must list at least two choices; fix that line')
    yield str(context), [_choice(str(start), str(e)) for e in endings], _label(label, len(endings), where), where


def read_examples(path, num_choices: int | None = None) -> Examples:
  """A multiple-choice file's examples; every one with `num_choices` choices (None: the first's).

  Raises:
    BertjaxError: the file is missing or empty, lacks SWAG's columns, a row's label is not one of
      its choices, or rows differ in their number of choices; naming the file and line.
  """
  file = epath.Path(path)
  if not file.exists():
    raise BertjaxError(f"{path} does not exist: give SWAG's train.csv / val.csv or a .jsonl of contexts and endings")
  rows = _jsonl_rows if file.suffix.lower() == ".jsonl" else _swag_rows
  examples = Examples(str(path), [], [], np.zeros(0, np.int32), [])
  labels = []
  for context, choices, label, where in rows(str(path), file.read_text()):
    num_choices = num_choices or len(choices)
    if len(choices) != num_choices:
      raise BertjaxError(
        f"{where}: {len(choices)} choices, where the run's examples have {num_choices}; give every example "
        "as many endings"
      )
    examples.contexts.append(context)
    examples.choices.append(choices)
    examples.wheres.append(where)
    labels.append(label)
  if not labels:
    raise BertjaxError(f"{path} holds no examples: give a split with at least one")
  examples.labels = np.asarray(labels, np.int32)
  return examples


def encode_choices(examples: Examples, tokenizer, max_seq_len: int) -> dict[str, np.ndarray]:
  """`[CLS] context [SEP] choice [SEP]` for every choice (segments 0 then 1), truncated
  longest-first to `max_seq_len` and right-padded.

  Returns:
    int32 `input_ids`, `segment_ids`, `attention_mask` [N, C, L] and `labels` [N].
  """
  n, c = len(examples.contexts), len(examples.choices[0]) if examples.choices else 0
  shape = (n, c, max_seq_len)
  ids, segments, mask = np.full(shape, tokenizer.pad_id, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  firsts = tokenizer.encode_batch(examples.contexts) if n else []
  seconds = tokenizer.encode_batch([text for choices in examples.choices for text in choices]) if n else []
  for i, a in enumerate(firsts):
    for k in range(c):
      b = seconds[i * c + k]
      len_a, len_b = features.truncate_pair(len(a), len(b), max_seq_len - 3)
      first = [tokenizer.cls_id, *a[:len_a], tokenizer.sep_id]
      row = [*first, *b[:len_b], tokenizer.sep_id]
      ids[i, k, : len(row)] = row
      segments[i, k, len(first) : len(row)] = 1
      mask[i, k, : len(row)] = 1
  return {"input_ids": ids, "segment_ids": segments, "attention_mask": mask, "labels": examples.labels}


def prepare(config, tokenizer, with_train: bool) -> Data:
  """The train file (unless not `with_train`) and the dev file as [N, C, L] features."""
  f = config.finetune
  train = read_examples(f.train_file) if with_train else None
  dev = read_examples(f.dev_file, len(train.choices[0]) if train else None)
  encode = lambda examples: encode_choices(examples, tokenizer, f.max_seq_len)
  train_features = encode(train) if train else {"input_ids": np.zeros((0, 0, f.max_seq_len), np.int32)}
  return Data(tasks.resolve(config), tokenizer, train_features, {"dev": encode(dev)})


def score(config, spec, dev, gold, outputs) -> tuple[dict[str, float], None]:
  """Accuracy (a fraction) of the highest-scoring choice, and the loss."""
  accuracy = float(np.mean(outputs["logits"].argmax(-1) == dev["labels"]))
  return {"accuracy": accuracy, "loss": mean_loss(outputs)}, None


FAMILY = Family(prepare, score)
