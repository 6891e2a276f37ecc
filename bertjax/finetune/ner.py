"""The token-classification (NER) family: tagged sentences, a tag for each word's first sub-token.

    read_sentences(path, scheme)        CoNLL-2003 columns or .jsonl tokens/tags -> Sentence list
    tag_set(declared, train)            finetune.labels, or the train tags in first-seen order, O first
    encode_sentences(sentences, ...)    [CLS] word pieces [SEP] with tag ids on first sub-tokens
    FAMILY                              prepare (the two files) and score (conlleval, `entities`)

Files: CoNLL-2003's column format (a token per line, its tag in the last column, a blank line
between sentences, `-DOCSTART-` lines skipped), or `.jsonl` rows {"tokens": [...], "tags": [...]}.
Tags are O, B-TYPE or I-TYPE, in IOB1 or IOB2; every sentence's entities (conlleval's reading,
`entities.chunks`) are re-tagged in `finetune.tag_scheme`, the tags the model learns. As in the
BERT paper, a word's tag goes on its first sub-token; its other sub-tokens, [CLS], [SEP] and
padding weigh 0 in the loss and are not read back. A sentence longer than `finetune.max_seq_len`
keeps the whole words that fit; the words cut are counted and reported once per file, and score
as predicted O.
"""

import dataclasses
import json
import logging

import numpy as np
from etils import epath

from bertjax import tasks
from bertjax.errors import BertjaxError
from bertjax.finetune import entities
from bertjax.finetune.family import Data, Family, mean_loss

log = logging.getLogger(__name__)
DOCSTART = "-DOCSTART-"


@dataclasses.dataclass(frozen=True)
class Sentence:
  """A sentence's words and their tags, and where it starts (messages name it)."""

  words: tuple[str, ...]
  tags: tuple[str, ...]
  where: str  # "FILE line N"


def _conll(path: str, lines: list[str]) -> list[tuple[list[str], list[str], str]]:
  """(words, tags, where) per sentence of a CoNLL column file."""
  sentences, words, tags, where = [], [], [], ""
  for number, line in enumerate(lines, start=1):
    columns = line.split()
    if not columns or columns[0] == DOCSTART:
      if words:
        sentences.append((words, tags, where))
      words, tags = [], []
      continue
    if len(columns) < 2:
      raise BertjaxError(
        f"{path} line {number}: {line.strip()!r} has no tag; a CoNLL line is TOKEN ... TAG (the tag in the "
        "last column): add its tag, or leave the line blank between sentences"
      )
    where = where if words else f"{path} line {number}"
    words.append(columns[0])
    tags.append(columns[-1])
  if words:
    sentences.append((words, tags, where))
  return sentences


def _jsonl(path: str, lines: list[str]) -> list[tuple[list[str], list[str], str]]:
  """(words, tags, where) per row of a .jsonl file of {"tokens": [...], "tags": [...]}."""
  sentences = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    try:
      row = json.loads(line)
      words, tags = row["tokens"], row["tags"]
    except (ValueError, KeyError, TypeError):
      raise BertjaxError(f'{where}: not a JSON object with "tokens" and "tags" lists; fix that line') from None
    if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
      raise BertjaxError(
        f"{where}: {_count(words)} tokens but {_count(tags)} tags; give one tag per token (two lists of one length)"
      )
    if words:
      sentences.append(([str(w) for w in words], [str(t) for t in tags], where))
  return sentences


def _count(value) -> str:
  return str(len(value)) if isinstance(value, list) else "not a list of"


def _check_iob(tags: list[str], where: str) -> None:
  for tag in tags:
    prefix, kind = entities.split_tag(tag)
    if tag != "O" and not (prefix in ("B", "I") and kind):
      raise BertjaxError(
        f"{where}: tag {tag!r} is neither O nor B-TYPE / I-TYPE; give IOB1 or IOB2 entity tags (as CoNLL-2003)"
      )


def read_sentences(path, scheme: str) -> list[Sentence]:
  """A tagged file's sentences, their tags re-tagged in `scheme` (iob2 | iob1).

  Raises:
    BertjaxError: the file is missing or empty, a CoNLL line has no tag, a .jsonl row's tokens
      and tags differ in length, or a tag is not an IOB tag; naming the file and line.
  """
  file = epath.Path(path)
  if not file.exists():
    raise BertjaxError(f"{path} does not exist: give a CoNLL column file or a .jsonl of tokens and tags")
  lines = file.read_text().splitlines()
  rows = _jsonl(str(path), lines) if file.suffix.lower() == ".jsonl" else _conll(str(path), lines)
  if not rows:
    raise BertjaxError(f"{path} holds no sentences: give a split with at least one")
  sentences = []
  for words, tags, where in rows:
    _check_iob(tags, where)
    sentences.append(Sentence(tuple(words), tuple(entities.to_scheme(tags, scheme)), where))
  return sentences


