"""Fine-tuning material: a micro model pretrained once per session, and small tasks that a model
can solve only by learning, with answers the tests know.

The tasks use words that the session tokenizer keeps whole (one piece each), so that no
truncation cuts the word a label depends on:

  pair task      text and text_pair of three words; the chosen word is in the first half the
                 time and in the second half the time; the label says whether the second holds
                 it. A model that cannot tell the two texts apart stays at 75%.
  count task     single texts of eight words; the label is how often the chosen word occurs in
                 them (0-3), a regression.
  SQuAD task     contexts of filler words, some with ", " between them; the answer is a two-word
                 phrase at a known character position, written with random capitals. With v2,
                 30% of the contexts lack it (no answer). Long contexts need several windows.
"""

import json

import numpy as np
import pytest

from bertjax.config import loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.finetune import init as init_lib
from bertjax.train import pretrain
from tests.support.corpora import numbered_documents, write_bert_text
from tests.support.runs import MICRO_OVERRIDES

# Fine-tuning at micro scale: a learning rate that moves a micro model in a hundred steps (2e-3
# learns and then forgets the pair task within five epochs), and every run computing in float32
# (the CPU default) so that results repeat exactly.
FINETUNE_OVERRIDES = [
  "train.batch_size=32",
  "train.log_every=10",
  "train.compilation_cache=off",
  "optim.lr=1e-3",
  "model.dtype=float32",
]
# Pretraining that leaves a usable encoder: BERT's AdamW has no bias correction, so a micro run at
# lr 3e-3 without warmup collapses to the unigram plateau, from which fine-tuning does not learn.
PRETRAIN_STEPS = 200
PRETRAIN_OVERRIDES = [
  f"train.steps={PRETRAIN_STEPS}",
  "optim.lr=1e-3",
  "optim.warmup_steps=50",
  "train.log_every=50",
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
  pretrain.train(config, root / "run")
  return root / "run"


# English words of the test corpus (tests/support/corpora.py); the tasks use those the session
# tokenizer keeps whole, in this order (the first ones are the chosen words).
CANDIDATE_WORDS = (
  "river mill children play weather markets songs people flowers where talk through teachers explain numbers maps "
  "stars letters seasons bread stone gardens bells apples pears onions coins"
).split()


@pytest.fixture(scope="session")
def whole_words(pretrained) -> list[str]:
  """Words the session tokenizer keeps as one piece, in CANDIDATE_WORDS order."""
  tokenizer = tokenizer_lib.load_tokenizer(pretrained / "tokenizer")
  words = [w for w in CANDIDATE_WORDS if len(tokenizer.encode(w)) == 1]
  assert len(words) >= 8, words
  return words


def finetuned(config, tmp_path_factory, name: str):
  """(config, workdir, result) of a fine-tune of `config` in a new folder `name`/run."""
  from bertjax.finetune import job

  workdir = tmp_path_factory.mktemp(name) / "run"
  return config, workdir, job.finetune(config, workdir)


def finetune_config(init, *overrides, task="classification", config="configs/finetune/classification.py"):
  """A validated fine-tuning config at micro scale over the `init` run."""
  return init_lib.load_config(config, [*FINETUNE_OVERRIDES, *overrides], task=task, init=str(init))


def write_jsonl(path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pair_examples(words, n: int, seed: int, length: int = 3) -> list[dict]:
  """The pair task: labels "yes"/"no". Three words a text: with five, a micro model's first
  hundred steps often stay on the majority class, from some pretrained starts."""
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
    rows.append({"text": " ".join(first), "text_pair": " ".join(second), "label": "yes" if in_second else "no"})
  return rows


def count_examples(words, n: int, seed: int, length: int = 8) -> list[dict]:
  """The count task: float labels 0-3."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    text = list(rng.choice(words[1:], length))
    count = int(rng.integers(0, 4))
    for at in rng.choice(length, count, replace=False):
      text[at] = words[0]
    rows.append({"text": " ".join(text), "label": float(count)})
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
  write_jsonl(root / "count-train.jsonl", count_examples(whole_words, 1000, seed=3))
  write_jsonl(root / "count-dev.jsonl", count_examples(whole_words, 200, seed=4))
  (root / "squad-train.json").write_text(json.dumps(squad_articles(whole_words, 500, seed=5, v2=True, length=30)))
  (root / "squad-dev.json").write_text(json.dumps(squad_articles(whole_words, 100, seed=6, v2=True, length=30)))
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
  """SQuAD 2.0 in 32-token windows 8 tokens apart: the 30-word contexts need several."""
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
  return finetuned(pair_task_config(pretrained, task_files), tmp_path_factory, "pair-run")


@pytest.fixture(scope="session")
def squad_run(pretrained, task_files, tmp_path_factory):
  """(config, workdir, result) of the SQuAD 2.0 task fine-tuned for 2 epochs."""
  return finetuned(squad_task_config(pretrained, task_files), tmp_path_factory, "squad-run")


def count_task_config(pretrained, task_files, *extra):
  return finetune_config(
    pretrained,
    f"finetune.train_file={task_files}/count-train.jsonl",
    f"finetune.dev_file={task_files}/count-dev.jsonl",
    "finetune.regression=true",
    "finetune.max_seq_len=16",
    f"data.cache_dir={task_files}/cache",
    *extra,
  )


@pytest.fixture(scope="session")
def count_run(pretrained, task_files, tmp_path_factory):
  """(config, workdir, result) of the count task, a regression, fine-tuned for 3 epochs."""
  return finetuned(count_task_config(pretrained, task_files), tmp_path_factory, "count-run")


# -- GLUE folders ---------------------------------------------------------------------------------
MNLI_TRAIN_HEADER = (
  "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
  "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def _mnli_row(i, a, b, label, dev=False):
  labels = f"{label}\t{label}\t{label}\t{label}\t{label}" if dev else label
  return f"{i}\t{i}\t{i}e\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{labels}\t{label}"


# task -> (header or None, row builder (index, first, second, TSV label) -> line)
LAYOUTS = {
  "cola": (None, lambda i, a, b, y: f"gj04\t{y}\t{'' if y == '1' else '*'}\t{a}"),
  "sst2": ("sentence\tlabel", lambda i, a, b, y: f"{a}\t{y}"),
  "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda i, a, b, y: f"{y}\t{100 + i}\t{200 + i}\t{a}\t{b}"),
  "stsb": (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    lambda i, a, b, y: f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{y}",
  ),
  "qqp": (
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    lambda i, a, b, y: f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{y}",
  ),
  "mnli": (MNLI_TRAIN_HEADER, _mnli_row),
  "qnli": ("index\tquestion\tsentence\tlabel", lambda i, a, b, y: f"{i}\t{a}\t{b}\t{y}"),
  "rte": ("index\tsentence1\tsentence2\tlabel", lambda i, a, b, y: f"{i}\t{a}\t{b}\t{y}"),
  "wnli": ("index\tsentence1\tsentence2\tlabel", lambda i, a, b, y: f"{i}\t{a}\t{b}\t{y}"),
}


def write_glue_files(root, name: str, files: dict[str, list[tuple[str, str, str]]]) -> None:
  """ROOT/TASK/FILE with the GLUE download's header and columns for each (first text, second
  text, label as the TSV writes it) row."""
  from bertjax import tasks

  header, row = LAYOUTS[name]
  folder = root / tasks.GLUE[name].folder
  folder.mkdir(parents=True, exist_ok=True)
  for file, rows in files.items():
    dev = file != "train.tsv"
    if name == "mnli":
      lines = [_mnli_row(i, a, b, y, dev=dev) for i, (a, b, y) in enumerate(rows)]
      header = MNLI_DEV_HEADER if dev else MNLI_TRAIN_HEADER
    else:
      lines = [row(i, a, b, y) for i, (a, b, y) in enumerate(rows)]
    (folder / file).write_text("\n".join(([header] if header else []) + lines) + "\n")


def write_learnable_glue(root, words, name: str, train: int, dev: int, seed: int = 0) -> None:
  """A GLUE task folder holding the tasks above in its own layout: SST-2 the second texts of the
  pair task (does the sentence hold the chosen word?), MRPC the pair task, STS-B the count task
  (its second text one filler word, so that no truncation cuts the first)."""
  files = {}
  for i, (file, count) in enumerate((("train.tsv", train), ("dev.tsv", dev))):
    if name == "stsb":
      rows = [(r["text"], words[-1], f"{r['label']:.1f}") for r in count_examples(words, count, 100 * seed + i)]
    else:
      pairs = pair_examples(words, count, seed=100 * seed + i)
      label = lambda r: "1" if r["label"] == "yes" else "0"
      rows = [
        (r["text_pair"], "", label(r)) if name == "sst2" else (r["text"], r["text_pair"], label(r)) for r in pairs
      ]
    files[file] = rows
  write_glue_files(root, name, files)


def stopped_and_resumed(make_config, workdir, stop_at: int, monkeypatch):
  """(stopped, resumed): a fine-tune of `make_config()` stopped by SIGTERM in step `stop_at` (as a
  scheduler would: the step in flight finishes and is saved), then the same command again."""
  import os
  import signal

  from bertjax.finetune import job
  from bertjax.finetune import run as run_lib

  train_batch = run_lib.Run.train_batch

  def signalled_at(run, step):
    if step == stop_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return train_batch(run, step)

  monkeypatch.setattr(run_lib.Run, "train_batch", signalled_at)
  stopped = job.finetune(make_config(), workdir)
  monkeypatch.setattr(run_lib.Run, "train_batch", train_batch)
  return stopped, job.finetune(make_config(), workdir)
