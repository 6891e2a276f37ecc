"""The command line: every command exists with --help; a user error is one line and exit 2."""

import os
import subprocess
import sys

import pytest

from bertjax import cli

COMMANDS = [
  "train",
  "eval",
  "export",
  "import-hf",
  "tokenizer train",
  "data preview",
  "data bench",
  "bench",
  "plot",
  "finetune",
]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run(
    [sys.executable, "-m", "bertjax", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
  )


def test_help_lists_every_command():
  out = run_cli("--help")
  assert out.returncode == 0
  for name in ("train", "eval", "export", "import-hf", "tokenizer", "data", "bench", "plot", "finetune"):
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
    (["nonsense"], "invalid choice: 'nonsense'"),
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


@pytest.mark.parametrize(
  "argv",
  [
    ["finetune", "--task", "qa", "--config", "configs/tiny.py", "--workdir", "w", "--init", "i"],
  ],
)
def test_commands_this_version_lacks_say_so(argv, capsys):
  assert cli.main(argv) == 2
  assert "not part of this version" in capsys.readouterr().err
