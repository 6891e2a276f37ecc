"""`bertjax import-hf`: a transformers BERT folder becomes a bertjax workdir at step 0.

    WORKDIR/config.json        a full run config: bertjax's defaults, the model sizes,
                               dropouts and LayerNorm eps from the checkpoint's config.json,
                               data.tokenizer = WORKDIR/tokenizer, data.vocab_size = its size
    WORKDIR/tokenizer/         the checkpoint's tokenizer (vocab.txt / tokenizer.json / spm.model)
    WORKDIR/checkpoints/0/     params (padded vocabulary rows zero), a fresh optimizer state, rng

`bertjax train --config ... --workdir WORKDIR` resumes from it like from any checkpoint: there is
no data position in its meta, so the data iterator starts at step 0. `bertjax finetune --init
WORKDIR` starts from it as from a pretrained run. Heads the checkpoint lacks (a plain BertModel
has no MLM or NSP head) are initialised as bertjax would (train.seed) and listed.

The workdir is assembled in a temporary sibling folder and renamed into place when complete
(`bertjax.atomic`).
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
from etils import epath

from bertjax import atomic
from bertjax.config import defaults, validation
from bertjax.config import loading as config_loading
from bertjax.errors import BertjaxError
from bertjax.hf import folders, load, names
from bertjax.hf import tokenizer as hf_tokenizer
from bertjax.model import bert
from bertjax.model import config as model_config_lib
from bertjax.train import checkpoint, compatibility, optim, steps

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """What `import_hf` made: the new run folder and the model it holds."""

  workdir: epath.Path
  config: model_config_lib.BertConfig
  vocab_size: int
  fresh_parameters: list[str]  # bertjax paths the checkpoint lacked, initialised fresh

  def summary(self) -> str:
    """One line for the CLI to print."""
    cfg = self.config
    fresh = f"; initialised fresh: {', '.join(self.fresh_parameters)}" if self.fresh_parameters else ""
    return (
      f"imported a {cfg.num_layers}-layer, {cfg.hidden_size}-wide BERT (vocabulary {self.vocab_size}) "
      f"into {self.workdir} at step 0{fresh}"
    )


def _variant_name(cfg: model_config_lib.BertConfig) -> str:
  """The VARIANTS entry with exactly these sizes, for readability (the sizes are set anyway)."""
  sizes = model_config_lib.Variant(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size)
  for name in ("base", "large", "tiny", "mini", "small", "medium"):
    if model_config_lib.VARIANTS[name] == sizes:
      return name
  return next((name for name, v in model_config_lib.VARIANTS.items() if v == sizes), "base")


def run_config_for(cfg: model_config_lib.BertConfig, tokenizer_dir: str, seed: int = 0):
  """The run config of an imported model: bertjax's defaults with the checkpoint's sizes.

  Args:
    cfg: the BertConfig read from the transformers config.json.
    tokenizer_dir: the tokenizer folder the run config names (`data.tokenizer`).
    seed: `train.seed`.
  Returns:
    The validated run config; `data.seq_len` and `data.max_predictions` are capped at the model's
    `max_position_embeddings`.
  """
  config = defaults.get_config()
  config.model.variant = _variant_name(cfg)
  config.model.update(
    hidden_size=cfg.hidden_size,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    intermediate_size=cfg.intermediate_size,
    max_position_embeddings=cfg.max_position_embeddings,
    type_vocab_size=cfg.type_vocab_size,
    dropout=cfg.dropout,
    attention_dropout=cfg.attention_dropout,
    layer_norm_eps=cfg.layer_norm_eps,
    initializer_range=cfg.initializer_range,
  )
  config.data.tokenizer = tokenizer_dir
  config.data.vocab_size = cfg.vocab_size
  config.data.seq_len = min(config.data.seq_len, cfg.max_position_embeddings)
  config.data.max_predictions = min(config.data.max_predictions, config.data.seq_len)
  config.train.seed = seed
  validation.validate(config)
  return config


def _check_new_workdir(workdir: epath.Path) -> None:
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise BertjaxError(f"--workdir {workdir} already exists and is not empty; import into a new folder")


def import_hf(hf_dir, workdir, *, seed: int = 0) -> ImportResult:
  """Make `workdir` a bertjax run at step 0 holding the transformers BERT in `hf_dir`.

  Parameters the checkpoint lacks (a head) are initialised from `seed`.

  Raises:
    BertjaxError: `workdir` exists and is not empty, `hf_dir` is not a readable transformers BERT
      folder or holds no tokenizer, or its tokenizer's vocabulary differs from config.json's.
  """
  hf_dir, workdir = epath.Path(hf_dir), epath.Path(workdir)
  _check_new_workdir(workdir)
  hf_config, tensors = folders.read_hf_checkpoint(hf_dir)
  cfg = names.bert_config_from_hf(hf_config)
  tokenizer = hf_tokenizer.load_from_transformers(hf_dir)
  if tokenizer.vocab_size != cfg.vocab_size:
    raise BertjaxError(
      f"--hf {hf_dir}: the tokenizer has {tokenizer.vocab_size} pieces but config.json "
      f"vocab_size is {cfg.vocab_size}; use the tokenizer saved with these weights"
    )
  config = run_config_for(cfg, str(workdir / "tokenizer"), seed)
  resolved = model_config_lib.resolve_config(config.model, tokenizer.vocab_size, backend="cpu")
  resolved_sizes, sizes = compatibility.model_sizes(resolved), compatibility.model_sizes(cfg)
  if resolved_sizes != sizes:  # the run must rebuild this model
    raise RuntimeError(f"run config resolves to {resolved_sizes}, not {sizes}")

  # Heads the checkpoint lacks start from the model's own initialiser, seeded by train.seed.
  init_params = load.params_of(bert.init_model(cfg, seed=seed))
  params, fresh = names.from_hf_state_dict(tensors, cfg, init_params=init_params)
  if fresh:
    log.warning("%s lacks %s: initialised fresh", hf_dir, ", ".join(fresh))
  params = jax.tree.map(jnp.asarray, params)
  state = steps.fresh_state(params, optim.build_optimizer(config.optim, config.train.steps), seed)
  meta = {
    "config": config_loading.to_dict(config),
    "model": compatibility.model_sizes(cfg),
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "imported_from": str(hf_dir),
    "fresh_parameters": fresh,
  }

  with atomic.staged_folder(workdir, replace=True) as partial:  # replaces at most an empty folder
    tokenizer.save(partial / "tokenizer")
    with checkpoint.Checkpoints(partial) as checkpoints:
      checkpoints.save(state, meta, wait=True)
    config_loading.write_config(config, partial)
  return ImportResult(workdir, cfg, tokenizer.vocab_size, fresh)
