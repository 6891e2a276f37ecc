"""A fine-tuning run, assembled: its data, mesh and compiled steps; its evaluation.

    prepare(config)                            the task's data read and tokenised: before anything
                                               is written and before JAX touches a device
    setup(config, workdir, data)               mesh, compiled steps, this process's rows
    write_run_files(run)                       WORKDIR/config.json and tokenizer/
    evaluate(run, params)                      dev metrics (and QA answers)

Each task family (`FAMILIES`: classification, qa, ner, multiple_choice) reads and scores its own
data (`bertjax.finetune.family`); this module is the same for all of them.

`config` is validated (`init.load_config`); nothing here checks it again, except what needs the devices.
"""

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from etils import epath

from bertjax.config import loading as config_loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.finetune import choice, classify, features, ner, qa
from bertjax.finetune.family import Data, Family
from bertjax.finetune.task import INPUTS, LABELS, Finetune, device_keys
from bertjax.model.config import BertConfig, resolve_config
from bertjax.train import run as train_run
from bertjax.train.steps import CompiledSteps

log = logging.getLogger(__name__)


# finetune.task -> its family: how its data is read and tokenised, how its dev outputs are scored.
FAMILIES: dict[str, Family] = {
  "classification": classify.FAMILY,
  "qa": qa.FAMILY,
  "ner": ner.FAMILY,
  "multiple_choice": choice.FAMILY,
}


def prepare(config, tokenizer=None, *, with_train: bool = True) -> Data:
  """Read and tokenise the task's data (the dev splits only, without `with_train`). A bad input
  stops here, before anything is written."""
  tokenizer = tokenizer or tokenizer_lib.load_tokenizer(config.data.tokenizer)
  return FAMILIES[config.finetune.task].prepare(config, tokenizer, with_train)


@dataclasses.dataclass
class Run:
  """A fine-tuning run, assembled: `setup`'s result."""

  config: Any
  workdir: epath.Path
  data: Data
  model_config: BertConfig
  steps: CompiledSteps
  order: features.TrainOrder
  total_steps: int
  rows: np.ndarray  # the global batch rows this process materialises

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0

  def global_batch(self, rows: np.ndarray, source: dict[str, np.ndarray], keys) -> dict[str, jax.Array]:
    """Step rows of `source` (-1: padding) as global arrays; this process builds only its own."""
    local = features.take(source, rows[self.rows])
    return train_run.global_batch(self.steps, {k: local[k] for k in keys}, len(rows))

  def train_batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of training step `step` (`TrainOrder.rows`), with its labels."""
    return self.global_batch(self.order.rows(step), self.data.train, device_keys(self.data.spec, True))


def _optim_config(config, total_steps: int):
  """The optimizer section with BERT's fine-tuning warmup: a fraction of all steps."""
  return {
    **config.optim,
    "warmup_steps": int(config.finetune.warmup_fraction * total_steps),
    "schedule_steps": 0,
  }


def setup(config, workdir, data: Data) -> Run:
  """The mesh, the compiled steps and this process's rows (nothing is written).

  Args:
    config: a validated fine-tuning config.
    workdir: the run folder.
    data: `prepare(config)`'s result; its task carries the classes an hf: dataset names.
  Raises:
    BertjaxError: the config does not fit this job's devices.
  """
  model_config = resolve_config(config.model, data.tokenizer.vocab_size, seq_len=config.finetune.max_seq_len)
  t = config.train
  order = features.TrainOrder(len(data.train["input_ids"]), t.batch_size, t.seed)
  total = order.steps_per_epoch * config.finetune.epochs
  task = Finetune(data.spec, config.finetune.head_dropout)
  steps, rows = train_run.compile_for(config, task, model_config, total, _optim_config(config, total))
  return Run(config, epath.Path(workdir), data, model_config, steps, order, total, rows)


def write_run_files(run: Run) -> None:
  """WORKDIR/config.json from process 0, and WORKDIR/tokenizer/, a copy of the init run's
  (checked against it on resume)."""
  if run.is_primary:
    run.workdir.mkdir(parents=True, exist_ok=True)
    config_loading.write_config(run.config, run.workdir)
  tokenizer_lib.tokenizer_for_run(run.config, run.workdir)


def _predict(run: Run, params, source: dict[str, np.ndarray], keys) -> dict[str, np.ndarray]:
  """The eval step's outputs over every row of `source` on the host: per-row arrays with the
  padding rows dropped, and the sums (losses) added up."""
  count = len(source["input_ids"])
  arrays: dict[str, list] = {}
  sums: dict[str, float] = {}
  for rows in features.eval_rows(count, run.config.train.batch_size):
    for k, v in jax.device_get(run.steps.eval(params, run.global_batch(rows, source, keys))).items():
      if np.ndim(v):
        arrays.setdefault(k, []).append(np.asarray(v))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  return {**{k: np.concatenate(v)[:count] for k, v in arrays.items()}, **sums}


def evaluate(run: Run, params) -> tuple[dict[str, float], dict[str, dict]]:
  """(metrics over every dev split, {split: what the family writes beside them, QA's answers}) of `params`."""
  spec = run.data.spec
  family = FAMILIES[spec.kind]
  results, extras = {}, {}
  for split in spec.dev_splits:
    dev = run.data.dev[split]
    keys = INPUTS + tuple(k for k in LABELS[spec.kind] if k in dev)  # dev labels, where the features hold them
    scores, extra = family.score(run.config, spec, dev, run.data.gold.get(split), _predict(run, params, dev, keys))
    suffix = "" if len(spec.dev_splits) == 1 else f"_{split}"
    # Counts (SQuAD 2.0's totals) stay whole numbers; every score is a float.
    results.update(
      {f"{name}{suffix}": value if isinstance(value, int) else float(value) for name, value in scores.items()}
    )
    if extra is not None:
      extras[split] = extra
  return results, extras