def tag_set(declared: tuple[str, ...], train: list[Sentence]) -> tuple[str, ...]:
  """The tags, in output order: `declared` (finetune.labels), or else the train file's in the
  order they first occur, with O first."""
  if declared:
    return declared
  seen = {"O": None}
  for sentence in train:
    seen.update(dict.fromkeys(sentence.tags))
  return tuple(seen)


def _tag_ids(sentence: Sentence, index: dict[str, int]) -> list[int]:
  missing = [t for t in sentence.tags if t not in index]
  if missing:
    raise BertjaxError(
      f"{sentence.where}: tag {missing[0]!r} is not one of the tags ({', '.join(index)}); declare every tag "
      "in finetune.labels, or correct that sentence"
    )
  return [index[t] for t in sentence.tags]


def encode_sentences(
  sentences: list[Sentence], tags: tuple[str, ...], tokenizer, max_seq_len: int
) -> tuple[dict[str, np.ndarray], int]:
  """`[CLS] pieces of each word [SEP]`, right-padded, with each word's tag id on its first piece.

  Args:
    sentences: the split's sentences.
    tags: the tag names, in output order.
    tokenizer: the run's tokenizer (a word it gives no piece becomes [UNK]).
    max_seq_len: L; a sentence keeps the whole words that fit in L - 2 pieces.
  Returns:
    (int32 `input_ids`, `segment_ids`, `attention_mask` and `tag_ids` [N, L], float32
    `label_weights` [N, L] (1 on each kept word's first piece, else 0), the number of words cut).
  """
  index = {t: i for i, t in enumerate(tags)}
  pieces = tokenizer.encode_batch([w for s in sentences for w in s.words])
  n = len(sentences)
  out = {k: np.zeros((n, max_seq_len), np.int32) for k in ("input_ids", "segment_ids", "attention_mask", "tag_ids")}
  out["input_ids"][:] = tokenizer.pad_id
  out["label_weights"] = np.zeros((n, max_seq_len), np.float32)
  cut, at = 0, 0
  for i, sentence in enumerate(sentences):
    row = [tokenizer.cls_id]
    for word_pieces, tag_id in zip(pieces[at : at + len(sentence.words)], _tag_ids(sentence, index), strict=True):
      word_pieces = word_pieces or [tokenizer.unk_id]
      if len(row) + len(word_pieces) > max_seq_len - 1:  # the rest of the sentence is cut
        cut += len(sentence.words) - int(out["label_weights"][i].sum())
        break
      out["tag_ids"][i, len(row)] = tag_id
      out["label_weights"][i, len(row)] = 1.0
      row.extend(word_pieces)
    at += len(sentence.words)
    row.append(tokenizer.sep_id)
    out["input_ids"][i, : len(row)] = row
    out["attention_mask"][i, : len(row)] = 1
  return out, cut


def _encoded(sentences: list[Sentence], tags, tokenizer, max_seq_len: int, source: str) -> dict[str, np.ndarray]:
  features, cut = encode_sentences(sentences, tags, tokenizer, max_seq_len)
  if cut:
    words = sum(len(s.words) for s in sentences)
    log.warning(
      "%s: %d of %d words cut (sentences longer than finetune.max_seq_len=%d); they score as O",
      source,
      cut,
      words,
      max_seq_len,
    )
  return features


def prepare(config, tokenizer, with_train: bool) -> Data:
  """The train file (read for its tags also without `with_train`, when finetune.labels is
  empty) and the dev file, as features; the dev sentences are the gold."""
  f = config.finetune
  spec = tasks.resolve(config)
  train = read_sentences(f.train_file, f.tag_scheme) if with_train or not spec.labels else []
  dev = read_sentences(f.dev_file, f.tag_scheme)
  spec = dataclasses.replace(spec, labels=tag_set(spec.labels, train))
  train_features = _encoded(train if with_train else [], spec.labels, tokenizer, f.max_seq_len, f.train_file)
  dev_features = _encoded(dev, spec.labels, tokenizer, f.max_seq_len, f.dev_file)
  return Data(spec, tokenizer, train_features, {"dev": dev_features}, {"dev": dev})


def predicted_tags(spec: tasks.TaskSpec, dev: dict[str, np.ndarray], tag_ids, sentences) -> list[list[str]]:
  """Each sentence's predicted tags: the argmax at each kept word's first piece; O for words cut."""
  out = []
  for i, sentence in enumerate(sentences):
    firsts = np.flatnonzero(dev["label_weights"][i])
    tags = [spec.labels[t] for t in tag_ids[i, firsts]]
    out.append(tags + ["O"] * (len(sentence.words) - len(tags)))
  return out


def score(config, spec, dev, sentences, outputs) -> tuple[dict[str, float], None]:
  """conlleval's precision, recall, F1 and token accuracy (percent) over the dev sentences, and the loss."""
  predicted = predicted_tags(spec, dev, outputs["predictions"], sentences)
  scores = entities.conlleval([s.tags for s in sentences], predicted)
  return {**scores, "loss": mean_loss(outputs)}, None


FAMILY = Family(prepare, score)
