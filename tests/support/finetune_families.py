"""Learnable token-classification and multiple-choice tasks on the session's micro BERT
(tests/support/finetune.py's `pretrained` and `whole_words`), with answers the tests know.

  entity task    sentences of filler words holding three kinds of entity: words[0] alone is a
                 PER; words[1] directly followed by words[2] is a two-word LOC (either word
                 elsewhere is O, so a tag depends on the neighbours); words[3]+words[4] written as
                 one word, which the tokenizer splits into pieces, is a MISC. The train file is in
                 CoNLL-2003's columns with IOB1 tags (I- starts an entity, B- only after an
                 adjacent one of its type), the dev file .jsonl with IOB2 tags. Tagging all O
                 scores F1 0.
  choice task    a context of three words, holding words[0] half the time; four endings of two
                 words; the right one (at random) holds words[0], the others do not. So the model
                 must tell the ending's segment from the context's and score each choice, and the
                 labels must stay with their choices: a choice mixed up with another's scores
                 chance. The train file is SWAG's CSV layout, the dev file .jsonl. Chance: 25%.
"""

import csv

import numpy as np
import pytest

from tests.support.finetune import finetune_config, finetuned, write_jsonl

SWAG_HEADER = "video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label".split(",")


def _iob1(tags: list[str]) -> list[str]:
  """IOB2 tags of entities that never touch, written in IOB1 (every B- becomes I-)."""
  return ["I-" + t[2:] if t.startswith("B-") else t for t in tags]


def entity_sentences(words, n: int, seed: int, length: int = 8) -> list[tuple[list[str], list[str]]]:
  """(words, IOB2 tags) of the entity task; entities never touch, so IOB1 only renames B- to I-."""
  rng = np.random.default_rng(seed)
  fillers = words[5:]
  sentences = []
  for _ in range(n):
    tokens, tags = [], []
    while len(tokens) < length:
      tokens.append(str(rng.choice(fillers)))
      tags.append("O")
      kind = rng.integers(6)
      if kind == 0:
        tokens, tags = tokens + [words[0]], tags + ["B-PER"]
      elif kind == 1:
        tokens, tags = tokens + [words[1], words[2]], tags + ["B-LOC", "I-LOC"]
      elif kind == 2:  # a word of the LOC phrase alone is no entity
        tokens, tags = tokens + [words[int(rng.integers(1, 3))]], tags + ["O"]
      elif kind == 3:
        tokens, tags = tokens + [words[3] + words[4]], tags + ["B-MISC"]
    sentences.append((tokens, tags))
  return sentences


def write_conll(path, sentences, scheme: str = "iob1") -> None:
  """CoNLL-2003's layout: -DOCSTART-, then TOKEN POS CHUNK TAG lines, a blank line after each sentence."""
  lines = ["-DOCSTART- -X- -X- O", ""]
  for tokens, tags in sentences:
    tags = _iob1(tags) if scheme == "iob1" else tags
    lines += [f"{token} NN I-NP {tag}" for token, tag in zip(tokens, tags, strict=True)] + [""]
  path.write_text("\n".join(lines) + "\n")


def choice_examples(words, n: int, seed: int, choices: int = 4) -> list[dict]:
  """.jsonl rows of the choice task: context, start, endings, label."""
  rng = np.random.default_rng(seed)
  key, fillers = words[0], words[1:]
  rows = []
  for _ in range(n):
    context = [str(w) for w in rng.choice(fillers, 3)]
    if rng.random() < 0.5:  # the key word in the context says nothing: only the ending's counts
      context[int(rng.integers(3))] = key
    label = int(rng.integers(choices))
    endings = [f"{rng.choice(fillers)} {key if k == label else rng.choice(fillers)}" for k in range(choices)]
    rows.append({"context": " ".join(context), "start": str(rng.choice(fillers)), "endings": endings, "label": label})
  return rows


def write_swag(path, rows) -> None:
  """The rows in SWAG's CSV layout (sent1: the context, sent2: the start)."""
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(SWAG_HEADER)
    for i, r in enumerate(rows):
      phrase = f"{r['context']} {r['start']}"
      out.writerow([f"v{i}", i, phrase, r["context"], r["start"], "gold", *r["endings"], r["label"]])


@pytest.fixture(scope="session")
def family_files(whole_words, tmp_path_factory):
  """The entity and choice tasks' train and dev files."""
  root = tmp_path_factory.mktemp("finetune-families")
  write_conll(root / "entities-train.conll", entity_sentences(whole_words, 400, seed=11))
  write_jsonl(
    root / "entities-dev.jsonl",
    [{"tokens": t, "tags": g} for t, g in entity_sentences(whole_words, 100, seed=12)],
  )
  write_swag(root / "choice-train.csv", choice_examples(whole_words, 600, seed=13))
  write_jsonl(root / "choice-dev.jsonl", choice_examples(whole_words, 100, seed=14))
  return root


def ner_task_config(pretrained, family_files, *extra):
  return finetune_config(
    pretrained,
    f"finetune.train_file={family_files}/entities-train.conll",
    f"finetune.dev_file={family_files}/entities-dev.jsonl",
    "finetune.max_seq_len=24",
    *extra,
    task="ner",
    config="configs/finetune/ner.py",
  )


def choice_task_config(pretrained, family_files, *extra):
  return finetune_config(
    pretrained,
    f"finetune.train_file={family_files}/choice-train.csv",
    f"finetune.dev_file={family_files}/choice-dev.jsonl",
    "finetune.max_seq_len=16",
    "train.batch_size=32",
    *extra,
    task="multiple_choice",
    config="configs/finetune/swag.py",
  )


@pytest.fixture(scope="session")
def ner_run(pretrained, family_files, tmp_path_factory):
  """(config, workdir, result) of the entity task fine-tuned for 3 epochs."""
  return finetuned(ner_task_config(pretrained, family_files), tmp_path_factory, "ner-run")


@pytest.fixture(scope="session")
def choice_run(pretrained, family_files, tmp_path_factory):
  """(config, workdir, result) of the choice task fine-tuned for 3 epochs."""
  return finetuned(choice_task_config(pretrained, family_files), tmp_path_factory, "choice-run")
