"""Files across the transformers boundary: export a run, import a transformers BERT, load either.

    export_hf(workdir, out, step)       a transformers BertForPreTraining folder: config.json,
                                        model.safetensors (float32, padding rows stripped), tokenizer
    export_params(workdir, out, step)   bertjax's own flat names in params.safetensors + config.json
    load_params_export(folder)          -> (params, BertConfig): the loader for the above
    read_hf_checkpoint(folder)          -> (config.json dict, {tensor name: numpy array})
    import_hf(hf_dir, workdir)          a workdir with a step-0 checkpoint (bertjax.hf_import)
    from_pretrained(folder)             -> (model, tokenizer) from any of these

The tensor name map itself is bertjax.hf. Exports are written into a temporary folder that is
renamed into place once complete, so a failed export never leaves a half-written folder, and an
existing folder is replaced only when it is itself a bertjax export.
"""

import dataclasses
import json
import logging
import os

import numpy as np
import safetensors.numpy
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from bertjax import checkpoint, hf, hf_tokenizer
from bertjax import config as config_lib
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.model import BertConfig, BertForPreTraining, init_model, resolve_config

log = logging.getLogger(__name__)

EXPORT_MARKER = "bertjax_export.json"  # written last into every export; names its format and origin
PARAMS_FILE = "params.safetensors"
PARAMS_FORMAT = "bertjax-params"
FORMATS = ("hf", "params")


# -- reading transformers folders ------------------------------------------------------------------
def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  data = path.read_bytes()
  try:
    return safetensors.numpy.load(data)
  except TypeError:  # bfloat16 has no numpy dtype: let torch read it and widen to float32
    from safetensors import torch as safetensors_torch
    return {k: v.float().numpy() for k, v in safetensors_torch.load(data).items()}
  except Exception as e:  # safetensors raises its own error types on a damaged header
    raise BertjaxError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from e


def _read_weights(directory: epath.Path) -> dict[str, np.ndarray]:
  if (directory / "model.safetensors").exists():
    return _read_safetensors(directory / "model.safetensors")
  index = directory / "model.safetensors.index.json"
  if index.exists():  # sharded: {"weight_map": {tensor name: file}}
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      tensors.update(_read_safetensors(directory / shard))
    return tensors
  if (directory / "pytorch_model.bin").exists():
    try:
      import torch
    except ImportError:
      raise BertjaxError(f"{directory}/pytorch_model.bin needs PyTorch to read; install torch or convert "
                         "the checkpoint to model.safetensors") from None
    try:
      state = torch.load(str(directory / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    except Exception as e:
      raise BertjaxError(f"{directory}/pytorch_model.bin cannot be read ({type(e).__name__}); "
                         "re-download it or convert it to model.safetensors") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  raise BertjaxError(f"transformers folder {directory} holds no model.safetensors or pytorch_model.bin; point it at a "
                     "transformers BERT folder (save_pretrained output)")


def read_hf_checkpoint(directory) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, {tensor name: numpy array}) of a transformers BERT folder."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise BertjaxError(f"transformers folder {directory}: no such folder; give a transformers BERT folder")
  config_file = directory / "config.json"
  if not config_file.exists():
    raise BertjaxError(f"transformers folder {directory} holds no config.json; copy the checkpoint's config.json there")
  try:
    hf_config = json.loads(config_file.read_text())
  except ValueError as e:
    raise BertjaxError(f"{config_file} is not valid JSON ({e}); restore the checkpoint's config.json") from e
  hf.bert_config_from_hf(hf_config)  # refuse a non-BERT config before reading any weights
  return hf_config, _read_weights(directory)


def model_from_hf_folder(directory, *, dtype: str = "float32", seed: int = 0
                         ) -> tuple[BertForPreTraining, list[str]]:
  """(model, bertjax paths initialised fresh because the checkpoint lacks them)."""
  hf_config, tensors = read_hf_checkpoint(directory)
  cfg = dataclasses.replace(hf.bert_config_from_hf(hf_config), dtype=dtype)
  model = init_model(cfg, seed)
  params, fresh = hf.from_hf_state_dict(tensors, cfg, init_params=hf.params_of(model))
  hf.load_params_into(model, params)
  return model, fresh


# -- exporting a run ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSnapshot:
  """What export needs of a run: its config, model config, tokenizer and one step's parameters."""

  config: object
  model_config: BertConfig
  tokenizer: tokenizer_lib.Tokenizer
  params: dict
  step: int


def read_run(workdir, step: int | None = None) -> RunSnapshot:
  """A run's parameters at `step` (default: the newest restorable), with what describes them."""
  workdir = epath.Path(workdir)
  config = config_lib.read_config(workdir)
  tokenizer_dir = workdir / "tokenizer"
  if not tokenizer_dir.exists():
    raise BertjaxError(f"--workdir {workdir}: no tokenizer/ folder; pass the workdir of a bertjax run")
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
  model_config = resolve_config(config.model, vocab_size=tokenizer.vocab_size, backend="cpu")
  if not (workdir / checkpoint.CHECKPOINT_DIR).exists():
    raise BertjaxError(f"--workdir {workdir}: no checkpoints yet; train first (bertjax train) or import one")
  with checkpoint.Checkpoints(workdir, read_only=True) as checkpoints:
    if not checkpoints.steps():
      raise BertjaxError(f"--workdir {workdir}: no checkpoints yet; train first (bertjax train) or import one")
    def check(meta):
      checkpoint.check_compatible(meta, model_config, tokenizer.fingerprint, f"--workdir {workdir}")
    params, meta = checkpoints.restore_params(step=step, check=check)
  return RunSnapshot(config, model_config, tokenizer, params, int(meta["step"]))


def _replace_atomically(out: epath.Path, write) -> None:
  """Run `write(folder)` on a temporary sibling of `out`, then rename it into place."""
  if out.exists() and not out.is_dir():
    raise BertjaxError(f"--out {out} is a file; give a folder")
  if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).exists():
    raise BertjaxError(f"--out {out} is not empty and not a bertjax export; give a new or empty folder")
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.parent / f".{out.name}.partial-{os.getpid()}"
  if partial.exists():
    partial.rmtree()
  partial.mkdir()
  try:
    write(partial)
  except BaseException:
    partial.rmtree()
    raise
  if out.exists():
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    partial.rename(out)
    old.rmtree()
  else:
    partial.rename(out)


