"""Fine-tuning material: a micro model pretrained once per session, and small tasks that a model
can solve only by learning, with answers the tests know.

The tasks use words that the session tokenizer keeps whole (one piece each), so that no
truncation cuts the word a label depends on:

  pair task      text and text_pair of filler words; the chosen word is in the first half the
                 time and in the second half the time; the label says whether the second holds
                 it. A model that cannot tell the two texts apart stays at 75%.
  count task     the same pairs; the label is how often the chosen word occurs in both (0-2),
                 a regression.
  SQuAD task     contexts of filler words, some with ", " between them; the answer is a two-word
                 phrase at a known character position, written with random capitals. With v2,
                 30% of the contexts lack it (no answer). Long contexts need several windows.
"""

import json

import numpy as np
import pytest

from bertjax.config import loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.finetune import run as run_lib
from bertjax.train import loop as pretrain_loop
from tests.support.corpora import numbered_documents, write_bert_text
from tests.support.runs import MICRO_OVERRIDES

# Fine-tuning at micro scale: a learning rate that moves a micro model in a hundred steps, and
# every run computing in float32 (the CPU default) so that results repeat exactly.
FINETUNE_OVERRIDES = [
  "train.batch_size=32",
  "train.log_every=10",
  "train.compilation_cache=off",
  "optim.lr=2e-3",
  "model.dtype=float32",
]
# Pretraining that leaves a usable encoder: BERT's AdamW has no bias correction, so a micro run at
# lr 3e-3 without warmup collapses to the unigram plateau, from which fine-tuning does not learn.
PRETRAIN_STEPS = 120
PRETRAIN_OVERRIDES = [
  f"train.steps={PRETRAIN_STEPS}",
  "optim.lr=1e-3",
  "optim.warmup_steps=40",
  "train.log_every=40",
  "train.eval_every=1000",
  "checkpoint.every_steps=1000",
]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
  """The workdir of a micro BERT pretrained for PRETRAIN_STEPS steps on a small local corpus."""
  root = tmp_path_factory.mktemp("finetune-pretrained")
  write_bert_text(root / "corpus.txt", numbered_documents(40))
  config = loading.load_config(
    "configs/tiny.py",
    MICRO_OVERRIDES + PRETRAIN_OVERRIDES + [f"data.source=files:{root}/corpus.txt", f"data.cache_dir={root}/cache"],
  )
  pretrain_loop.train(config, root / "run")
  return root / "run"


@pytest.fixture(scope="session")
def whole_words(pretrained) -> list[str]:
  """Words the session tokenizer keeps as one piece, in a fixed order."""
  tokenizer = tokenizer_lib.load_tokenizer(pretrained / "tokenizer")
  corpus_words = {w for doc in numbered_documents(40) for sentence in doc for w in sentence.rstrip(".").split()}
  words = sorted(w for w in corpus_words if w.isalpha() and w.islower() and len(tokenizer.encode(w)) == 1)
  assert len(words) >= 8, words
  return words


def finetune_config(init, *overrides, task="classification", config="configs/finetune/classification.py"):
  """A validated fine-tuning config at micro scale over the `init` run."""
  return run_lib.load_config(config, [*FINETUNE_OVERRIDES, *overrides], task=task, init=str(init))


