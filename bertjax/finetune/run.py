"""A fine-tuning run, assembled: its data, mesh and compiled steps; its evaluation.

    prepare(config)                            the task's data read and tokenised: before anything
                                               is written and before JAX touches a device
    setup(config, workdir, data)               mesh, compiled steps, this process's rows
    write_run_files(run)                       WORKDIR/config.json and tokenizer/
    evaluate(run, params)                      dev metrics (and QA answers)

`config` is validated (`init.load_config`); nothing here checks it again, except what needs the devices.
"""

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from etils import epath

from bertjax import tasks
from bertjax.config import loading as config_loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.finetune import answers, features, metrics, sources, squad
from bertjax.finetune.task import Finetune, device_keys
from bertjax.model.config import BertConfig, resolve_config
from bertjax.train import run as train_run
from bertjax.train.steps import CompiledSteps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
  """A task's data, tokenised: train and dev features, and what the dev metrics need."""

  spec: tasks.TaskSpec
  tokenizer: Any
  train: dict[str, np.ndarray]
  dev: dict[str, dict[str, np.ndarray]]  # dev split -> features
  questions: dict[str, list[squad.Question]]  # QA: dev split -> its questions


def prepare(config, tokenizer=None, *, with_train: bool = True) -> Data:
  """Read and tokenise the task's data (the dev splits only, without `with_train`). A bad input
  stops here, before anything is written."""
  tokenizer = tokenizer or tokenizer_lib.load_tokenizer(config.data.tokenizer)
  f = config.finetune
  no_train = {"input_ids": np.zeros((0, f.max_seq_len), np.int32)}
  if f.task == "qa":
    window = dict(max_seq_len=f.max_seq_len, doc_stride=f.doc_stride, max_query_len=f.max_query_len)
    train = no_train
    if with_train:
      source, train_questions = squad.read_questions(config, "train")
      train_questions = squad.answerable_in_context(train_questions, source)
      train = squad.windows(train_questions, tokenizer, **window, with_labels=True)
    _, dev_questions = squad.read_questions(config, "dev")
    dev = squad.windows(dev_questions, tokenizer, **window, with_labels=False)
    return Data(tasks.resolve(config), tokenizer, train, {"dev": dev}, {"dev": dev_questions})
  data = sources.read_classification(config, with_train)
  encode = lambda examples: features.encode_classification(examples, tokenizer, f.max_seq_len)
  train = encode(data.train) if data.train is not None else no_train
  return Data(data.spec, tokenizer, train, {k: encode(v) for k, v in data.dev.items()}, {})


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
  """(metrics over every dev split, {split: QA answers and null odds}) of `params`."""
  spec, f = run.data.spec, run.config.finetune
  single = len(spec.dev_splits) == 1
  results, answered = {}, {}
  for split in spec.dev_splits:
    dev = run.data.dev[split]
    suffix = "" if single else f"_{split}"
    out = _predict(run, params, dev, device_keys(spec, spec.kind != "qa"))
    if spec.kind == "qa":
      questions = run.data.questions[split]
      found, null_odds = answers.decode(
        questions,
        dev,
        out["start_logits"],
        out["end_logits"],
        n_best=f.n_best,
        max_answer_len=f.max_answer_len,
        squad_v2=f.squad_v2,
        null_score_threshold=f.null_score_threshold,
      )
      gold = [{"id": q.id, "answers": q.answers} for q in questions]
      scores = metrics.squad_v2(gold, found) if f.squad_v2 else metrics.squad_v1(gold, found)
      answered[split] = {"predictions": found, "null_odds": null_odds}
    elif spec.regression:
      scores = metrics.regression(spec.metrics, out["logits"][:, 0], dev["labels"])
      scores["loss"] = out["loss_sum"] / max(out["weight_sum"], 1.0)
    else:
      scores = metrics.classification(spec.metrics, out["logits"].argmax(-1), dev["labels"])
      scores["loss"] = out["loss_sum"] / max(out["weight_sum"], 1.0)
    results.update({f"{name}{suffix}": float(value) for name, value in scores.items()})
  return results, answered
