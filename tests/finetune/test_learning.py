"""A micro BERT pretrained for a few hundred steps learns the small tasks of tests/support/finetune.py,
which no model solves without learning: a sentence-pair classification, a regression and SQuAD 2.0
with contexts that need several windows. Each run also leaves what a run leaves behind."""

import json

import numpy as np
import pytest

from bertjax.finetune import job as loop
from bertjax.finetune import run as run_lib
from bertjax.metrics import writer


def test_the_pair_task_is_learned_and_evaluated_every_epoch(pair_run):
  config, workdir, result = pair_run
  assert result.final["accuracy"] >= 0.95, result.final  # ignoring which text holds the word: 0.75
  records = writer.read_metrics(workdir)
  evals = [r for r in records if r["split"] == "eval"]
  assert [(r["step"], r["epoch"]) for r in evals] == [(32, 1.0), (64, 2.0), (96, 3.0)]
  assert evals[-1]["accuracy"] == result.final["accuracy"]
  train = [r for r in records if r["split"] == "train"]
  assert train[-1]["step"] == 96 and train[0]["learning_rate"] > train[-1]["learning_rate"]  # decaying
  for key in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s", "sequences_per_s", "epoch"):
    assert key in train[-1], key
  assert json.loads((workdir / loop.RESULTS_FILE).read_text()) == {"step": 96, "task": "custom", **result.final}
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert (workdir / "tokenizer").is_dir() and json.loads((workdir / "config.json").read_text())["finetune"]["task"]


def test_the_count_task_is_learned_as_a_regression(count_run):
  _, _, result = count_run
  # Spearman tops out below 1: the gold counts are 0 to 3, ties everywhere.
  assert result.final["pearson"] >= 0.9 and result.final["spearman"] >= 0.85, result.final


def test_squad_v2_with_several_windows_per_context_is_learned(squad_run):
  config, workdir, result = squad_run
  final = result.final
  assert final["exact"] >= 90 and final["f1"] >= 90, final
  assert final["HasAns_total"] + final["NoAns_total"] == final["total"] == 100
  assert all(isinstance(final[k], int) for k in ("total", "HasAns_total", "NoAns_total"))  # counts, not 100.0
  assert final["HasAns_exact"] >= 85 and final["NoAns_exact"] >= 85, final
  data = run_lib.prepare(config)
  windows = np.bincount(data.dev["dev"]["example_index"])
  assert windows.min() >= 2 and len(windows) == 100  # every context needs several windows
  predictions = json.loads((workdir / loop.PREDICTIONS_FILE).read_text())
  questions = {q.id: q for q in data.questions["dev"]}
  assert set(predictions) == set(questions)
  right = [predictions[i] == (q.answers[0] if q.answers else "") for i, q in questions.items()]
  assert np.mean(right) * 100 == pytest.approx(final["exact"])  # the answers are the context's own characters
  assert set(json.loads((workdir / loop.NULL_ODDS_FILE).read_text())) == set(questions)
  # What `bertjax finetune` lists as written.
  assert loop.results_files(workdir) == [loop.RESULTS_FILE, loop.PREDICTIONS_FILE, loop.NULL_ODDS_FILE]
