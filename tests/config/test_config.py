"""Config files, command-line overrides and validation: each error names the key and the fix."""

import json
from pathlib import Path

import pytest

from bertjax.config import loading as config_lib
from bertjax.config.validation import validate, validate_for_devices
from bertjax.errors import BertjaxError
from tests.support.micro import micro_run_config

CONFIG_FILES = sorted(p for p in Path("configs").glob("*.py") if p.stem not in ("__init__", "common"))


def test_there_are_the_documented_config_files():
  assert {p.stem for p in CONFIG_FILES} >= {"tiny", "mini", "small", "medium", "base", "large"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_loads_and_validates(path):
  config = config_lib.load_config(str(path))
  validate(config)
  assert config.model.variant == path.stem or path.stem not in ("tiny", "mini", "small", "medium", "base", "large")


@pytest.mark.parametrize("name", ["base", "large"])
def test_phases_follow_berts_recipe(name):
  one = config_lib.load_config(f"configs/{name}.py:phase=1")
  two = config_lib.load_config(f"configs/{name}.py:phase=2")
  assert (one.data.seq_len, one.data.max_predictions, one.train.steps) == (128, 20, 900_000)
  assert (two.data.seq_len, two.data.max_predictions, two.train.steps) == (512, 80, 1_000_000)
  for c in (one, two):
    assert (c.train.batch_size, c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay) == (256, 1e-4, 10_000, 0.01)
    assert c.optim.schedule_steps == 1_000_000 and c.optim.decay == "linear"
  assert config_lib.load_config(f"configs/{name}.py").data.seq_len == 128  # phase 1 by default


def test_packaged_names_resolve_without_a_path():
  assert config_lib.load_config("large").model.variant == "large"


def test_overrides_are_parsed_with_the_fields_type():
  c = config_lib.load_config(
    "configs/tiny.py",
    [
      "train.steps=1e3",
      "optim.lr=3e-4",
      "model.scan_layers=false",
      "data.source=files:/x/*.txt",
      "model.hidden_size=256",
      "checkpoint.async=no",
    ],
  )
  assert c.train.steps == 1000 and isinstance(c.train.steps, int)
  assert c.optim.lr == 3e-4 and c.model.scan_layers is False and c.data.source == "files:/x/*.txt"
  assert c.model.hidden_size == 256 and c.checkpoint["async"] is False


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.stepz=3", "unknown config key"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("train.steps=many", "expected an integer"),
    ("train.steps=2.5", "expected an integer"),
    ("optim.lr=fast", "expected a number"),
    ("model.scan_layers=maybe", "expected true or false"),
    ("train", "expected --config.KEY=VALUE"),
  ],
)
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(BertjaxError, match=message):
    config_lib.load_config("configs/tiny.py", [override])


def test_mesh_rules_from_a_config_file_and_the_command_line(tmp_path):
  default = config_lib.load_config("configs/tiny.py").mesh.rules
  assert default.startswith("layers=,vocab=tensor,embed=fsdp,") and "act_batch=data+fsdp" in default
  c = config_lib.load_config("configs/tiny.py", ["mesh.rules=mlp=fsdp+tensor, embed="])
  assert c.mesh.rules == "mlp=fsdp+tensor, embed="
  delta = tmp_path / "rules.py"
  delta.write_text(
    "from configs import common\n\n\n"
    "def get_config(arg=None):\n  c = common.get_config()\n  c.mesh.rules = 'act_batch=data'\n  return c\n"
  )
  assert config_lib.load_config(str(delta)).mesh.rules == "act_batch=data"


def test_a_bad_mesh_rule_is_one_line_and_exit_status_2(capsys):
  from bertjax.cli import main

  status = main.main(
    ["train", "--config", "configs/tiny.py", "--workdir", "/tmp/unused", "--config.mesh.rules=embed=fdsp"]
  )
  err = capsys.readouterr().err
  assert status == 2
  assert err == (
    "bertjax: error: config mesh.rules: embed=fdsp names mesh axis 'fdsp'; map embed to data, fsdp, tensor "
    "joined by + (e.g. embed=fsdp+tensor), or to nothing (embed=)\n"
  )


def test_a_config_file_cannot_add_keys(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
    "from configs import common\n\ndef get_config(arg=None):\n"
    "  c = common.get_config()\n  c.model.hiden_size = 3\n  return c\n"
  )
  with pytest.raises(BertjaxError, match="hiden_size"):
    config_lib.load_config(str(bad))


def test_missing_config_file_lists_the_packaged_ones():
  with pytest.raises(BertjaxError, match="no config file 'nope.py'.*tiny"):
    config_lib.load_config("nope.py")


