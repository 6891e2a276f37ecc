"""The argument after `--config FILE:`: one typed helper reads it for every config file."""

import importlib.util
from pathlib import Path

import pytest

from bertjax.config import loading
from bertjax.config.defaults import config_args
from bertjax.errors import BertjaxError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# Every experiment file (common.py re-exports the defaults for them).
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS.parent)) for p in CONFIGS.rglob("[!_]*.py") if p.name != "common.py")


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_every_packaged_config_builds_without_an_argument(path):
  """`--config FILE` with nothing after it: get_config(None) (the recipe's included)."""
  spec = importlib.util.spec_from_file_location("config_under_test", CONFIGS.parent / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config(None).optim.lr >= 0  # 0: by the --init model's width


def test_values_are_parsed_like_their_defaults_and_choices_are_checked():
  args = config_args("lr=3e-5, task=mrpc", task="", lr=2e-5, phase=(1, 2))
  assert (args.lr, args.task, args.phase) == (3e-5, "mrpc", 1)
  assert config_args("phase=2", phase=(1, 2)).phase == 2
  assert vars(config_args(None, lr=2e-5)) == {"lr": 2e-5}


@pytest.mark.parametrize(
  ("spec", "said"),
  [
    (
      "configs/base.py:phase=3",
      "--config configs/base.py:phase=3: config argument phase=3: this config takes phase=1|2",
    ),
    (
      "configs/base.py:stage=2",
      "--config configs/base.py:stage=2: config argument 'stage=2': this config takes phase=1|2",
    ),
    (
      "configs/finetune/glue.py:task=mrpc,lr=fast",
      "--config configs/finetune/glue.py:task=mrpc,lr=fast: config argument lr=fast: expected a float; "
      "this config takes task=, lr=0.0",
    ),
    (
      "configs/tiny.py:phase=2",
      "--config configs/tiny.py:phase=2: config argument 'phase=2': this config takes no argument",
    ),
  ],
)
def test_a_bad_argument_is_one_line_naming_it_and_what_the_file_takes(spec, said):
  with pytest.raises(BertjaxError) as error:
    loading.load_config(spec, ["finetune.init=/runs/base"] if "finetune" in spec else [])
  assert str(error.value) == said


@pytest.mark.parametrize(
  "spec", ["finetune/glue.py:task=mrpc", "configs/finetune/glue.py:task=mrpc,lr=3e-5", "finetune/glue:task=rte"]
)
def test_packaged_configs_are_found_by_name_from_any_folder(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = loading.load_config(spec, ["finetune.init=/runs/base", "finetune.data=glue"])
  assert config.finetune.task == "classification" and config.finetune.data == str(tmp_path / "glue")


def test_an_unknown_config_lists_every_packaged_one(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(BertjaxError) as error:
    loading.load_config("finetune/nope.py")
  said = str(error.value)
  assert said.startswith("--config: no config file 'finetune/nope.py'; give a path to a .py file or one of: ")
  assert "base" in said and "finetune/glue" in said and "finetune/squad_v2" in said and "common" not in said


@pytest.mark.parametrize(("variant", "lr"), [("base", 2e-5), ("large", 2e-5), ("small", 1e-4), ("tiny", 1e-3)])
def test_a_fine_tune_left_to_the_model_takes_the_learning_rate_its_width_calls_for(variant, lr):
  """The recipe's default lr=0: the paper's 2e-5 for BERT-base and large, Turc et al.'s middle
  1e-4 for the compact BERTs, 1e-3 for the narrowest (tests/finetune's learnable tasks learn at it)."""
  data = ["finetune.init=/runs/x", "finetune.train_file=/a.jsonl", "finetune.dev_file=/b.jsonl", "finetune.labels=a,b"]
  assert loading.load_config("finetune/classification", [*data, f"model.variant={variant}"]).optim.lr == lr
  glue = loading.load_config(
    "finetune/glue:task=rte,lr=3e-5", [data[0], "finetune.data=/glue", f"model.variant={variant}"]
  )
  assert glue.optim.lr == 3e-5  # asked for
