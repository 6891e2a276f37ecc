"""A command validates its config once, at the entry point; nothing downstream checks it again."""

import pytest

from bertjax.cli import main as cli
from bertjax.config import validation
from tests.support.runs import train_args


@pytest.fixture
def counted(monkeypatch):
  """Counts calls of the static and the device-dependent validation, wherever they come from."""
  calls = {"validate": 0, "validate_for_devices": 0}
  for name in calls:
    original = getattr(validation, name)

    def counting(*args, _name=name, _original=original, **kwargs):
      calls[_name] += 1
      return _original(*args, **kwargs)

    monkeypatch.setattr(validation, name, counting)
  return calls


def test_train_and_eval_each_validate_once_and_check_the_devices_once(tmp_path, corpus_and_tokenizer, counted):
  assert cli.main(train_args(corpus_and_tokenizer, tmp_path / "run", steps=1)) == 0
  assert counted == {"validate": 1, "validate_for_devices": 1}
  counted.update(validate=0, validate_for_devices=0)
  assert cli.main(["eval", "--workdir", str(tmp_path / "run")]) == 0  # the run folder's config.json
  assert counted == {"validate": 1, "validate_for_devices": 1}


def test_a_validated_config_is_final_nothing_downstream_writes_into_it(tmp_path, pretrained, task_files):
  """A warm start (which takes its vocabulary from train.init_from) and a fine-tune of custom
  classes (which the data resolves) both run on configs frozen right after validation."""
  from ml_collections import FrozenConfigDict

  from bertjax.config import loading
  from bertjax.finetune import job
  from bertjax.train import pretrain
  from tests.support.finetune import pair_task_config
  from tests.support.runs import MICRO_OVERRIDES

  root = pretrained.parent
  warm = loading.load_config(
    "configs/tiny.py",
    MICRO_OVERRIDES
    + [
      f"data.source=files:{root}/corpus.txt",
      f"data.cache_dir={root}/cache",
      f"train.init_from={pretrained}",
      "train.init_params_only=true",
      "train.steps=2",
      "train.eval_every=100",
    ],
  )
  assert warm.data.tokenizer == str(pretrained / "tokenizer")  # resolved before validation
  assert int(pretrain.train(FrozenConfigDict(warm), tmp_path / "warm").state.step) == 2
  tune = pair_task_config(pretrained, task_files, "finetune.epochs=1")
  assert job.finetune(FrozenConfigDict(tune), tmp_path / "tune").final
