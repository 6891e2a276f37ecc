"""`bertjax glue`: every task with several seeds, a results table and glue_results.json; a rerun
reads complete runs back instead of training them; a missing task stops it before it starts."""

import json
import logging

import pytest

from bertjax.cli import main as cli
from bertjax.errors import BertjaxError
from bertjax.finetune import glue
from bertjax.metrics import writer
from tests.support.finetune import FINETUNE_OVERRIDES, write_learnable_glue


def _glue(pretrained, data, workdir, *extra):
  overrides = [f"--config.{o}" for o in FINETUNE_OVERRIDES + ["finetune.epochs=1", "finetune.max_seq_len=16"]]
  args = ["glue", "--init", str(pretrained), "--data", str(data), "--workdir", str(workdir), *extra]
  return cli.main(args + overrides)


def test_the_suite_runs_every_task_and_seed_and_tabulates_the_medians(
  pretrained, whole_words, tmp_path, capsys, caplog
):
  for name in ("sst2", "stsb"):
    write_learnable_glue(tmp_path / "glue", whole_words, name, train=64, dev=32)
  assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "stsb,sst2", "--seeds", "2") == 0
  printed = capsys.readouterr().out
  summary = json.loads((tmp_path / "suite" / glue.RESULTS_JSON).read_text())
  assert list(summary) == ["sst2", "stsb", "average"]  # the paper's column order
  assert set(summary["stsb"]["metrics"]) == {"pearson", "spearman"} and set(summary["sst2"]["metrics"]) == {"accuracy"}
  for name, task in summary.items():
    if name == "average":
      continue
    for metric, entry in task["metrics"].items():
      runs = [json.loads((tmp_path / "suite" / name / f"seed-{s}" / "eval_results.json").read_text()) for s in (0, 1)]
      assert entry["values"] == [r[metric] for r in runs]
      assert entry["median"] == sum(entry["values"]) / 2 and entry["min"] <= entry["median"] <= entry["max"]
  assert summary["average"]["score"]["median"] == pytest.approx(
    (summary["sst2"]["grid"]["0.001"]["score"] + summary["stsb"]["grid"]["0.001"]["score"]) / 2
  )
  table = (tmp_path / "suite" / glue.RESULTS_MD).read_text()
  assert table in printed
  assert f"| sst2 | 0.001 | accuracy | {100 * summary['sst2']['metrics']['accuracy']['median']:.1f} |" in table
  assert "| average | | task scores |" in table
  # The two seeds are two runs: their own heads, dropout and data order.
  first, second = (writer.read_metrics(tmp_path / "suite" / "sst2" / f"seed-{s}") for s in (0, 1))
  assert [r["loss"] for r in first if r["split"] == "train"] != [r["loss"] for r in second if r["split"] == "train"]

  # A rerun trains nothing: every run is complete and of the same inputs, so it only reads them back.
  before = (tmp_path / "suite" / "sst2" / "seed-0" / "metrics.jsonl").read_text()
  with caplog.at_level(logging.INFO, logger="bertjax.finetune.glue"):
    assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "sst2,stsb", "--seeds", "2") == 0
  assert (tmp_path / "suite" / "sst2" / "seed-0" / "metrics.jsonl").read_text() == before
  assert json.loads((tmp_path / "suite" / glue.RESULTS_JSON).read_text()) == summary
  assert "sst2 lr 0.001 seed 0: reusing its complete run (the same inputs)" in caplog.text

  # Changed data: that task's runs train again, saying why; the other task's are reused.
  caplog.clear()
  dev = tmp_path / "glue" / "SST-2" / "dev.tsv"
  dev.write_text(dev.read_text() + dev.read_text().splitlines()[1] + "\n")
  with caplog.at_level(logging.INFO, logger="bertjax.finetune.glue"):
    assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "sst2,stsb", "--seeds", "2") == 0
  assert "sst2 lr 0.001 seed 1: training again, its earlier run was of other inputs (the data dev.tsv changed)" in (
    caplog.text
  )
  assert "stsb lr 0.001 seed 0: reusing" in caplog.text
  assert (tmp_path / "suite" / "sst2" / "seed-0" / "metrics.jsonl").read_text() != before


def test_the_paper_protocol_selects_the_learning_rate_on_dev_over_seeds(pretrained, whole_words, tmp_path):
  """--lrs x --seeds: every combination runs; the rate with the highest median dev score is
  reported, and the whole grid is in glue_results.json."""
  write_learnable_glue(tmp_path / "glue", whole_words, "sst2", train=64, dev=32)
  args = ["--tasks", "sst2", "--seeds", "2", "--lrs", "1e-3,1e-6"]
  assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", *args) == 0
  summary = json.loads((tmp_path / "suite" / glue.RESULTS_JSON).read_text())["sst2"]
  assert set(summary["grid"]) == {"0.001", "1e-06"}
  for lr in ("0.001", "1e-06"):
    for seed in (0, 1):
      run = tmp_path / "suite" / "sst2" / f"lr-{lr}" / f"seed-{seed}"
      assert (
        json.loads((run / "eval_results.json").read_text())["accuracy"]
        in summary["grid"][lr]["metrics"]["accuracy"]["values"]
      )
  best = max(summary["grid"], key=lambda lr: summary["grid"][lr]["score"])
  assert summary["learning_rate"] == float(best) and summary["metrics"] == summary["grid"][best]["metrics"]


def test_a_bad_learning_rate_grid_is_one_line():
  with pytest.raises(BertjaxError, match="--lrs 5e-5,fast: give learning rates separated by commas"):
    glue.parse_lrs("5e-5,fast")
  with pytest.raises(BertjaxError, match="--lrs 5e-5,5e-5: give distinct positive learning rates"):
    glue.parse_lrs("5e-5,5e-5")
  assert glue.parse_lrs("") == [None] and glue.parse_lrs("5e-5, 2e-5") == [5e-5, 2e-5]


def test_a_task_missing_from_the_glue_folder_stops_the_suite_before_it_starts(
  pretrained, whole_words, tmp_path, capsys
):
  write_learnable_glue(tmp_path / "glue", whole_words, "sst2", train=8, dev=8)
  assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "sst2,rte") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"GLUE folder {tmp_path / 'glue'} holds no RTE/ (task rte)" in err
  assert not (tmp_path / "suite").exists()


def test_task_names_are_checked_and_ordered_as_the_paper():
  assert glue.parse_tasks("RTE, sst2,mnli") == ["mnli", "sst2", "rte"]
  assert glue.parse_tasks("") == list(glue.ORDER)
