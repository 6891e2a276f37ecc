"""Run configs in and out: config files with command-line overrides, and WORKDIR/config.json.

    load_config("configs/base.py:phase=2", ["train.steps=1000"])   a file + overrides, validated
    load_run_config(workdir, overrides)                            a run's config.json, validated
    write_config(config, workdir) / read_config(workdir)           WORKDIR/config.json

A config file defines `get_config(arg=None)` returning an ml_collections ConfigDict (usually
`bertjax.config.defaults.get_config()` with a few values changed); overrides are parsed with the
type of the field they replace. The two loaders are the entry points: they validate
(`bertjax.config.validation`) once, and everything downstream takes the config as given.
"""

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from etils import epath
from ml_collections import config_dict

from bertjax import atomic
from bertjax.config import defaults, paths, validation
from bertjax.errors import BertjaxError
from bertjax.model import config as model_config_lib

# The experiment files shipped beside the package (found by bare name: `--config base`).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILENAME = "config.json"


def packaged_configs() -> list[str]:
  """The experiment files that ship with bertjax, by the name `--config` takes (`base`, `finetune/glue`)."""
  files = (p for p in PACKAGED_CONFIGS.rglob("*.py") if not p.name.startswith("_") and p.name != "common.py")
  return sorted(p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix() for p in files)


def _config_path(path: str) -> Path:
  """A config file: a path to one, or a packaged config by name from any working directory
  (`base`, `finetune/glue.py`, `configs/finetune/glue.py`)."""
  candidate = Path(path)
  if candidate.is_file():
    return candidate
  name = candidate.as_posix().removeprefix("configs/").removesuffix(".py")
  if name in packaged_configs():
    return PACKAGED_CONFIGS / f"{name}.py"
  raise BertjaxError(
    f"--config: no config file {path!r}; give a path to a .py file or one of: {', '.join(packaged_configs())}"
  )


