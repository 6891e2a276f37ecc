"""SQuAD questions and the windows the model reads them in.

    read_questions(config, split)            SQuAD v1.1 / v2.0 JSON, or hf:rajpurkar/squad(_v2)
    windows(questions, tokenizer, ...)       [CLS] question [SEP] context window [SEP] features

A context longer than a window is read in several, `doc_stride` tokens apart (google-research/
bert's run_squad.py): an answer cut by the end of one window lies whole in a later one. Tokens
carry their character span in the context (`Tokenizer.encode_with_offsets`), so a predicted span
maps back to the context's own characters; `max_context` marks, for each token, whether this
window is the one that sees it with the most context on both sides (only there may an answer
start, as in run_squad.py). Training labels are the token positions of the answer, or [CLS] (0)
when the window does not hold the whole answer or the question has none (SQuAD 2.0).
"""

import dataclasses
import json
import logging

import numpy as np
from etils import epath

from bertjax.errors import BertjaxError
from bertjax.finetune.sources import quiet_datasets

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Question:
  """One SQuAD question with its context and gold answers."""

  id: str
  question: str
  context: str
  answers: tuple[str, ...]  # gold texts (SQuAD dev has several; none: unanswerable)
  answer_starts: tuple[int, ...]  # their character offsets in the context


def _from_squad_json(path: epath.Path) -> list[Question]:
  """The questions of a SQuAD v1.1 / v2.0 file. A question is unanswerable when its `answers` are
  empty, as the official evaluation scripts decide (not by `is_impossible`)."""
  try:
    articles = json.loads(path.read_bytes().decode("utf-8"))["data"]
  except UnicodeDecodeError as e:
    raise BertjaxError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
  except (ValueError, KeyError, TypeError) as e:
    raise BertjaxError(
      f"{path} is not a SQuAD JSON file ({type(e).__name__}: {e}); give train-v1.1.json etc."
    ) from None
  questions = []
  for a, article in enumerate(articles):
    for p, paragraph in enumerate(_field(article, "paragraphs", path, f"article {a}")):
      where = f"article {a} paragraph {p}"
      context = _field(paragraph, "context", path, where)
      for q, qa in enumerate(_field(paragraph, "qas", path, where)):
        questions.append(
          _question(qa, context, path, f"{where} question {qa.get('id', q) if isinstance(qa, dict) else q}")
        )
  return questions


def _field(record, key: str, path, where: str):
  if not isinstance(record, dict) or key not in record:
    raise BertjaxError(f"{path}: {where} has no {key!r}; give a SQuAD-format file (data/paragraphs/qas)")
  return record[key]


def _question(qa, context: str, path, where: str) -> Question:
  question, answers = _field(qa, "question", path, where), qa.get("answers", [])
  try:
    starts = tuple(int(answer["answer_start"]) for answer in answers)
    texts = tuple(str(answer["text"]) for answer in answers)
  except (KeyError, TypeError, ValueError) as e:
    raise BertjaxError(
      f"{path}: {where} has an answer without a whole-number answer_start and a text ({type(e).__name__}: {e}); "
      'give each answer {"text": ..., "answer_start": CHARACTER_OFFSET}'
    ) from None
  return Question(str(_field(qa, "id", path, where)), str(question), str(context), texts, starts)


def _from_hf(name: str, conf: str, split: str, cache_dir: str | None) -> list[Question]:
  import datasets  # heavy: only reading data needs it

  try:
    with quiet_datasets():
      ds = datasets.load_dataset(name, conf or None, split=split, cache_dir=cache_dir)
  except Exception as e:  # the hub raises many kinds; all mean "cannot get this split"
    raise BertjaxError(
      f"finetune.data=hf:{name} split {split!r} could not be loaded ({type(e).__name__}): "
      "check the name, the split names (finetune.train_split, dev_split) and the network"
    ) from None
  missing = {"id", "question", "context", "answers"} - set(ds.column_names)
  if missing:
    raise BertjaxError(f"hf:{name} {split} lacks the SQuAD columns {sorted(missing)}: give a SQuAD-format dataset")
  return [
    Question(
      str(r["id"]), r["question"], r["context"], tuple(r["answers"]["text"]), tuple(r["answers"]["answer_start"])
    )
    for r in ds
  ]