def _marker(fmt: str, workdir, run: RunSnapshot) -> str:
  return json.dumps({"format": fmt, "workdir": str(workdir), "step": run.step,
                     "tokenizer_fingerprint": run.tokenizer.fingerprint}, indent=1) + "\n"


def default_out(workdir, fmt: str) -> epath.Path:
  """WORKDIR/export/hf or WORKDIR/export/params: both formats can sit side by side."""
  return epath.Path(workdir) / "export" / fmt


def export_hf(workdir, out=None, step: int | None = None) -> epath.Path:
  """Write the run's parameters at `step` as a transformers BertForPreTraining folder."""
  run = read_run(workdir, step)
  out = epath.Path(out) if out else default_out(workdir, "hf")
  cfg = run.model_config
  hf_config = {**hf.hf_config_from_bert(cfg, pad_token_id=run.tokenizer.pad_id), "dtype": "float32"}
  tensors = hf.to_hf_state_dict(run.params, cfg)  # float32, padding rows stripped

  def write(folder: epath.Path):
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    hf_tokenizer.save_for_transformers(run.tokenizer, folder, model_max_length=cfg.max_position_embeddings)
    (folder / EXPORT_MARKER).write_text(_marker("hf", workdir, run))

  _replace_atomically(out, write)
  log.info("exported step %d of %s to %s (transformers)", run.step, workdir, out)
  return out