# (overrides, text the one-line message must contain: the key, and the fix)
VALIDATION_ERRORS = [
  ({"model.variant": "huge"}, "model.variant='huge' is unknown; choose one of"),
  ({"model.variant": "L3_H128"}, "model.variant='L3_H128' is unknown"),
  ({"model.num_heads": 3}, "model.hidden_size=32 is not divisible by model.num_heads=3"),
  ({"data.seq_len": 128}, "data.seq_len=128 exceeds model.max_position_embeddings=64"),
  ({"data.max_predictions": 40}, "data.max_predictions=40 exceeds data.seq_len=32"),
  ({"model.hidden_size": 0}, "model.hidden_size=0 must be positive"),
  ({"metrics.upload_every_s": -1.0}, "metrics.upload_every_s=-1.0 is negative"),
  ({"model.num_layers": -2}, "model.num_layers=-2 must be positive"),
  ({"data.seq_len": 0}, "data.seq_len=0 must be positive"),
  ({"train.batch_size": 0}, "train.batch_size=0 must be positive"),
  ({"train.steps": -1}, "train.steps=-1 must be positive"),
  ({"optim.lr": 0.0}, "optim.lr=0.0 must be positive"),
  ({"train.grad_accum": 3}, "train.batch_size=8 is not divisible by train.grad_accum=3"),
  ({"model.dropout": 1.0}, "model.dropout=1.0 is out of range"),
  ({"model.dtype": "float64"}, "model.dtype='float64' is not supported"),
  ({"model.remat": "some"}, "model.remat='some' is not supported; choose one of none, dots, dots_except_mlp_wide,"),
  ({"mesh.rules": "embedd=fsdp"}, "mesh.rules: 'embedd' is not a logical axis; use one of layers, vocab, embed,"),
  ({"mesh.rules": "embed=fdsp"}, "mesh.rules: embed=fdsp names mesh axis 'fdsp'; map embed to data, fsdp, tensor"),
  ({"model.attention_impl": "cudnn"}, "needs model.attention_dropout=0"),
  ({"optim.name": "sgd"}, "optim.name='sgd' is not supported"),
  ({"data.source": "web:x"}, "data.source='web:x' is not understood"),
  ({"data.source": "files:"}, "data.source='files:' is not understood"),
  ({"data.mask_prob": 0.0}, "data.mask_prob=0.0 is out of range"),
  ({"data.mask_token_prob": 0.95}, "exceeds 1"),
  ({"data.streaming_window_documents": 1}, "data.streaming_window_documents=1 leaves no other document"),
  ({"data.streaming_eval_documents": 1}, "data.streaming_eval_documents=1 cannot make NSP pairs"),
  ({"mesh.fsdp": 0}, "mesh.fsdp=0 is not a size"),
  ({"checkpoint.keep": 0}, "checkpoint.keep=0 must be positive"),
]


@pytest.mark.parametrize("overrides, message", VALIDATION_ERRORS, ids=[m for _, m in VALIDATION_ERRORS])
def test_each_validation_error_names_the_key(overrides, message):
  c = micro_run_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  with pytest.raises(BertjaxError) as e:
    validate(c)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_cudnn_without_attention_dropout_is_valid():
  c = micro_run_config()
  c.model.attention_impl, c.model.attention_dropout = "cudnn", 0.0
  validate(c)


def _validate_for(c, devices):
  """What a run does: the static checks at the entry point, then the ones that need the devices."""
  validate(c)
  validate_for_devices(c, devices)


@pytest.mark.parametrize(
  "mesh, devices, message",
  [
    ((2, 2, 1), 8, "data x fsdp x tensor = 2x2x1 = 4 devices, but 8 are present"),
    ((-1, 3, 1), 8, "8 devices do not divide by the fixed axes' product 3"),
    ((-1, -1, 1), 8, "more than one axis is -1"),
  ],
)
def test_a_mesh_that_does_not_match_the_devices(mesh, devices, message):
  c = micro_run_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  with pytest.raises(BertjaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
    _validate_for(c, devices)


def test_mesh_fill_and_batch_divisibility():
  c = micro_run_config()
  c.mesh.fsdp = 2
  _validate_for(c, 8)  # data fills to 4; batch 8 splits over 4 x 2
  c.train.batch_size = 12
  with pytest.raises(BertjaxError, match="does not split over mesh data\\*fsdp=8"):
    _validate_for(c, 8)


def test_resolved_config_round_trips_through_the_workdir(tmp_path):
  c = micro_run_config()
  c.train.steps = 123
  c.model.dtype = "bfloat16"
  config_lib.write_config(c, tmp_path / "run")
  written = json.loads((tmp_path / "run" / "config.json").read_text())
  assert written["train"]["steps"] == 123 and written["checkpoint"]["async"] is True
  back = config_lib.read_config(tmp_path / "run")
  assert back.to_dict() == c.to_dict()
  assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # nothing left over


def test_read_config_needs_a_run_folder(tmp_path):
  with pytest.raises(BertjaxError, match="no config.json there"):
    config_lib.read_config(tmp_path)
