"""The fine-tuning loop: an interrupted run resumes to the metrics of an uninterrupted one,
`bertjax eval` reports a fine-tune run's dev metrics, a complete run reports instead of training,
and a workdir holding another task's run is refused before anything in it changes."""

import json
import os

import pytest

from bertjax.cli import main as cli
from bertjax.errors import BertjaxError
from bertjax.finetune import job as loop
from bertjax.metrics import writer
from tests.support.finetune import count_task_config, finetune_config, pair_task_config, stopped_and_resumed

STOP_AT = 40  # a step in the second epoch, between checkpoints


def _records(workdir, split):
  return [
    {k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "sequences_per_s", "step_s", "mfu")}
    for r in writer.read_metrics(workdir)
    if r["split"] == split
  ]


def test_an_interrupted_run_resumes_to_the_metrics_of_an_uninterrupted_one(
  pair_run, pretrained, task_files, tmp_path, monkeypatch
):
  _, reference_dir, reference = pair_run
  results = tmp_path / "run" / loop.RESULTS_FILE
  seen = []  # whether a result existed when the stopped run returned: none until the run is complete

  def config():
    seen.append(results.exists())
    return pair_task_config(pretrained, task_files)

  stopped, resumed = stopped_and_resumed(config, tmp_path / "run", STOP_AT, monkeypatch)
  assert stopped.stopped_by == "SIGTERM" and int(stopped.state.step) == STOP_AT + 1 and seen == [False, False]
  assert resumed.stopped_by is None and int(resumed.state.step) == 96
  assert resumed.final == reference.final
  assert _records(tmp_path / "run", "eval") == _records(reference_dir, "eval")
  assert _records(tmp_path / "run", "train") == _records(reference_dir, "train")


def test_bertjax_eval_on_a_fine_tune_run_prints_its_dev_metrics(pair_run, capsys):
  _, workdir, result = pair_run
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == {"step": 96, "task": "custom", **result.final}


def test_a_complete_run_reports_instead_of_training(pair_run, pretrained, task_files):
  _, workdir, result = pair_run
  again = loop.finetune(pair_task_config(pretrained, task_files), workdir)
  assert int(again.state.step) == 96 and again.final == result.final


def test_a_workdir_holding_another_tasks_run_is_refused_untouched(pair_run, pretrained, task_files):
  _, workdir, _ = pair_run
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  config = count_task_config(pretrained, task_files)
  message = (
    r"holds a fine-tune of other inputs \(the data is count-dev.jsonl, count-train.jsonl, not pairs-dev.jsonl, "
    r"pairs-train.jsonl; finetune.labels is '', not 'no,yes'; finetune.regression is True, not False\); use a new "
    r"workdir, or --overwrite to replace that run"
  )
  with pytest.raises(BertjaxError, match=message):
    loop.finetune(config, workdir)
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_an_import_hf_workdir_starts_a_run_as_the_run_it_was_exported_from(pair_run, pretrained, task_files, tmp_path):
  """Export the pretrained run, import it back: fine-tuning from the import is fine-tuning from the run."""
  from bertjax.hf import export, import_hf

  _, _, reference = pair_run
  import_hf.import_hf(export.export_hf(pretrained, tmp_path / "hf"), tmp_path / "imported")
  result = loop.finetune(pair_task_config(tmp_path / "imported", task_files), tmp_path / "run")
  assert result.final == reference.final


def test_an_init_that_is_no_run_and_a_missing_init(tmp_path, pretrained, task_files):
  with pytest.raises(BertjaxError, match="--init .* holds no config.json and tokenizer/"):
    finetune_config(tmp_path)
  (tmp_path / "notrained").mkdir()
  for item in ("config.json", "tokenizer"):
    os.symlink(pretrained / item, tmp_path / "notrained" / item)
  config = pair_task_config(tmp_path / "notrained", task_files)
  with pytest.raises(BertjaxError, match="no checkpoints there; pretrain first"):
    loop.finetune(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # a refused --init writes nothing: no folder, no checkpoints/
