"""A fine-tune's start: its config on the --init run's model, and the --init run's parameters.

    load_config(spec, overrides, task, init)   a fine-tuning config on the --init run's model and
                                               tokenizer, validated
    warm_start(run, init)                      step 0: the --init run's encoder, a fresh head; reads only

`--init` is a pretraining workdir (`bertjax train`) or one made by `bertjax import-hf`.
"""

import logging
import os

import jax
from etils import epath
from flax import nnx

from bertjax.config import loading as config_loading
from bertjax.errors import BertjaxError
from bertjax.finetune import heads
from bertjax.finetune.run import Run
from bertjax.model.bert import abstract_model
from bertjax.parallel import rules
from bertjax.train import checkpoint, compatibility

log = logging.getLogger(__name__)

# The keys a fine-tuning run takes from its --init run: what shapes the parameters and what the
# network computes with them (dtype, remat, attention kernel and dropout stay the fine-tuning
# config's), and the pretraining sequence shape, which the config checks against the model.
INHERITED_KEYS = (
  "model.variant",
  "model.hidden_size",
  "model.num_layers",
  "model.num_heads",
  "model.intermediate_size",
  "model.max_position_embeddings",
  "model.type_vocab_size",
  "model.layer_norm_eps",
  "model.initializer_range",
  "data.seq_len",
  "data.max_predictions",
)


def _local_absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def load_config(spec: str, overrides, *, task: str, init: str):
  """The validated config of `--config spec` for a run that starts from `init`: the model's sizes
  and the tokenizer are the init run's, then the overrides, then --task and --init."""
  init = _local_absolute(init)
  init_dir = epath.Path(init)
  if not (init_dir / config_loading.CONFIG_FILENAME).exists() or not (init_dir / "tokenizer").exists():
    raise BertjaxError(
      f"--init {init}: holds no config.json and tokenizer/; give a pretraining workdir (bertjax train) "
      "or one made by bertjax import-hf"
    )
  source = config_loading.read_config(init_dir)
  if source.finetune.task:
    raise BertjaxError(f"--init {init} is a fine-tuning run; start from a pretraining or import-hf workdir")
  values = {key: source[key.split(".")[0]][key.split(".")[1]] for key in INHERITED_KEYS}
  inherited = [f"{key}={value}" for key, value in values.items() if value is not None]
  inherited.append(f"data.tokenizer={init_dir / 'tokenizer'}")
  return config_loading.load_config(spec, [*inherited, *overrides, f"finetune.task={task}", f"finetune.init={init}"])


def warm_start(run: Run, init: str):
  """The step-0 state: parameters of the encoder (and pooler) from the --init run's newest good
  checkpoint, the head and optimizer fresh from train.seed.

  Raises:
    BertjaxError: `init` has no checkpoints, none restores, or its model or tokenizer differs.
  """
  abstract = nnx.state(abstract_model(run.model_config), nnx.Param)
  shardings = rules.named(run.steps.mesh, rules.param_specs(abstract, rules.from_config(run.config.mesh)))
  target = jax.tree.map(
    lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), nnx.to_pure_dict(abstract), shardings
  )
  with checkpoint.Checkpoints(init, read_only=True) as source:
    if not source.steps():
      raise BertjaxError(f"--init {init}: no checkpoints there; pretrain first, or import one with bertjax import-hf")
    params, meta = source.restore_params(
      target,
      check=lambda meta: compatibility.check_compatible(
        meta, run.model_config, run.data.tokenizer.fingerprint, f"--init {init}"
      ),
    )
  state = run.steps.init(run.config.train.seed)
  body = {name: params[name] for name in heads.BODY if name in state.params}
  log.info("started from step %d of %s (%s)", meta["step"], init, ", ".join(body))
  return state.replace(params={**state.params, **body})