def write_jsonl(path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pair_examples(words, n: int, seed: int, regression: bool = False, length: int = 5) -> list[dict]:
  """The pair task (labels "yes"/"no"), or with `regression` the count task."""
  rng = np.random.default_rng(seed)
  key, fillers = words[0], words[1:]
  rows = []
  for _ in range(n):
    first, second = list(rng.choice(fillers, length)), list(rng.choice(fillers, length))
    in_first, in_second = rng.random() < 0.5, rng.random() < 0.5
    if in_first:
      first[rng.integers(length)] = key
    if in_second:
      second[rng.integers(length)] = key
    label = float(in_first + in_second) if regression else ("yes" if in_second else "no")
    rows.append({"text": " ".join(first), "text_pair": " ".join(second), "label": label})
  return rows


def squad_articles(words, n: int, seed: int, v2: bool = False, length: int = 10) -> dict:
  """A SQuAD JSON dict: one question ("where") per context; the answer is the phrase
  words[0] words[1] (with random capitals) at its character offset, or none (v2)."""
  rng = np.random.default_rng(seed)
  fillers = words[2:]
  articles = []
  for i in range(n):
    tokens = list(rng.choice(fillers, length))
    has_answer = not v2 or rng.random() < 0.7
    at = int(rng.integers(0, length - 1))
    if has_answer:
      tokens[at] = words[0].capitalize() if rng.random() < 0.5 else words[0]
      tokens[at + 1] = words[1].upper() if rng.random() < 0.3 else words[1]
    context, starts = "", []
    for token in tokens:
      starts.append(len(context))
      context += token + (", " if rng.random() < 0.2 else " ")
    context = context.rstrip(", ")
    qa = {"id": f"q{seed}-{i}", "question": "where", "answers": []}
    if has_answer:
      end = starts[at + 1] + len(tokens[at + 1])
      qa["answers"] = [{"text": context[starts[at] : end], "answer_start": starts[at]}]
    elif v2:
      qa["is_impossible"] = True
    articles.append({"title": str(i), "paragraphs": [{"context": context, "qas": [qa]}]})
  return {"version": "v2.0" if v2 else "1.1", "data": articles}


@pytest.fixture(scope="session")
def task_files(whole_words, tmp_path_factory):
  """The learnable tasks' train and dev files."""
  root = tmp_path_factory.mktemp("finetune-tasks")
  write_jsonl(root / "pairs-train.jsonl", pair_examples(whole_words, 1000, seed=1))
  write_jsonl(root / "pairs-dev.jsonl", pair_examples(whole_words, 200, seed=2))
  write_jsonl(root / "count-train.jsonl", pair_examples(whole_words, 1000, seed=3, regression=True))
  write_jsonl(root / "count-dev.jsonl", pair_examples(whole_words, 200, seed=4, regression=True))
  (root / "squad-train.json").write_text(json.dumps(squad_articles(whole_words, 500, seed=5, v2=True, length=24)))
  (root / "squad-dev.json").write_text(json.dumps(squad_articles(whole_words, 100, seed=6, v2=True, length=24)))
  return root


def pair_task_config(pretrained, task_files, *extra):
  return finetune_config(
    pretrained,
    f"finetune.train_file={task_files}/pairs-train.jsonl",
    f"finetune.dev_file={task_files}/pairs-dev.jsonl",
    "finetune.labels=no,yes",
    "finetune.max_seq_len=16",
    f"data.cache_dir={task_files}/cache",
    *extra,
  )


def squad_task_config(pretrained, task_files, *extra):
  """SQuAD 2.0 in 32-token windows 8 tokens apart: the 24-word contexts need several."""
  return finetune_config(
    pretrained,
    f"finetune.train_file={task_files}/squad-train.json",
    f"finetune.dev_file={task_files}/squad-dev.json",
    "finetune.squad_v2=true",
    "finetune.max_seq_len=32",
    "finetune.doc_stride=8",
    "finetune.max_query_len=8",
    "finetune.max_answer_len=4",
    f"data.cache_dir={task_files}/cache",
    *extra,
    task="qa",
    config="configs/finetune/squad_v2.py",
  )


@pytest.fixture(scope="session")
def pair_run(pretrained, task_files, tmp_path_factory):
  """(config, workdir, result) of the pair task fine-tuned for 3 epochs (96 steps)."""
  from bertjax.finetune import loop

  config = pair_task_config(pretrained, task_files)
  workdir = tmp_path_factory.mktemp("pair-run") / "run"
  return config, workdir, loop.finetune(config, workdir)


@pytest.fixture(scope="session")
def squad_run(pretrained, task_files, tmp_path_factory):
  """(config, workdir, result) of the SQuAD 2.0 task fine-tuned for 2 epochs."""
  from bertjax.finetune import loop

  config = squad_task_config(pretrained, task_files)
  workdir = tmp_path_factory.mktemp("squad-run") / "run"
  return config, workdir, loop.finetune(config, workdir)
