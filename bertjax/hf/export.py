"""`bertjax export`: a run's parameters as a transformers folder, or under bertjax's own names.

    export_hf(workdir, out, step)       a transformers folder: config.json, model.safetensors
                                        (float32, padding rows stripped), tokenizer; a
                                        BertForPreTraining, or for a fine-tuning run a
                                        BertForSequenceClassification (with its classes),
                                        BertForQuestionAnswering, BertForTokenClassification
                                        (with its tags) or BertForMultipleChoice
    export_params(workdir, out, step)   bertjax's own flat names in params.safetensors + config.json
    read_run(workdir, step)             a run's parameters with the configs and tokenizer that
                                        describe them (also what `load.from_pretrained` reads)

An export is built in a temporary folder and renamed into place once complete
(`bertjax.atomic`), so a failed export never leaves a half-written folder, and an existing
folder is replaced only when it is itself a bertjax export.
"""

import dataclasses
import json
import logging

import numpy as np
import safetensors.numpy
from etils import epath
from flax.traverse_util import flatten_dict

from bertjax import atomic, tasks
from bertjax.config import loading as config_loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.hf import names
from bertjax.hf import tokenizer as hf_tokenizer
from bertjax.model.config import BertConfig, resolve_config
from bertjax.train import checkpoint, compatibility

log = logging.getLogger(__name__)

EXPORT_MARKER = "bertjax_export.json"  # written last into every export; names its format and origin
PARAMS_FILE = "params.safetensors"
PARAMS_FORMAT = "bertjax-params"
FORMATS = ("hf", "params")


@dataclasses.dataclass(frozen=True)
class RunSnapshot:
  """What export needs of a run: its config, model config, tokenizer and one step's parameters."""

  config: object
  model_config: BertConfig
  tokenizer: tokenizer_lib.Tokenizer
  params: dict
  step: int
  task: tasks.TaskSpec | None  # a fine-tuning run's, with the classes its data named; None when pretraining


def read_run(workdir, step: int | None = None) -> RunSnapshot:
  """A run's parameters at `step` (default: the newest restorable), with what describes them.

  The parameters are numpy arrays on this host, whatever mesh saved them.

  Raises:
    BertjaxError: `workdir` has no config.json, tokenizer/ or checkpoints, or the step cannot be
      restored or does not fit the run's config.
  """
  workdir = epath.Path(workdir)
  config = config_loading.read_config(workdir)
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
      compatibility.check_compatible(meta, model_config, tokenizer.fingerprint, f"--workdir {workdir}")

    params, meta = checkpoints.restore_params(step=step, check=check)
  return RunSnapshot(config, model_config, tokenizer, params, int(meta["step"]), _task(config, meta))


def _task(config, meta: dict) -> tasks.TaskSpec | None:
  """A fine-tuning run's task: its config's, with the classes the checkpoint recorded (an hf:
  dataset names them; the config does not hold them)."""
  if not config.finetune.task:
    return None
  spec = tasks.resolve(config)
  saved = meta.get("task", {}).get("labels")
  return dataclasses.replace(spec, labels=tuple(saved)) if saved and not spec.regression else spec


def _check_out(out: epath.Path) -> None:
  """An export may replace an earlier export, never other files."""
  if out.exists() and not out.is_dir():
    raise BertjaxError(f"--out {out} is a file; give a folder")
  if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).exists():
    raise BertjaxError(f"--out {out} is not empty and not a bertjax export; give a new or empty folder")


def _marker(fmt: str, workdir, run: RunSnapshot) -> str:
  return (
    json.dumps(
      {"format": fmt, "workdir": str(workdir), "step": run.step, "tokenizer_fingerprint": run.tokenizer.fingerprint},
      indent=1,
    )
    + "\n"
  )


def default_out(workdir, fmt: str) -> epath.Path:
  """WORKDIR/export/hf or WORKDIR/export/params: both formats can sit side by side."""
  return epath.Path(workdir) / "export" / fmt


