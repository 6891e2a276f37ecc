"""A fine-tune's result belongs to its inputs: a workdir records what its result depends on, and a
run of other inputs on it is refused (or, asked to, replaces it); a complete run of the same
inputs reports instead of training."""

import shutil

import pytest

from bertjax.errors import BertjaxError
from bertjax.finetune import fingerprint
from bertjax.finetune import job as loop
from tests.support.finetune import pair_task_config


def _snapshot(folder):
  return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_workdir_records_its_init_data_task_and_recipe(pair_run, pretrained):
  _, workdir, _ = pair_run
  saved = fingerprint.read(workdir)
  assert set(saved) == {"init", "data", "task", "recipe"}
  assert saved["init"]["step"] == 200 and len(saved["init"]["checkpoint"]) == 64
  assert set(saved["data"]) == {"pairs-train.jsonl", "pairs-dev.jsonl"}
  assert saved["task"] == "classification" and saved["recipe"]["optim"]["lr"] > 0
  assert "mesh" not in saved["recipe"] and "log_every" not in saved["recipe"]["train"]


def test_other_inputs_are_refused_untouched_and_replace_the_run_when_asked(pair_run, pretrained, task_files, tmp_path):
  _, reference, _ = pair_run
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = _snapshot(workdir)
  with pytest.raises(BertjaxError) as error:
    loop.finetune(pair_task_config(pretrained, task_files, "optim.lr=0.002"), workdir)
  assert str(error.value) == (
    f"--workdir {workdir} holds a fine-tune of other inputs (optim.lr is 0.002, not 0.001); "
    "use a new workdir, or --overwrite to replace that run"
  )
  data = tmp_path / "data"
  shutil.copytree(task_files, data, ignore=shutil.ignore_patterns("cache"))
  (data / "pairs-dev.jsonl").write_text((data / "pairs-dev.jsonl").read_text().replace("yes", "no", 3))
  with pytest.raises(BertjaxError, match=r"other inputs \(the data pairs-dev.jsonl changed\)"):
    loop.finetune(pair_task_config(pretrained, data), workdir)
  assert _snapshot(workdir) == before

  # The same contents at another path are the same inputs: the complete run reports (its config
  # records where the data is now).
  shutil.copy(task_files / "pairs-dev.jsonl", data / "pairs-dev.jsonl")
  assert int(loop.finetune(pair_task_config(pretrained, data), workdir).state.step) == 96
  config_json = workdir / "config.json"
  assert {p: b for p, b in _snapshot(workdir).items() if p != config_json} == {
    p: b for p, b in before.items() if p != config_json
  }

  replaced = loop.finetune(pair_task_config(pretrained, task_files, "finetune.epochs=1"), workdir, overwrite=True)
  assert int(replaced.state.step) == 32 and fingerprint.read(workdir)["recipe"]["finetune"]["epochs"] == 1
  assert not (workdir / "checkpoints" / "96").exists()