def export_params(workdir, out=None, step: int | None = None) -> epath.Path:
  """Write the run's parameters at `step` under bertjax's own names (layout as trained, vocabulary
  padding included), with the model config and the tokenizer: see load_params_export."""
  run = read_run(workdir, step)
  out = epath.Path(out) if out else default_out(workdir, "params")
  tensors = {path: np.ascontiguousarray(value, np.float32)
             for path, value in flatten_dict(run.params, sep="/").items()}
  model_config = {"format": PARAMS_FORMAT, "step": run.step, "bert_config": dataclasses.asdict(run.model_config),
                  "run_config": config_lib.to_dict(run.config)}

  def write(folder: epath.Path):
    (folder / PARAMS_FILE).write_bytes(safetensors.numpy.save(tensors, metadata={"format": PARAMS_FORMAT}))
    (folder / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    run.tokenizer.save(folder / "tokenizer")
    (folder / EXPORT_MARKER).write_text(_marker("params", workdir, run))

  _replace_atomically(out, write)
  log.info("exported step %d of %s to %s (params)", run.step, workdir, out)
  return out


def export(workdir, format: str, out=None, step: int | None = None) -> epath.Path:
  """`bertjax export`: the folder written."""
  if format not in FORMATS:
    raise BertjaxError(f"--format {format}: unknown; use hf or params")
  return (export_hf if format == "hf" else export_params)(workdir, out, step)


def load_params_export(directory) -> tuple[dict, BertConfig]:
  """(params pure dict of numpy arrays, BertConfig) of an `export --format params` folder.

  model = bertjax.model.init_model(cfg); bertjax.hf.load_params_into(model, params)."""
  directory = epath.Path(directory)
  config_file = directory / "config.json"
  if not (directory / PARAMS_FILE).exists() or not config_file.exists():
    raise BertjaxError(f"{directory}: no {PARAMS_FILE} and config.json; give a `bertjax export --format params` folder")
  description = json.loads(config_file.read_text())
  if description.get("format") != PARAMS_FORMAT:
    raise BertjaxError(f"{config_file} is not a bertjax params export (format {description.get('format')!r})")
  cfg = BertConfig(**description["bert_config"])
  return unflatten_dict(_read_safetensors(directory / PARAMS_FILE), sep="/"), cfg


# -- loading anything ---------------------------------------------------------------------------
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _is_hf_folder(directory: epath.Path) -> bool:
  if any((directory / name).exists() for name in _HF_WEIGHTS):
    return True
  config_file = directory / "config.json"
  try:
    return config_file.exists() and "model_type" in json.loads(config_file.read_text())
  except ValueError:
    return True  # a broken config.json: read_hf_checkpoint says so


def from_pretrained(directory, *, dtype: str = "float32", step: int | None = None
                    ) -> tuple[BertForPreTraining, tokenizer_lib.Tokenizer | None]:
  """(model, tokenizer) from a transformers BERT folder, a bertjax export or a bertjax workdir.

  The model computes in `dtype` (float32 by default; parameters are float32 always). The
  tokenizer is None for a transformers folder without tokenizer files. Heads a plain BertModel
  lacks are initialised fresh (seed 0) and logged. `step` picks a workdir's checkpoint.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise BertjaxError(f"{directory}: no such folder; give a transformers BERT folder, a bertjax export or workdir")
  if (directory / PARAMS_FILE).exists():
    params, cfg = load_params_export(directory)
    tokenizer = tokenizer_lib.load_tokenizer(directory / "tokenizer")
  elif _is_hf_folder(directory):
    model, fresh = model_from_hf_folder(directory, dtype=dtype)
    if fresh:
      log.warning("%s lacks %s: initialised fresh", directory, ", ".join(fresh))
    tokenizer = hf_tokenizer.load_from_transformers(directory) if hf_tokenizer.has_tokenizer(directory) else None
    return model, tokenizer
  elif (directory / checkpoint.CHECKPOINT_DIR).exists():
    run = read_run(directory, step)
    params, cfg, tokenizer = run.params, run.model_config, run.tokenizer
  else:
    raise BertjaxError(f"{directory}: holds neither a transformers config.json with weights, a {PARAMS_FILE} "
                       "nor checkpoints; give a transformers BERT folder, a bertjax export or workdir")
  model = init_model(dataclasses.replace(cfg, dtype=dtype, attention_impl="xla"))
  hf.load_params_into(model, params)
  return model, tokenizer


def import_hf(hf_dir, workdir, *, seed: int = 0):
  """`bertjax import-hf`: see bertjax.hf_import.import_hf (its own module, which imports this one)."""
  from bertjax import hf_import
  return hf_import.import_hf(hf_dir, workdir, seed=seed)
