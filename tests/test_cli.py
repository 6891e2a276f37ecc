"""The command line: every command exists with --help; a user error is one line and exit 2."""

import os
import subprocess
import sys

import pytest

from bertjax.cli import main as cli

COMMANDS = [
  "train",
  "eval",
  "export",
  "import-hf",
  "tokenizer train",
  "data preview",
  "data bench",
  "data prepare",
  "bench",
  "plot",
  "finetune",
  "glue",
]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run(
    [sys.executable, "-m", "bertjax", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
  )


def test_help_lists_every_command():
  out = run_cli("--help")
  assert out.returncode == 0
  for name in ("train", "eval", "export", "import-hf", "tokenizer", "data", "bench", "plot", "finetune", "glue"):
    assert f"    {name}" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([*command.split(), "--help"])
  assert e.value.code == 0
  assert "usage: bertjax" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv, message",
  [
    (["train", "--config", "configs/tiny.py"], "train: the following arguments are required: --workdir"),
    (["train", "--workdir", "no-such-run"], "--config is required: no-such-run holds no config.json"),
    (["export", "--workdir", "no-such-run", "--format", "hf"], "no-such-run"),
    (["import-hf", "--hf", "no-such-folder", "--workdir", "w"], "no-such-folder"),
    (
      ["train", "--config", "configs/tiny.py", "--workdir", "w", "--config.model.variant=huge"],
      "model.variant='huge' is unknown",
    ),
    (["train", "--config", "configs/tiny.py", "--workdir", "w", "--config.train.stepz", "3"], "unknown config key"),
    (["train", "--config", "configs/tiny.py", "--workdir", "w", "--config.train.steps"], "missing value"),
    (["train", "--config", "nope.py", "--workdir", "w"], "no config file 'nope.py'"),
    (
      ["train", "--config", "configs/tiny.py", "--workdir", "w", "--frobnicate"],
      "unrecognized arguments: --frobnicate",
    ),
    (["export", "--workdir", "w", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["plot", "--workdir", "w", "--config.train.steps=3"], "plot: takes no --config.KEY=VALUE overrides"),
    (
      ["data", "preview", "--config", "configs/tiny.py", "--workdir", "w", "--batches", "0", "--out", "x.npz"],
      "--batches 0: give at least 1",
    ),
    (["bench", "--config", "configs/tiny.py", "--steps", "0"], "--steps 0: give at least 1"),
    (
      ["data", "prepare", "--config", "configs/tiny.py", "--out", "o", "--process_id", "2", "--num_processes", "2"],
      "--process_id 2 is not in 0..1 for --num_processes 2",
    ),
    (
      ["data", "prepare", "--config", "configs/tiny.py", "--out", "o", "--workers", "4"],
      "--workers goes with --process_id",
    ),
    (["nonsense"], "invalid choice: 'nonsense'"),
    (
      ["train", "--config", "configs/tiny.py", "--workdir", "w", "--dry-run", "--config.model.attention_impl=pallas"]
      + ["--config.data.seq_len=24"],
      "model.attention_impl='pallas' cannot run here: the triton kernel's sequence length 24",
    ),
    (
      ["train", "--config", "configs/tiny.py", "--workdir", "w", "--dry-run", "--topology", "v5p-8"]
      + ["--config.model.attention_impl=pallas", "--config.data.seq_len=320"],
      "model.attention_impl='pallas' cannot run here: the mosaic kernel's sequence length 320",
    ),
  ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("bertjax: error: ") and message in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_a_user_error_through_the_real_entry_point_has_no_traceback():
  out = run_cli("train", "--config", "configs/tiny.py", "--workdir", "w", "--config.data.seq_len=1024")
  assert out.returncode == 2
  assert out.stderr.strip() == (
    "bertjax: error: config data.seq_len=1024 exceeds model.max_position_embeddings=512; "
    "lower data.seq_len or raise model.max_position_embeddings"
  )
  assert out.stdout == ""


# -- fine-tuning: bad input is one line naming the file and the fix, and nothing is written ----------
@pytest.fixture(scope="module")
def init_run(micro_tokenizer, tmp_path_factory):
  """A folder that passes for a pretraining run up to its checkpoints: bad data stops before them."""
  from bertjax.config import loading
  from tests.support.micro import micro_run_config

  root = tmp_path_factory.mktemp("init")
  loading.write_config(micro_run_config(), root)
  micro_tokenizer.save(root / "tokenizer")
  return root


def _finetune_argv(init_run, workdir, *overrides, task="classification", config="configs/finetune/classification.py"):
  argv = ["finetune", "--task", task, "--config", config, "--init", str(init_run), "--workdir", str(workdir)]
  return argv + [f"--config.{o}" for o in ("finetune.max_seq_len=32", *overrides)]


def _jsonl(path, rows):
  import json

  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _assert_one_line(capsys, *parts):
  err = capsys.readouterr().err
  assert err.startswith("bertjax: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  for part in parts:
    assert part in err, err


@pytest.mark.parametrize(
  "train, dev, parts",
  [
    ([{"text": "a", "label": "no"}, {"text": "b", "label": "perhaps"}], None, ["train.jsonl line 2", "'perhaps'"]),
    ([{"sentence": "a", "label": "no"}], None, ["train.jsonl has no column 'text'", "set finetune.text_column"]),
    ([{"text": "a", "label": "no"}], [], ["dev.jsonl holds no examples"]),
  ],
)
def test_bad_fine_tuning_data_exits_2_with_one_line_and_writes_nothing(init_run, tmp_path, capsys, train, dev, parts):
  _jsonl(tmp_path / "train.jsonl", train)
  _jsonl(tmp_path / "dev.jsonl", train[:1] if dev is None else dev)
  files = [f"finetune.train_file={tmp_path}/train.jsonl", f"finetune.dev_file={tmp_path}/dev.jsonl"]
  assert cli.main(_finetune_argv(init_run, tmp_path / "run", *files, "finetune.labels=no,yes")) == 2
  _assert_one_line(capsys, *parts)
  assert not (tmp_path / "run").exists()


def test_a_glue_folder_without_the_task_exits_2(init_run, tmp_path, capsys):
  (tmp_path / "glue" / "SST-2").mkdir(parents=True)
  argv = _finetune_argv(init_run, tmp_path / "run", "finetune.glue_task=rte", f"finetune.data={tmp_path}/glue")
  assert cli.main(argv) == 2
  _assert_one_line(capsys, f"GLUE folder {tmp_path}/glue holds no RTE/ (task rte)")
  assert not (tmp_path / "run").exists()


def test_squad_answers_outside_their_contexts_exit_2_when_none_is_left(init_run, tmp_path, capsys):
  import json

  squad = {
    "data": [
      {
        "paragraphs": [
          {"context": "a b c", "qas": [{"id": "1", "question": "q", "answers": [{"text": "z", "answer_start": 0}]}]}
        ]
      }
    ]
  }
  for split in ("train", "dev"):
    (tmp_path / f"{split}.json").write_text(json.dumps(squad))
  files = [f"finetune.train_file={tmp_path}/train.json", f"finetune.dev_file={tmp_path}/dev.json"]
  argv = _finetune_argv(
    init_run,
    tmp_path / "run",
    *files,
    "finetune.max_query_len=8",
    "finetune.doc_stride=8",
    task="qa",
    config="configs/finetune/squad.py",
  )
  assert cli.main(argv) == 2
  _assert_one_line(capsys, f"{tmp_path}/train.json: no answer is in its context at its answer_start")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "argv, message",
  [
    (["finetune", "--task", "qa", "--config", "configs/finetune/squad.py", "--workdir", "w"], "--init"),
    (
      ["finetune", "--task", "qa", "--config", "configs/finetune/squad.py", "--workdir", "w", "--init", "no-such-run"],
      "no-such-run: holds no config.json and tokenizer/",
    ),
    (["glue", "--init", "i", "--data", "d", "--workdir", "w", "--tasks", "sst2,nope"], "'nope' is not a GLUE task"),
    (["finetune", "--task", "nope", "--config", "x", "--workdir", "w", "--init", "i"], "invalid choice: 'nope'"),
  ],
)
def test_fine_tuning_command_lines_that_cannot_run(argv, message, capsys):
  assert cli.main(argv) == 2
  _assert_one_line(capsys, message)
