"""Fine-tuning in a job of several processes: 2 processes x 2 devices make the run that 1 process
x 4 devices makes (each process feeds only its own rows; process 0 writes the results)."""

import json

import pytest

from bertjax.metrics import writer
from tests.support.finetune import FINETUNE_OVERRIDES
from tests.support.runs import launch, launch_job

pytestmark = pytest.mark.slow


def _args(pretrained, task_files, workdir) -> list[str]:
  overrides = FINETUNE_OVERRIDES + [
    f"finetune.train_file={task_files}/pairs-train.jsonl",
    f"finetune.dev_file={task_files}/pairs-dev.jsonl",
    "finetune.labels=no,yes",
    "finetune.max_seq_len=16",
    "finetune.epochs=1",
    f"data.cache_dir={task_files}/cache",
  ]
  return [
    "finetune",
    "--task",
    "classification",
    "--config",
    "configs/finetune/classification.py",
    "--init",
    str(pretrained),
    "--workdir",
    str(workdir),
    *(f"--config.{o}" for o in overrides),
  ]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in writer.read_metrics(workdir) if r["split"] == "train"}


def test_two_processes_of_two_devices_make_the_run_of_one_process_of_four(pretrained, task_files, tmp_path):
  alone = launch(_args(pretrained, task_files, tmp_path / "alone"), devices=4)
  out = alone.communicate(timeout=600)[0]
  assert alone.returncode == 0, out[-3000:]
  job = launch_job(_args(pretrained, task_files, tmp_path / "job"), processes=2, devices=2)
  outs = [p.communicate(timeout=600)[0] for p in job]
  assert [p.returncode for p in job] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

  one, two = _losses(tmp_path / "alone"), _losses(tmp_path / "job")
  assert sorted(one) == sorted(two) and len(one) >= 3
  assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)
  results = [json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("alone", "job")]
  assert results[1].pop("task") == results[0].pop("task") == "custom"
  assert results[1] == pytest.approx(results[0], rel=1e-5)
  assert "custom dev:" in outs[0] and "custom dev:" not in outs[1]  # process 0 reports the results