def read_questions(config, split: str) -> tuple[str, list[Question]]:
  """(source, questions) of the train or dev split; refuses an empty split and, without
  finetune.squad_v2, unanswerable questions."""
  f = config.finetune
  if f.data.startswith("hf:"):
    name, _, conf = f.data.removeprefix("hf:").partition(":")
    hf_split = f.train_split if split == "train" else f.dev_split
    cache_dir = str(epath.Path(config.data.cache_dir) / "datasets") if config.data.cache_dir else None
    source, questions = f"{f.data}:{hf_split}", _from_hf(name, conf, hf_split, cache_dir)
  else:
    source = f.train_file if split == "train" else f.dev_file
    path = epath.Path(source)
    if not path.exists():
      raise BertjaxError(f"finetune.{split}_file={source} does not exist: give a SQuAD .json file")
    questions = _from_squad_json(path)
  if not questions:
    raise BertjaxError(f"{source} holds no questions: give a split with at least one")
  if not f.squad_v2 and any(not q.answers for q in questions):
    raise BertjaxError(
      f"{source} has unanswerable questions (SQuAD 2.0): set finetune.squad_v2=true (configs/finetune/squad_v2.py)"
    )
  return source, questions


def answerable_in_context(questions: list[Question], source: str) -> list[Question]:
  """The training questions whose (first) answer is where it says it is in its context; the
  others are counted, reported once, and skipped (google-research/bert skips them too)."""
  kept = [q for q in questions if not q.answers or _answer_in_context(q)]
  if any(q.answers for q in questions) and not any(q.answers for q in kept):
    raise BertjaxError(
      f"{source}: no answer is in its context at its answer_start (the file would train on unanswerable "
      "questions alone); check the answer_start offsets (characters into the context, from 0)"
    )
  if len(kept) < len(questions):
    log.warning(
      "%s: %d of %d questions have an answer that is not in their context at its answer_start; skipped them",
      source,
      len(questions) - len(kept),
      len(questions),
    )
  if not kept:
    raise BertjaxError(f"{source}: no question's answer is in its context; check the answer_start offsets")
  return kept


def _answer_in_context(q: Question) -> bool:
  start = q.answer_starts[0]
  return start >= 0 and q.context[start : start + len(q.answers[0])] == q.answers[0] and bool(q.answers[0].strip())