def load_config(spec: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """The validated config of `FILE[:ARG]` with `KEY=VALUE` overrides applied.

  Args:
    spec: a config file path, optionally with `:ARG` for its `get_config(arg)`, or the bare name
      of a packaged config (`tiny`, `base`, `finetune/glue`, ...).
    overrides: `section.key=value` strings, applied in order.
  Raises:
    BertjaxError: one line naming the file or key and the fix.
  """
  return finish(build_config(spec, overrides))


def build_config(spec: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """`load_config`'s config before its paths are resolved and it is validated: for a caller that
  resolves more first (`finish` then makes it final)."""
  path, _, arg = spec.partition(":")
  file = _config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"bertjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (AttributeError, KeyError) as e:  # a locked ConfigDict refuses unknown keys
    raise BertjaxError(
      f"--config {file}: {_first_line(e)}; set only keys that bertjax/config/defaults.py defines"
    ) from None
  if not hasattr(module, "get_config"):
    raise BertjaxError(f"--config {file}: defines no get_config(arg=None); add one that returns a ConfigDict")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise BertjaxError(f"--config {spec}: {_first_line(e)}") from None
  except (AttributeError, KeyError) as e:
    raise BertjaxError(
      f"--config {file}: {_first_line(e)}; set only keys that bertjax/config/defaults.py defines"
    ) from None
  for override in overrides:
    apply_override(config, override)
  return config


def finish(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """What is resolved from the file system (absolute paths, a warm start's tokenizer), then the
  validation: the config is final from here on."""
  paths.absolute(config)
  _resolve_tokenizer(config)
  _resolve_learning_rate(config)
  validation.validate(config)
  return config


def finetuning_learning_rate(hidden_size: int) -> float:
  """The fine-tuning learning rate of a model of this width, when the config leaves it to the
  model (`optim.lr=0`, the fine-tuning recipe's default): BERT-base and large take the paper's
  2e-5 (appendix A.3 picks among 5e-5, 4e-5, 3e-5 and 2e-5); the compact BERTs of Turc et al.
  (2019) were fine-tuned with 3e-4, 1e-4, 5e-5 or 3e-5, so widths 256 to 512 take 1e-4; narrower
  ones take 1e-3 (the tests' micro model learns its pair task at 1e-3 and not at 2e-5 or 1e-4;
  docs/finetuning.md has the figures)."""
  if hidden_size >= 768:
    return 2e-5
  return 1e-4 if hidden_size >= 256 else 1e-3


def _resolve_learning_rate(config: config_dict.ConfigDict) -> None:
  """A fine-tune's `optim.lr=0`: the rate its model's width calls for (the model's sizes are the
  --init run's by now)."""
  if config.finetune.task and not config.optim.lr:
    config.optim.lr = finetuning_learning_rate(model_config_lib.variant_sizes(config.model).hidden_size)


def _resolve_tokenizer(config: config_dict.ConfigDict) -> None:
  """A warm start keeps the vocabulary it was trained with: without data.tokenizer, that of the
  train.init_from run. Resolved here, before validation: the validated config is final."""
  init_tokenizer = epath.Path(config.train.init_from) / "tokenizer" if config.train.init_from else None
  if not config.data.tokenizer and init_tokenizer is not None and init_tokenizer.exists():
    config.data.tokenizer = str(init_tokenizer)


def _first_line(e: Exception) -> str:
  return str(e).strip("'\"").splitlines()[0][:300]


def _parse_value(key: str, text: str, kind: type):
  if kind is bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise BertjaxError(f"--config.{key}={text}: expected true or false")
  if kind is int:
    try:
      number = float(text.replace("_", ""))
    except ValueError:
      number = math.nan
    if not number.is_integer():
      raise BertjaxError(f"--config.{key}={text}: expected an integer")
    return int(number)
  if kind is float:
    try:
      return float(text)
    except ValueError:
      raise BertjaxError(f"--config.{key}={text}: expected a number") from None
  return text


def apply_override(config: config_dict.ConfigDict, override: str) -> None:
  """Apply one `section.key=value`, parsing the value with the type of the field."""
  key, sep, text = override.partition("=")
  if not sep:
    raise BertjaxError(f"--config.{override}: expected --config.KEY=VALUE")
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      raise BertjaxError(f"--config.{key}: unknown config key {'.'.join(parents[: i + 1])!r}; known: {_known(node)}")
    node = node[part]
  if not isinstance(node, config_dict.ConfigDict) or leaf not in node or isinstance(node[leaf], config_dict.ConfigDict):
    raise BertjaxError(f"--config.{key}: unknown config key; known keys here: {_known(node)}")
  node[leaf] = _parse_value(key, text, node.get_type(leaf))


def _known(node) -> str:
  return ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "(none)"


def to_dict(config: config_dict.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def write_config(config: config_dict.ConfigDict, workdir) -> None:
  """Write the resolved config to WORKDIR/config.json, never half-written."""
  values = paths.to_workdir(to_dict(config), workdir)  # so the folder can move with what it holds
  atomic.write_text(epath.Path(workdir) / CONFIG_FILENAME, json.dumps(values, indent=2, sort_keys=True) + "\n")


def read_config(workdir) -> config_dict.ConfigDict:
  """The config a run wrote into WORKDIR/config.json, on top of today's defaults (not validated:
  a run's own config was valid when it was written)."""
  source = epath.Path(workdir) / CONFIG_FILENAME
  if not source.exists():
    raise BertjaxError(
      f"--workdir {workdir}: no {CONFIG_FILENAME} there; pass the workdir of a bertjax run or --config FILE"
    )
  config = defaults.get_config()
  _merge(config, json.loads(source.read_text()), prefix="")
  paths.from_workdir(config, workdir)
  return config


def written_config(workdir) -> dict:
  """WORKDIR/config.json as its run wrote it: the keys it holds, in the defaults' order.

  What describes a run in its exports: keys added to the defaults after the run was written are
  not part of its config, so the export of an older run stays what it was.
  """
  written = json.loads((epath.Path(workdir) / CONFIG_FILENAME).read_text())

  def keep(values: dict, present: dict) -> dict:
    return {k: keep(v, present[k]) if isinstance(v, dict) else v for k, v in values.items() if k in present}

  return keep(to_dict(read_config(workdir)), written)


def load_run_config(workdir, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """The validated config of an earlier run (WORKDIR/config.json) with overrides applied: how a
  run is resumed, or an imported one trained, without naming its config file again."""
  config = read_config(workdir)
  for override in overrides:
    apply_override(config, override)
  paths.absolute(config)
  validation.validate(config)
  return config


def _merge(config: config_dict.ConfigDict, values: dict, prefix: str) -> None:
  for key, value in values.items():
    if key not in config:
      print(f"warning: ignoring config key {prefix}{key} from an older or newer bertjax", file=sys.stderr)
    elif isinstance(value, dict):
      _merge(config[key], value, prefix=f"{prefix}{key}.")
    else:
      config[key] = value