def _hf_model(run: RunSnapshot) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) of the run's model in transformers' terms: the pretraining model, or
  a fine-tuning run's head (its task from the run's config)."""
  cfg, pad_id = run.model_config, run.tokenizer.pad_id
  if not run.config.finetune.task:
    return names.hf_config_from_bert(cfg, pad_token_id=pad_id), names.to_hf_state_dict(run.params, cfg)
  spec = run.task
  head_dropout = run.config.finetune.head_dropout
  hf_config = names.hf_finetune_config(cfg, spec.kind, spec.labels, spec.regression, head_dropout, pad_token_id=pad_id)
  return hf_config, names.to_hf_finetune_state_dict(run.params, cfg, spec.kind)


def export_hf(workdir, out=None, step: int | None = None) -> epath.Path:
  """Write the run's parameters at `step` as a transformers folder (BertForPreTraining, or a
  fine-tuning run's BertForSequenceClassification, BertForQuestionAnswering,
  BertForTokenClassification or BertForMultipleChoice).

  Args:
    workdir: the bertjax run folder.
    out: the folder to write; None is WORKDIR/export/hf. An earlier export there is replaced.
    step: the checkpoint step; None takes the newest restorable one.
  Returns:
    `out`.
  Raises:
    BertjaxError: `read_run`'s, or `out` is a file or a non-empty folder that is not a bertjax export.
  """
  run = read_run(workdir, step)
  out = epath.Path(out) if out else default_out(workdir, "hf")
  cfg = run.model_config
  hf_config, tensors = _hf_model(run)  # float32, padding rows stripped
  hf_config["dtype"] = "float32"

  _check_out(out)
  with atomic.staged_folder(out, replace=True) as folder:
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    hf_tokenizer.save_for_transformers(run.tokenizer, folder, model_max_length=cfg.max_position_embeddings)
    (folder / EXPORT_MARKER).write_text(_marker("hf", workdir, run))
  log.info("exported step %d of %s to %s (transformers)", run.step, workdir, out)
  return out


def export_params(workdir, out=None, step: int | None = None) -> epath.Path:
  """Write the run's parameters at `step` under bertjax's own names (layout as trained, vocabulary
  padding included), with the model config and the tokenizer: see load_params_export.

  Args:
    workdir, step: as in `export_hf`.
    out: the folder to write; None is WORKDIR/export/params.
  Returns:
    `out`.
  Raises:
    BertjaxError: as in `export_hf`.
  """
  run = read_run(workdir, step)
  out = epath.Path(out) if out else default_out(workdir, "params")
  tensors = {path: np.ascontiguousarray(value, np.float32) for path, value in flatten_dict(run.params, sep="/").items()}
  model_config = {
    "format": PARAMS_FORMAT,
    "step": run.step,
    "bert_config": dataclasses.asdict(run.model_config),
    "run_config": config_loading.written_config(workdir),
  }

  _check_out(out)
  with atomic.staged_folder(out, replace=True) as folder:
    (folder / PARAMS_FILE).write_bytes(safetensors.numpy.save(tensors, metadata={"format": PARAMS_FORMAT}))
    (folder / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    run.tokenizer.save(folder / "tokenizer")
    (folder / EXPORT_MARKER).write_text(_marker("params", workdir, run))
  log.info("exported step %d of %s to %s (params)", run.step, workdir, out)
  return out


def export(workdir, format: str, out=None, step: int | None = None) -> epath.Path:
  """`bertjax export`: the folder written.

  Args:
    workdir, out, step: as in `export_hf`.
    format: `hf` (`export_hf`) or `params` (`export_params`).
  Raises:
    BertjaxError: an unknown `format`, or the chosen export's.
  """
  if format not in FORMATS:
    raise BertjaxError(f"--format {format}: unknown; use hf or params")
  return (export_hf if format == "hf" else export_params)(workdir, out, step)
