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
