"""Entity-level scores of tagged sentences, as CoNLL's `conlleval` script computes them.

    split_tag(tag)                         "B-PER" -> ("B", "PER"); "O" -> ("O", "")
    chunks(tags)                           the (type, first, last) entities of one sentence
    to_scheme(tags, scheme)                the same entities written in IOB1 or IOB2
    conlleval(gold, predicted)             precision, recall, f1 and token accuracy, in percent

Chunk boundaries follow conlleval's startOfChunk/endOfChunk: a B- always starts an entity, an I-
starts one after O or after a token of another type (so IOB1, where I- starts an entity and B-
only separates two adjacent entities of one type, and IOB2, where every entity starts with B-,
are read by the same rules), and an entity ends before O, before a B-, or before a change of
type. An entity is correct when gold and prediction start and end at the same tokens with the
same type; precision is correct / predicted entities, recall correct / gold entities, F1 their
harmonic mean; accuracy counts tokens whose whole tag is right. Sentences are scored as if a
boundary line separated them (conlleval's -X- line): no entity crosses one. Values are percent,
as conlleval prints them.
"""

from collections.abc import Sequence


def split_tag(tag: str) -> tuple[str, str]:
  """A tag's (prefix, type) as conlleval splits it at the first "-": "I-MISC" -> ("I", "MISC"),
  "O" -> ("O", "")."""
  prefix, dash, kind = tag.partition("-")
  return (prefix, kind) if dash else (tag, "")


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """conlleval's startOfChunk: whether `tag` starts an entity after `prev` (the script's cases,
  its IOE ones included)."""
  return (
    (tag == "B" and prev in ("B", "I", "O"))
    or (prev == "O" and tag in ("I", "E"))
    or (prev == "E" and tag in ("E", "I"))
    or (tag not in ("O", ".") and prev_type != kind)
    or tag in ("[", "]")
  )


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  """conlleval's endOfChunk: whether an entity ends at `prev`, before `tag`."""
  return (
    (prev in ("B", "I") and tag in ("B", "O"))
    or (prev == "E" and tag in ("E", "I", "O"))
    or (prev not in ("O", ".") and prev_type != kind)
    or prev in ("[", "]")
  )


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """The entities of one sentence's tags as (type, first token, last token), by conlleval's rules."""
  found, open_at = [], None
  prev, prev_type = "O", ""
  for i, tag in enumerate([*tags, "O"]):  # a boundary after the sentence closes its last entity
    prefix, kind = split_tag(tag)
    if open_at is not None and _ends(prev, prefix, prev_type, kind):
      found.append((prev_type, open_at, i - 1))
      open_at = None
    if i < len(tags) and _starts(prev, prefix, prev_type, kind):
      open_at = i
    prev, prev_type = prefix, kind
  return found


def to_scheme(tags: Sequence[str], scheme: str) -> list[str]:
  """The sentence's entities (`chunks`) re-tagged: IOB2 starts each with B-; IOB1 starts each
  with I-, or B- when it directly follows an entity of its type. Tokens outside them are O."""
  out = ["O"] * len(tags)
  last_end, last_type = -2, ""
  for kind, first, last in chunks(tags):
    adjacent = first == last_end + 1 and kind == last_type
    out[first] = f"B-{kind}" if scheme == "iob2" or adjacent else f"I-{kind}"
    for i in range(first + 1, last + 1):
      out[i] = f"I-{kind}"
    last_end, last_type = last, kind
  return out


def conlleval(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
  """conlleval's overall scores of predicted tags against gold tags, sentence by sentence.

  Args:
    gold: each sentence's gold tags.
    predicted: each sentence's predicted tags, as many as its gold tags.
  Returns:
    `precision`, `recall`, `f1` and `accuracy` (tokens), in percent; 0 where undefined (no
    predicted or no gold entity), as conlleval prints it.
  """
  correct = found_gold = found_predicted = right_tags = tokens = 0
  for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
    if len(gold_tags) != len(predicted_tags):
      raise ValueError(f"{len(predicted_tags)} predicted tags for {len(gold_tags)} gold tags")
    gold_chunks, predicted_chunks = set(chunks(gold_tags)), set(chunks(predicted_tags))
    correct += len(gold_chunks & predicted_chunks)
    found_gold += len(gold_chunks)
    found_predicted += len(predicted_chunks)
    right_tags += sum(g == p for g, p in zip(gold_tags, predicted_tags, strict=True))
    tokens += len(gold_tags)
  precision = 100.0 * correct / found_predicted if found_predicted else 0.0
  recall = 100.0 * correct / found_gold if found_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "accuracy": 100.0 * right_tags / tokens if tokens else 0.0,
  }