def _spans(n_tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
  """(start, length) of each window over `n_tokens` context tokens (run_squad.py's doc spans)."""
  spans, start = [], 0
  while True:
    length = min(n_tokens - start, room)
    spans.append((start, length))
    if start + length >= n_tokens:
      return spans
    start += min(length, stride)


def _max_context(spans: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
  """[token] -> the window that sees it with the most context: max over windows of
  min(left, right) + 0.01 * window length (run_squad.py's _check_is_max_context)."""
  best = np.full(n_tokens, -1)
  best_score = np.full(n_tokens, -np.inf)
  for w, (start, length) in enumerate(spans):
    positions = np.arange(start, start + length)
    score = np.minimum(positions - start, start + length - 1 - positions) + 0.01 * length
    better = score > best_score[positions]
    best[positions[better]], best_score[positions[better]] = w, score[better]
  return best


def _token_span(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int] | None:
  """First and last context token overlapping [start_char, end_char)."""
  overlapping = np.flatnonzero((offsets[:, 1] > start_char) & (offsets[:, 0] < end_char))
  return (int(overlapping[0]), int(overlapping[-1])) if len(overlapping) else None


def windows(
  questions: list[Question],
  tokenizer,
  max_seq_len: int,
  doc_stride: int,
  max_query_len: int,
  with_labels: bool,
) -> dict[str, np.ndarray]:
  """Every question's windows as features: input_ids, segment_ids, attention_mask [F, L];
  example_index [F]; offsets [F, L, 2] (character span in the context, -1 outside it);
  max_context [F, L]; with labels, start_positions and end_positions [F].

  Args:
    questions: the questions; `example_index` gives each window's position in this list.
    tokenizer: the run's tokenizer (`encode_with_offsets` for the contexts).
    max_seq_len: L, the window length in tokens.
    doc_stride: tokens between the starts of consecutive windows of one context.
    max_query_len: questions are cut to this many tokens.
    with_labels: add the first answer's token positions, or 0 ([CLS]) where a window does not hold it
      whole or the question has none.
  Returns:
    int32 arrays, except bool `max_context`.
  """
  queries = tokenizer.encode_batch([q.question for q in questions])
  contexts = sorted({q.context for q in questions})
  encoded = dict(zip(contexts, tokenizer.encode_with_offsets(contexts)))
  rows: dict[str, list] = {k: [] for k in ("input_ids", "segment_ids", "example_index", "offsets", "max_context")}
  starts, ends = [], []
  for i, (q, query) in enumerate(zip(questions, queries)):
    query = query[:max_query_len]
    ids, char_spans = encoded[q.context]
    offsets = np.asarray(char_spans, np.int32).reshape(-1, 2)
    room = max_seq_len - len(query) - 3
    spans = _spans(len(ids), room, doc_stride)
    best = _max_context(spans, len(ids))
    answer = _token_span(offsets, q.answer_starts[0], q.answer_starts[0] + len(q.answers[0])) if q.answers else None
    first = len(query) + 2  # the position of the window's first context token
    for w, (start, length) in enumerate(spans):
      row = [tokenizer.cls_id, *query, tokenizer.sep_id, *ids[start : start + length], tokenizer.sep_id]
      window_offsets = np.full((max_seq_len, 2), -1, np.int32)
      window_offsets[first : first + length] = offsets[start : start + length]
      window_best = np.zeros(max_seq_len, bool)
      window_best[first : first + length] = best[start : start + length] == w
      rows["input_ids"].append(row)
      rows["segment_ids"].append((first, len(row)))
      rows["example_index"].append(i)
      rows["offsets"].append(window_offsets)
      rows["max_context"].append(window_best)
      inside = answer is not None and start <= answer[0] and answer[1] < start + length
      starts.append(answer[0] - start + first if inside else 0)
      ends.append(answer[1] - start + first if inside else 0)
  return _as_arrays(rows, starts, ends, tokenizer.pad_id, max_seq_len, with_labels)


def _as_arrays(rows, starts, ends, pad_id: int, max_seq_len: int, with_labels: bool) -> dict[str, np.ndarray]:
  n = len(rows["input_ids"])
  ids_FxL = np.full((n, max_seq_len), pad_id, np.int32)
  segments_FxL = np.zeros((n, max_seq_len), np.int32)
  mask_FxL = np.zeros((n, max_seq_len), np.int32)
  for f, (row, (second, end)) in enumerate(zip(rows["input_ids"], rows["segment_ids"])):
    ids_FxL[f, : len(row)] = row
    segments_FxL[f, second:end] = 1
    mask_FxL[f, : len(row)] = 1
  features = {
    "input_ids": ids_FxL,
    "segment_ids": segments_FxL,
    "attention_mask": mask_FxL,
    "example_index": np.asarray(rows["example_index"], np.int32),
    "offsets": np.stack(rows["offsets"]),
    "max_context": np.stack(rows["max_context"]),
  }
  if with_labels:
    features["start_positions"] = np.asarray(starts, np.int32)
    features["end_positions"] = np.asarray(ends, np.int32)
  return features
