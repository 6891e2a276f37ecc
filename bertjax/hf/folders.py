"""Reading transformers BERT folders: config.json and the weights, in any of their formats.

    read_hf_checkpoint(folder)   -> (config.json dict, {tensor name: float32 numpy array})
    is_hf_folder(folder)         whether a folder looks like a transformers model

Weights come from model.safetensors, a sharded model.safetensors.index.json, or (with torch
installed) pytorch_model.bin; bfloat16 tensors are widened to float32. The shard names of an
index are refused unless each is a regular file inside the folder.
"""

import json
import os
import pathlib
import stat

import numpy as np
import safetensors.numpy
from etils import epath

from bertjax.errors import BertjaxError
from bertjax.hf import names


def read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  """{tensor name: numpy array} of a safetensors file; bfloat16 tensors (read through torch) widen to float32.

  Raises:
    BertjaxError: the file is not readable safetensors.
  """
  data = path.read_bytes()
  try:
    return safetensors.numpy.load(data)
  except TypeError:  # bfloat16 has no numpy dtype: let torch read it and widen to float32
    from safetensors import torch as safetensors_torch

    return {k: v.float().numpy() for k, v in safetensors_torch.load(data).items()}
  except Exception as e:  # safetensors raises its own error types on a damaged header
    raise BertjaxError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it") from e


def _shards(directory: epath.Path, index: epath.Path) -> list[epath.Path]:
  """The shard files an index names, each a regular file inside `directory` (the index is
  untrusted input: a name may not be absolute, climb out with `..`, or be a link that leads out)."""
  try:
    weight_map = json.loads(index.read_text()).get("weight_map")
  except (ValueError, AttributeError):
    weight_map = None
  if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
    raise BertjaxError(
      f"{index} has no weight_map of tensor names to shard files; re-save the model with save_pretrained"
    )
  shards = []
  for name in sorted(set(weight_map.values())):
    parts = pathlib.PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or pathlib.PureWindowsPath(name).drive or ".." in parts:
      problem = "is not a file name inside the folder"
    else:
      path = directory / name
      problem = _outside_or_irregular(directory, path)
      shards.append(path)
    if problem:
      raise BertjaxError(f"{index} names the shard {name!r}, which {problem}; a shard must be a file in {directory}")
  return shards


def _outside_or_irregular(directory: epath.Path, path: epath.Path) -> str | None:
  if "://" in str(directory):  # an object store: no links, no special files
    return None if path.is_file() else "does not exist"
  root, real = os.path.realpath(directory), os.path.realpath(path)
  if os.path.commonpath([root, real]) != root:
    return f"leads outside the folder (to {real})"
  try:
    mode = os.stat(real).st_mode
  except OSError:
    return "does not exist"
  return None if stat.S_ISREG(mode) else "is not a regular file"


def _read_weights(directory: epath.Path) -> dict[str, np.ndarray]:
  if (directory / "model.safetensors").exists():
    return read_safetensors(directory / "model.safetensors")
  index = directory / "model.safetensors.index.json"
  if index.exists():  # sharded: {"weight_map": {tensor name: file}}
    tensors = {}
    for shard in _shards(directory, index):
      tensors.update(read_safetensors(shard))
    return tensors
  if (directory / "pytorch_model.bin").exists():
    try:
      import torch
    except ImportError:
      raise BertjaxError(
        f"{directory}/pytorch_model.bin needs PyTorch to read; install torch or convert "
        "the checkpoint to model.safetensors"
      ) from None
    try:
      state = torch.load(str(directory / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    except Exception as e:
      raise BertjaxError(
        f"{directory}/pytorch_model.bin cannot be read ({type(e).__name__}); "
        "re-download it or convert it to model.safetensors"
      ) from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  raise BertjaxError(
    f"transformers folder {directory} holds no model.safetensors or pytorch_model.bin; point it at a "
    "transformers BERT folder (save_pretrained output)"
  )


def read_hf_checkpoint(directory) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, {tensor name: numpy array}) of a transformers BERT folder.

  Raises:
    BertjaxError: no such folder, no or invalid config.json, a config that is not BERT's, or weights
      that are missing, unreadable, or (an index's shards) outside the folder.
  """
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
  names.bert_config_from_hf(hf_config)  # refuse a non-BERT config before reading any weights
  return hf_config, _read_weights(directory)


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_folder(directory: epath.Path) -> bool:
  """Whether `directory` holds transformers weights or a config.json with `model_type` (or a broken one)."""
  if any((directory / name).exists() for name in _HF_WEIGHTS):
    return True
  config_file = directory / "config.json"
  try:
    return config_file.exists() and "model_type" in json.loads(config_file.read_text())
  except ValueError:
    return True  # a broken config.json: read_hf_checkpoint says so
