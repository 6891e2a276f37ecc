"""`bertjax glue`: every task with several seeds, a results table and glue_results.json; a rerun
reads complete runs back instead of training them; a missing task stops it before it starts."""

import json

from bertjax.cli import main as cli
from bertjax.finetune import glue
from bertjax.metrics import writer
from tests.support.finetune import FINETUNE_OVERRIDES, write_learnable_glue


def _glue(pretrained, data, workdir, *extra):
  overrides = [f"--config.{o}" for o in FINETUNE_OVERRIDES + ["finetune.epochs=1", "finetune.max_seq_len=16"]]
  args = ["glue", "--init", str(pretrained), "--data", str(data), "--workdir", str(workdir), *extra]
  return cli.main(args + overrides)


def test_the_suite_runs_every_task_and_seed_and_tabulates_the_medians(pretrained, whole_words, tmp_path, capsys):
  for name in ("sst2", "stsb"):
    write_learnable_glue(tmp_path / "glue", whole_words, name, train=64, dev=32)
  assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "stsb,sst2", "--seeds", "2") == 0
  printed = capsys.readouterr().out
  summary = json.loads((tmp_path / "suite" / glue.RESULTS_JSON).read_text())
  assert list(summary) == ["sst2", "stsb", "average"]  # the paper's column order
  assert set(summary["stsb"]) == {"pearson", "spearman"} and set(summary["sst2"]) == {"accuracy"}
  for name, metrics in summary.items():
    if name == "average":
      continue
    for metric, entry in metrics.items():
      runs = [json.loads((tmp_path / "suite" / name / f"seed-{s}" / "eval_results.json").read_text()) for s in (0, 1)]
      assert entry["values"] == [r[metric] for r in runs]
      assert entry["median"] == sum(entry["values"]) / 2 and entry["min"] <= entry["median"] <= entry["max"]
  scores = [
    summary["sst2"]["accuracy"]["median"],
    (summary["stsb"]["pearson"]["median"] + summary["stsb"]["spearman"]["median"]) / 2,
  ]
  assert summary["average"]["score"]["median"] == sum(scores) / 2
  table = (tmp_path / "suite" / glue.RESULTS_MD).read_text()
  assert table in printed
  assert f"| sst2 | accuracy | {100 * summary['sst2']['accuracy']['median']:.1f} |" in table
  assert "| average | task scores |" in table
  # The two seeds are two runs: their own heads, dropout and data order.
  first, second = (writer.read_metrics(tmp_path / "suite" / "sst2" / f"seed-{s}") for s in (0, 1))
  assert [r["loss"] for r in first if r["split"] == "train"] != [r["loss"] for r in second if r["split"] == "train"]

  # A rerun trains nothing: every run is complete, so it only reads them back.
  before = (tmp_path / "suite" / "sst2" / "seed-0" / "metrics.jsonl").read_text()
  assert _glue(pretrained, tmp_path / "glue", tmp_path / "suite", "--tasks", "sst2,stsb", "--seeds", "2") == 0
  assert (tmp_path / "suite" / "sst2" / "seed-0" / "metrics.jsonl").read_text() == before
  assert json.loads((tmp_path / "suite" / glue.RESULTS_JSON).read_text()) == summary


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
