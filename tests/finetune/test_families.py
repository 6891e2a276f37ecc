"""What every fine-tuning family of tests/support/finetune_families.py owes a run, checked once per
family: `bertjax eval` prints the run's dev metrics, and a run stopped by SIGTERM and started
again ends with the metrics of one that never stopped."""

import json

import pytest

from bertjax.cli import main as cli
from bertjax.finetune import run as run_lib
from tests.support.finetune import stopped_and_resumed
from tests.support.finetune_families import choice_task_config, ner_task_config

# task name: (the session fixture of its 3-epoch run, the config that run was made from)
FAMILIES = {
  "ner": ("ner_run", ner_task_config),
  "multiple_choice": ("choice_run", choice_task_config),
}


@pytest.mark.parametrize("task", FAMILIES)
def test_bertjax_eval_reports_the_runs_dev_metrics(task, request, capsys):
  _, workdir, result = request.getfixturevalue(FAMILIES[task][0])
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == {"step": int(result.state.step), "task": task, **result.final}


@pytest.mark.parametrize("task", FAMILIES)
def test_an_interrupted_run_resumes_to_the_metrics_of_an_uninterrupted_one(
  task, request, pretrained, family_files, tmp_path, monkeypatch
):
  fixture, task_config = FAMILIES[task]
  config, _, reference = request.getfixturevalue(fixture)
  stop_at = run_lib.setup(config, tmp_path / "probe", run_lib.prepare(config)).order.steps_per_epoch + 3
  stopped, resumed = stopped_and_resumed(
    lambda: task_config(pretrained, family_files), tmp_path / "run", stop_at, monkeypatch
  )
  assert stopped.stopped_by == "SIGTERM" and int(stopped.state.step) == stop_at + 1
  assert resumed.stopped_by is None and resumed.final == reference.final
