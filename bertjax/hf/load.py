"""Loading a BERT into Python: from a transformers folder, a bertjax export, or a bertjax run.

from_pretrained(folder)          -> (model, tokenizer) from any of the three
load_finetuned(workdir)          -> (model, tokenizer, task) of a fine-tuning run
model_from_hf_folder(folder)     -> (model, parameters the checkpoint lacked)
load_params_export(folder)       -> (params, BertConfig) of `bertjax export --format params`
params_of(model), load_params_into(model, params)   an NNX model <-> a parameter pure dict
"""

import dataclasses
import json
import logging

import jax
import numpy as np
from etils import epath
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from bertjax import tasks
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune.task import Finetune
from bertjax.hf import folders, names
from bertjax.hf import tokenizer as hf_tokenizer
from bertjax.hf.export import PARAMS_FILE, PARAMS_FORMAT, read_run
from bertjax.model import bert
from bertjax.model.bert import BertForPreTraining, init_model
from bertjax.model.config import BertConfig
from bertjax.train import checkpoint

log = logging.getLogger(__name__)


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as a pure dict of writable host numpy arrays (copies)."""
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def load_params_into(model: nnx.Module, params: dict) -> None:
  """Write a parameter pure dict into `model`, keeping each parameter's dtype and placement.

  Raises:
    BertjaxError: the dict's paths or shapes differ from the model's.
  """
  state = nnx.state(model, nnx.Param)
  current = flatten_dict(nnx.to_pure_dict(state), sep="/")
  given = flatten_dict(params, sep="/")
  if set(given) != set(current):
    diff = sorted(set(given) ^ set(current))
    raise BertjaxError(
      f"parameters {diff[:3]} are in only one of the given tree and the model; "
      "build the model with the config the parameters came from"
    )
  for path, old in current.items():
    if tuple(np.shape(given[path])) != tuple(old.shape):
      raise BertjaxError(
        f"parameter {path} has shape {tuple(np.shape(given[path]))}, the model "
        f"expects {tuple(old.shape)}; build the model with the matching config"
      )
    # device_put onto the old sharding: a model laid out over a mesh stays laid out.
    given[path] = jax.device_put(np.asarray(given[path], old.dtype), old.sharding)
  nnx.replace_by_pure_dict(state, unflatten_dict(given, sep="/"))
  nnx.update(model, state)


def model_from_hf_folder(directory, *, dtype: str = "float32", seed: int = 0) -> tuple[BertForPreTraining, list[str]]:
  """(model, bertjax paths initialised fresh because the checkpoint lacks them)."""
  hf_config, tensors = folders.read_hf_checkpoint(directory)
  cfg = dataclasses.replace(names.bert_config_from_hf(hf_config), dtype=dtype)
  model = init_model(cfg, seed)
  params, fresh = names.from_hf_state_dict(tensors, cfg, init_params=params_of(model))
  load_params_into(model, params)
  return model, fresh


def load_params_export(directory) -> tuple[dict, BertConfig]:
  """(params pure dict of numpy arrays, BertConfig) of an `export --format params` folder.

  model = bertjax.model.init_model(cfg); bertjax.load_params_into(model, params).

  Raises:
    BertjaxError: `directory` is not a params export.
  """
  directory = epath.Path(directory)
  config_file = directory / "config.json"
  if not (directory / PARAMS_FILE).exists() or not config_file.exists():
    raise BertjaxError(f"{directory}: no {PARAMS_FILE} and config.json; give a `bertjax export --format params` folder")
  description = json.loads(config_file.read_text())
  if description.get("format") != PARAMS_FORMAT:
    raise BertjaxError(f"{config_file} is not a bertjax params export (format {description.get('format')!r})")
  cfg = BertConfig(**description["bert_config"])
  return unflatten_dict(folders.read_safetensors(directory / PARAMS_FILE), sep="/"), cfg


def from_pretrained(
  directory, *, dtype: str = "float32", step: int | None = None
) -> tuple[BertForPreTraining, tokenizer_lib.Tokenizer | None]:
  """(model, tokenizer) from a transformers BERT folder, a bertjax export or a bertjax workdir.

  The model computes in `dtype` (float32 by default; parameters are float32 always). The
  tokenizer is None for a transformers folder without tokenizer files. Heads a plain BertModel
  lacks are initialised fresh (seed 0) and logged. `step` picks a workdir's checkpoint.

  Raises:
    BertjaxError: `directory` is none of the three, is a fine-tuning run, or cannot be read.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise BertjaxError(f"{directory}: no such folder; give a transformers BERT folder, a bertjax export or workdir")
  if (directory / PARAMS_FILE).exists():
    params, cfg = load_params_export(directory)
    tokenizer = tokenizer_lib.load_tokenizer(directory / "tokenizer")
  elif folders.is_hf_folder(directory):
    model, fresh = model_from_hf_folder(directory, dtype=dtype)
    if fresh:
      log.warning("%s lacks %s: initialised fresh", directory, ", ".join(fresh))
    tokenizer = hf_tokenizer.load_from_transformers(directory) if hf_tokenizer.has_tokenizer(directory) else None
    return model, tokenizer
  elif (directory / checkpoint.CHECKPOINT_DIR).exists():
    run = read_run(directory, step)
    if run.config.finetune.task:
      raise BertjaxError(f"{directory} is a fine-tuning run: load it with bertjax.hf.load.load_finetuned")
    params, cfg, tokenizer = run.params, run.model_config, run.tokenizer
  else:
    raise BertjaxError(
      f"{directory}: holds neither a transformers config.json with weights, a {PARAMS_FILE} "
      "nor checkpoints; give a transformers BERT folder, a bertjax export or workdir"
    )
  model = init_model(dataclasses.replace(cfg, dtype=dtype, attention_impl="xla"))
  load_params_into(model, params)
  return model, tokenizer


def load_finetuned(
  workdir, *, dtype: str = "float32", step: int | None = None
) -> tuple[nnx.Module, tokenizer_lib.Tokenizer, tasks.TaskSpec]:
  """(model, tokenizer, task) of a fine-tuning run's checkpoint (default: the newest good one):
  a bertjax.finetune.heads.SequenceClassifier, SpanPredictor, TokenClassifier or ChoiceScorer
  computing in `dtype`.

  Raises:
    BertjaxError: `workdir` is not a fine-tuning run, or `read_run`'s.
  """
  run = read_run(workdir, step)
  if not run.config.finetune.task:
    raise BertjaxError(f"{workdir} is not a fine-tuning run: load it with bertjax.hf.load.from_pretrained")
  spec = run.task
  cfg = dataclasses.replace(run.model_config, dtype=dtype, attention_impl="xla")
  model = bert.initialise(Finetune(spec, run.config.finetune.head_dropout).build, cfg)
  load_params_into(model, run.params)
  return model, run.tokenizer, spec
