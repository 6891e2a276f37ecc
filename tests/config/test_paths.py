"""Paths in a config: absolute once loaded (a command run elsewhere finds them), relative to the
run folder for what it holds (a folder moved whole still finds them)."""

import json
import shutil

from bertjax.config import loading


def test_relative_paths_are_made_absolute_where_they_were_typed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = loading.load_config(
    "finetune/classification",
    [
      "finetune.init=runs/base",
      "finetune.train_file=data/train.jsonl",
      "finetune.dev_file=gs://b/dev.jsonl",
      "finetune.labels=no,yes",
    ],
  )
  assert config.finetune.init == str(tmp_path / "runs" / "base")
  assert config.finetune.train_file == str(tmp_path / "data" / "train.jsonl")
  assert config.finetune.dev_file == "gs://b/dev.jsonl"
  pretraining = loading.load_config("tiny", ["data.source=files:corpus/*.txt", "data.tokenizer=tok"])
  assert pretraining.data.source == f"files:{tmp_path}/corpus/*.txt" and pretraining.data.tokenizer == str(
    tmp_path / "tok"
  )


def test_paths_inside_the_run_folder_are_stored_relative_to_it_and_move_with_it(tmp_path):
  run = tmp_path / "run"
  config = loading.load_config("tiny", [f"data.tokenizer={run}/tokenizer", f"data.cache_dir={tmp_path}/cache"])
  loading.write_config(config, run)
  stored = json.loads((run / "config.json").read_text())["data"]
  assert stored["tokenizer"] == "./tokenizer" and stored["cache_dir"] == str(tmp_path / "cache")
  shutil.move(run, tmp_path / "moved")
  again = loading.read_config(tmp_path / "moved")
  assert again.data.tokenizer == str(tmp_path / "moved" / "tokenizer") and again.data.cache_dir == str(
    tmp_path / "cache"
  )
