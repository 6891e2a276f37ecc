"""Config loading (ml_collections files + command-line overrides) and validation.

`load_config("configs/base.py:phase=2", ["train.steps=1000"])` imports the file, calls its
`get_config(arg)`, applies the overrides with the type of the field they replace, and
`validate(config)` checks every value before any device work. Each problem is a BertjaxError
whose one line names the key and the fix.
"""

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_collections import config_dict

from bertjax import model as model_lib
from bertjax import sharding
from bertjax.errors import BertjaxError

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DATA_SOURCES = ("builtin", "files:", "hf:", "disk:")
CONFIG_FILENAME = "config.json"


def _config_path(path: str) -> Path:
  candidate = Path(path)
  if candidate.is_file():
    return candidate
  # A bare name (`base`, `base.py`) or `configs/base.py` outside a checkout also finds the
  # configs that ship with bertjax.
  packaged = PACKAGED_CONFIGS / (candidate.name if candidate.suffix == ".py" else f"{candidate.name}.py")
  if candidate.parent in (Path("."), Path("configs")) and packaged.is_file():
    return packaged
  known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if not p.stem.startswith("_")))
  raise BertjaxError(f"--config: no config file {path!r}; give a path to a .py file or one of: {known}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
  """The config of `FILE[:ARG]` with `KEY=VALUE` overrides applied (not yet validated)."""
  path, _, arg = spec.partition(":")
  file = _config_path(path)
  module_spec = importlib.util.spec_from_file_location(f"bertjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (AttributeError, KeyError) as e:  # a locked ConfigDict refuses unknown keys
    raise BertjaxError(f"--config {file}: {_first_line(e)}; set only keys that configs/common.py defines") from None
  if not hasattr(module, "get_config"):
    raise BertjaxError(f"--config {file}: defines no get_config(arg=None); add one that returns a ConfigDict")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise BertjaxError(f"--config {spec}: {_first_line(e)}") from None
  except (AttributeError, KeyError) as e:
    raise BertjaxError(f"--config {file}: {_first_line(e)}; set only keys that configs/common.py defines") from None
  for override in overrides:
    apply_override(config, override)
  return config


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


def _fail(key: str, problem: str, fix: str):
  raise BertjaxError(f"config {key}={problem}; {fix}")


def _positive(config, *keys: str):
  for key in keys:
    value = _get(config, key)
    if value is not None and value <= 0:
      _fail(key, f"{value} must be positive", f"set --config.{key} to a value above 0")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _choice(config, key: str, choices: Sequence[str]):
  value = _get(config, key)
  if value not in choices:
    _fail(key, f"{value!r} is not supported", f"choose one of {', '.join(choices)}")


def _fraction(config, key: str, low_open: bool = False, high_open: bool = True):
  value = _get(config, key)
  lo_ok = value > 0 if low_open else value >= 0
  hi_ok = value < 1 if high_open else value <= 1
  if not (lo_ok and hi_ok):
    _fail(key, f"{value} is out of range", f"set --config.{key} to a value in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def validate(config: config_dict.ConfigDict, device_count: int | None = None) -> None:
  """Raise a BertjaxError for the first invalid value. With `device_count`, also check the mesh."""
  m, d, t, _o = config.model, config.data, config.train, config.optim
  if m.variant not in model_lib.VARIANTS:
    named = ", ".join(k for k in model_lib.VARIANTS if not k.startswith("L"))
    _fail("model.variant", f"{m.variant!r} is unknown", f"choose one of {named} or L{{2,4,..,12}}_H{{128,256,512,768}}")
  _positive(config, "model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
            "model.max_position_embeddings", "model.type_vocab_size", "model.layer_norm_eps",
            "model.initializer_range")
  sizes = model_lib.variant_sizes(m)
  if sizes.hidden_size % sizes.num_heads:
    _fail("model.hidden_size", f"{sizes.hidden_size} is not divisible by model.num_heads={sizes.num_heads}",
          "set model.num_heads to a divisor of model.hidden_size")
  _fraction(config, "model.dropout")
  _fraction(config, "model.attention_dropout")
  _choice(config, "model.dtype", model_lib.DTYPES)
  _choice(config, "model.attention_impl", model_lib.ATTENTION_IMPLS)
  _choice(config, "model.remat", model_lib.REMAT_POLICIES)
  if m.attention_impl == "cudnn" and m.attention_dropout > 0:
    _fail("model.attention_impl", "'cudnn' needs model.attention_dropout=0 (cuDNN flash attention has no attention dropout)",
          "set --config.model.attention_dropout=0, or model.attention_impl=auto to fall back to XLA")

  _positive(config, "data.seq_len", "data.max_predictions", "data.vocab_size", "data.tokenizer_sentences")
  if d.seq_len > m.max_position_embeddings:
    _fail("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}",
          "lower data.seq_len or raise model.max_position_embeddings")
  if d.seq_len < 8:
    _fail("data.seq_len", f"{d.seq_len} leaves no room for a sentence pair", "set data.seq_len to at least 8")
  if d.max_predictions > d.seq_len:
    _fail("data.max_predictions", f"{d.max_predictions} exceeds data.seq_len={d.seq_len}",
          "set data.max_predictions to at most data.seq_len (BERT: 20 at 128, 80 at 512)")
  _fraction(config, "data.mask_prob", low_open=True)
  _fraction(config, "data.short_seq_prob", high_open=False)
  _fraction(config, "data.eval_fraction")
  if d.vocab_size < 8:
    _fail("data.vocab_size", f"{d.vocab_size} is too small", "set data.vocab_size to at least 8 (5 special tokens + pieces)")
  if not (d.source == "builtin" or (d.source.startswith(DATA_SOURCES[1:]) and d.source.split(":", 1)[1])):
    _fail("data.source", f"{d.source!r} is not understood", "use builtin, files:GLOB, hf:NAME[:CONFIG] or disk:DIR")
  _choice(config, "data.tokenizer_model", ("unigram", "bpe"))
  _fraction(config, "data.pair_random_next_prob", high_open=False)
  _fraction(config, "data.mask_token_prob", high_open=False)
  _fraction(config, "data.random_token_prob", high_open=False)
  if d.mask_token_prob + d.random_token_prob > 1:
    _fail("data.mask_token_prob", f"{d.mask_token_prob} + data.random_token_prob={d.random_token_prob} exceeds 1",
          "lower them so that their sum is at most 1 (BERT: 0.8 and 0.1)")
  _positive(config, "data.prefetch", "data.max_sentence_chars")
  if d.num_proc < 0:
    _fail("data.num_proc", f"{d.num_proc} is negative", "set it to 0 (one process per core) or more")
  if d.streaming_window_documents < 2:
    _fail("data.streaming_window_documents", f"{d.streaming_window_documents} leaves no other document for a "
          "random next sentence", "set it to at least 2")
  if d.streaming_eval_documents == 1 or d.streaming_eval_documents < 0:
    _fail("data.streaming_eval_documents", f"{d.streaming_eval_documents} cannot make NSP pairs",
          "set it to 0 (no held-out split) or at least 2")

  _positive(config, "train.batch_size", "train.steps", "train.grad_accum", "train.log_every", "train.eval_every")
  if t.eval_batches < 0:
    _fail("train.eval_batches", f"{t.eval_batches} is negative", "set it to 0 (no evaluation) or more")
  if t.batch_size % t.grad_accum:
    _fail("train.batch_size", f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
          "make the global batch a multiple of the number of microbatches")

  if t.profile_steps:
    start, _, stop = t.profile_steps.partition(":")
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
      _fail("train.profile_steps", f"{t.profile_steps!r}: expected START:STOP with START < STOP",
            "e.g. --config.train.profile_steps=10:15, or empty for no trace")
  if t.distributed_timeout_s <= 0:
    _fail("train.distributed_timeout_s", f"{t.distributed_timeout_s} must be positive", "e.g. 300 (seconds)")

  _choice(config, "optim.name", ("adamw", "lamb"))
  _choice(config, "optim.decay", ("linear", "polynomial", "constant"))
  _positive(config, "optim.lr", "optim.max_nonfinite", "optim.eps")
  for key in ("optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "optim.end_lr"):
    if _get(config, key) < 0:
      _fail(key, f"{_get(config, key)} is negative", f"set --config.{key} to 0 or more")
  _fraction(config, "optim.b1")
  _fraction(config, "optim.b2")

  _positive(config, "checkpoint.every_steps", "checkpoint.keep")
  if config.checkpoint.keep_period < 0:
    _fail("checkpoint.keep_period", f"{config.checkpoint.keep_period} is negative", "set it to 0 (off) or a step interval")

  if device_count is not None:
    data, fsdp, _ = sharding.mesh_shape(config.mesh, device_count)
    if t.batch_size % (data * fsdp * t.grad_accum):
      _fail("train.batch_size", f"{t.batch_size} does not split over mesh data*fsdp={data * fsdp} x grad_accum={t.grad_accum}",
            "make the global batch a multiple of data*fsdp*grad_accum")
  else:
    sharding.check_mesh_config(config.mesh)


def to_dict(config: config_dict.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def write_config(config: config_dict.ConfigDict, workdir) -> None:
  """Write the resolved config to WORKDIR/config.json (atomically: never half-written)."""
  from etils import epath

  target = epath.Path(workdir) / CONFIG_FILENAME
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{CONFIG_FILENAME}.tmp"
  tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
  tmp.replace(target)


def read_config(workdir) -> config_dict.ConfigDict:
  """The config a run wrote into WORKDIR/config.json, on top of today's defaults."""
  from etils import epath

  from configs import common

  source = epath.Path(workdir) / CONFIG_FILENAME
  if not source.exists():
    raise BertjaxError(f"--workdir {workdir}: no {CONFIG_FILENAME} there; pass the workdir of a bertjax run or --config FILE")
  config = common.get_config()
  _merge(config, json.loads(source.read_text()), prefix="")
  return config


def _merge(config: config_dict.ConfigDict, values: dict, prefix: str) -> None:
  for key, value in values.items():
    if key not in config:
      print(f"warning: ignoring config key {prefix}{key} from an older or newer bertjax", file=sys.stderr)
    elif isinstance(value, dict):
      _merge(config[key], value, prefix=f"{prefix}{key}.")
    else:
      config[key] = value
